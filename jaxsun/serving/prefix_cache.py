"""A prefix cache keyed by (prefill tree id, token prefix), LRU under a byte budget.

    cache = PrefixCache(budget_bytes=64 << 20, block=16)
    hit = cache.lookup(tree_id, prompt_tokens)      # the longest cached prefix, or None
    prefix, first = engine.prefill(params, prompt, existing_prefix=hit)
    cache.put(prefix)                               # keyed by (prefix.producer, its tokens)

The key is the tree that produced the KV, not the task model: PrefillShare task models
share one frozen prefill tree, so they hit each other's entries, while models with
different prefill trees (SUN task models, conventional ones) never do, even on the same
tokens (their KVs differ). Lookup walks block boundaries (every `block` tokens) from the
longest down, plus the exact prompt, like vLLM's block hashes; a hit is truncated to the
matched length (`Prefix.truncated`), and only the rest of the prompt is prefilled.
"""

from __future__ import annotations

import collections
import threading

from jaxsun.serving.engine import Prefix


class PrefixCache:
  """LRU over `Prefix` entries; thread-safe.

  Args:
    budget_bytes: total KV bytes kept; the least recently used entries go first.
    block: granularity of partial matches (tokens).
  """

  def __init__(self, budget_bytes: int, block: int = 16):
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
      raise ValueError(f"budget_bytes={budget_bytes!r} must be an integer >= 0")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
      raise ValueError(f"block={block!r} must be a positive integer")
    self.budget_bytes, self.block = budget_bytes, block
    self._entries: collections.OrderedDict[tuple, Prefix] = collections.OrderedDict()
    # (tree, hash of tokens[:k]) -> keys of entries that cover those k tokens
    self._index: dict[tuple, set] = collections.defaultdict(set)
    # tree -> {entry length: entries of that length}: exact entry ends are matched too
    self._lengths: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self._lock = threading.Lock()
    self.bytes = 0
    self._tokens = 0
    self.hits = self.misses = self.evictions = 0
    self.hit_tokens = self.lookup_tokens = 0

  def __len__(self) -> int:
    return len(self._entries)

  @property
  def tokens(self) -> int:
    """Cached tokens in all (a load signal for routers; kept as a running count, so
    reading it from another thread never walks the entries while they change)."""
    return self._tokens

  def _boundaries(self, n: int, tree_id: str | None = None):
    ends = {n, *range(self.block, n + 1, self.block)}
    if tree_id is not None:
      ends |= {k for k in self._lengths.get(tree_id, ()) if k <= n}
    return sorted(ends, reverse=True)

  def put(self, prefix: Prefix) -> None:
    """Adds (or refreshes) `prefix` under (prefix.producer, prefix.tokens)."""
    if prefix.length == 0 or prefix.nbytes > self.budget_bytes:
      return
    key = (prefix.producer, prefix.tokens)
    with self._lock:
      if key in self._entries:
        self._entries.move_to_end(key)
        return
      # Drop the first-token fields: an entry is KV only, reusable by any consumer.
      entry = prefix if prefix.next_token is None else prefix.truncated(prefix.length)
      self._entries[key] = entry
      self.bytes += entry.nbytes
      self._tokens += entry.length
      for k in self._boundaries(entry.length):
        self._index[(entry.producer, hash(entry.tokens[:k]))].add(key)
      self._lengths[entry.producer][entry.length] += 1
      while self.bytes > self.budget_bytes:
        self._evict_oldest()

  def _evict_oldest(self) -> None:
    key, entry = self._entries.popitem(last=False)
    self.bytes -= entry.nbytes
    self._tokens -= entry.length
    self.evictions += 1
    lengths = self._lengths[entry.producer]
    lengths[entry.length] -= 1
    if not lengths[entry.length]:
      del lengths[entry.length]
    for k in self._boundaries(entry.length):
      ik = (entry.producer, hash(entry.tokens[:k]))
      self._index[ik].discard(key)
      if not self._index[ik]:
        del self._index[ik]

  def match_length(self, tree_id: str, tokens) -> int:
    """How many leading tokens of `tokens` are cached for `tree_id` (no LRU update)."""
    hit = self._find(tree_id, tuple(tokens))
    return 0 if hit is None else hit[1]

  def _find(self, tree_id: str, tokens: tuple):
    with self._lock:
      for k in self._boundaries(len(tokens), tree_id):
        for key in self._index.get((tree_id, hash(tokens[:k])), ()):
          if key[1][:k] == tokens[:k]:  # guard against hash collisions
            return key, k
    return None

  def lookup(self, tree_id: str, tokens, max_length: int | None = None) -> Prefix | None:
    """The longest cached prefix of `tokens` produced by `tree_id`, truncated to the match
    (at most `max_length` tokens), or None. Counts hits for the hit rate."""
    tokens = tuple(tokens)
    if max_length is not None:
      tokens = tokens[:max_length]
    found = self._find(tree_id, tokens)
    with self._lock:
      self.lookup_tokens += len(tokens)
      if found is None:
        self.misses += 1
        return None
      key, k = found
      if key not in self._entries:  # evicted between find and now
        self.misses += 1
        return None
      self._entries.move_to_end(key)
      entry = self._entries[key]
      self.hits += 1
      self.hit_tokens += k
    return entry if k == entry.length else entry.truncated(k)

  def stats(self) -> dict:
    return {"entries": len(self._entries), "bytes": self.bytes,
            "budget_bytes": self.budget_bytes, "hits": self.hits, "misses": self.misses,
            "evictions": self.evictions, "hit_tokens": self.hit_tokens,
            "lookup_tokens": self.lookup_tokens}
