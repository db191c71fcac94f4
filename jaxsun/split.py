"""The prefill/decode split: one graph definition, a prefill tree and a decode tree.

    SplitModel = (graphdef, prefill: State, decode: State)

* The **prefill tree** turns prompt tokens into a KV cache; the **decode tree** consumes
  that cache and generates. Both are complete parameter sets of the same architecture
  (the split is by phase, not by depth).
* A base model is *tied*: one tree serves both phases (`decode is None`), so nothing is
  copied. `untie()` gives two tree slots that still share the same arrays until an
  optimizer update replaces the trainable one.
* SUN trains the prefill tree (`trainability="prefill"`) while one frozen decode tree is
  shared by every task; PrefillShare trains the decode tree (`"decode"`) against a frozen,
  shared prefill tree and its KV cache; `"both"` is full fine-tuning; `"none"` freezes all.

`split_forward` is the one function that decides which tree runs each position; it is the
teacher-forced training forward (gradients reach the prefill tree through the KV cache)
and agrees with `jaxsun.generate` (prefill, then decode steps), which tests check.

Which tree processes the **last prompt token**, and so emits the first output token, is
`SplitModel.last_prompt_token`:
  * `"prefill"` (default): the prefill tree runs the whole prompt; its logits at the last
    prompt position give the first output token.
  * `"decode"`: the prefill tree runs the prompt minus its last token; the decode tree
    runs the last prompt token (attending to the prefill cache) and emits the first output.
    This lets a task-specific decode tree choose the first token (PrefillShare).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import struct

from jaxsun import validation
from jaxsun.config import ModelConfig
from jaxsun.nn import decoder as decoder_lib
from jaxsun.nn.decoder import Decoder, Mode

TRAINABILITY = ("prefill", "decode", "both", "none")
LAST_PROMPT_TOKEN = ("prefill", "decode")
TRAINABLE, FROZEN = "trainable", "frozen"


@struct.dataclass
class SplitModel:
  """A decoder as (graphdef, prefill tree, decode tree). A pytree of the two trees.

  Attributes:
    graphdef: the static NNX graph definition of the prefill tree (and of the decode
      tree unless `decode_graphdef` is set).
    prefill: `nnx.State` of the module that processes prompts.
    decode: `nnx.State` of the module that generates, or None when tied to `prefill`.
    last_prompt_token: "prefill" or "decode", the tree that runs the last prompt token.
    decode_graphdef: the decode tree's graph definition if it differs from `graphdef`
      (one tree carries LoRA adapters, `jaxsun.lora`); None otherwise.
  """

  graphdef: Any = struct.field(pytree_node=False)
  prefill: nnx.State
  decode: nnx.State | None = None
  last_prompt_token: str = struct.field(pytree_node=False, default="prefill")
  # The decode tree's graph when it differs from the prefill tree's (e.g. LoRA adapters
  # on one tree only, `jaxsun.lora`); None: the same graph.
  decode_graphdef: Any = struct.field(pytree_node=False, default=None)

  def __post_init__(self):
    if self.last_prompt_token not in LAST_PROMPT_TOKEN:
      raise ValueError(f"last_prompt_token={self.last_prompt_token!r} is not one of "
                       f"{LAST_PROMPT_TOKEN}")

  @classmethod
  def from_model(cls, model: Decoder, *, last_prompt_token: str = "prefill") -> SplitModel:
    """A tied split of a base model: one tree serves prefill and decode."""
    if not isinstance(model, Decoder):
      raise TypeError(f"model must be a jaxsun Decoder, got {type(model).__name__}")
    graphdef, state = nnx.split(model)
    return cls(graphdef=graphdef, prefill=state, decode=None,
               last_prompt_token=last_prompt_token)

  @classmethod
  def from_models(cls, prefill_model: Decoder, decode_model: Decoder, *,
                  last_prompt_token: str = "prefill") -> SplitModel:
    """An untied split from two decoders of the same architecture."""
    gd_p, st_p = nnx.split(prefill_model)
    gd_d, st_d = nnx.split(decode_model)
    if gd_p != gd_d:
      raise ValueError("prefill_model and decode_model must have the same architecture "
                       f"(configs {prefill_model.cfg} vs {decode_model.cfg})")
    return cls(graphdef=gd_p, prefill=st_p, decode=st_d, last_prompt_token=last_prompt_token)

  @property
  def tied(self) -> bool:
    return self.decode is None

  @property
  def decode_gd(self):
    """The decode tree's graph definition."""
    if self.decode is None or self.decode_graphdef is None:
      return self.graphdef
    return self.decode_graphdef

  @property
  def decode_state(self) -> nnx.State:
    """The decode tree (the prefill tree itself when tied)."""
    return self.prefill if self.decode is None else self.decode

  @property
  def cfg(self) -> ModelConfig:
    return self.prefill_module().cfg

  def untie(self) -> SplitModel:
    """Two tree slots holding the same arrays (no copy), ready to diverge in training."""
    return self if not self.tied else self.replace(decode=self.prefill)

  def prefill_module(self) -> Decoder:
    return nnx.merge(self.graphdef, self.prefill)

  def decode_module(self) -> Decoder:
    return nnx.merge(self.decode_gd, self.decode_state)


def with_layout(split: SplitModel, scan: bool) -> SplitModel:
  """The split with both trees in the scanned (`scan=True`) or unrolled layer layout.

  Returns `split` itself when it is already in that layout. Tying, `last_prompt_token`
  and a distinct decode graph (adapters on one tree) are kept. Converting copies the
  layer arrays (`jaxsun.nn.decoder.stack_layers`), also those an untied split shares
  between its trees.
  """
  split = check_split(split)
  if split.cfg.scan_layers == scan:
    return split
  gd, pre = nnx.split(decoder_lib.with_layout(split.prefill_module(), scan))
  out = split.replace(graphdef=gd, prefill=pre)
  if not split.tied:
    gd_d, dec = nnx.split(decoder_lib.with_layout(split.decode_module(), scan))
    out = out.replace(decode=dec,
                      decode_graphdef=None if split.decode_graphdef is None else gd_d)
  return out


def check_split(split, arg: str = "split") -> SplitModel:
  """`split` if it is a SplitModel; a clear TypeError otherwise (e.g. a bare Decoder)."""
  if isinstance(split, SplitModel):
    return split
  if isinstance(split, Decoder):
    raise TypeError(f"{arg} must be a jaxsun.SplitModel, got a Decoder; wrap it with "
                    f"jaxsun.SplitModel.from_model(decoder)")
  raise TypeError(f"{arg} must be a jaxsun.SplitModel, got {type(split).__name__}")


def prefill_lengths(split: SplitModel, prompt_lengths: jax.Array) -> jax.Array:
  """How many prompt positions the prefill tree processes (the rest go to decode)."""
  return prompt_lengths - (1 if split.last_prompt_token == "decode" else 0)


def split_forward(split: SplitModel, tokens: jax.Array, boundary: jax.Array, *,
                  return_cache: bool = False, window: tuple[int, int] | None = None,
                  dropout_key: jax.Array | None = None):
  """Teacher-forced forward of (prompt, continuation) sequences through the split.

  Row b is `tokens[b, :boundary[b]]` (prompt) followed by the continuation. Positions
  before the prefill boundary (`boundary`, or `boundary - 1` when
  `last_prompt_token == "decode"`) run through the prefill tree and fill the KV cache;
  the remaining positions run through the decode tree and attend to that cache plus
  their own causal keys. Padding after a continuation is harmless (causal).

  Cost: a tied model runs one plain pass. An untied one runs the prefill tree over
  positions `[0, hi)` and the decode tree over `[lo, S)`, where `window=(lo, hi)` is a
  static promise that `lo <= prefill boundary <= hi` on every row (default `(0, S)`:
  each tree over all S positions). For long prompts and short answers, a tight window
  makes untied training cost about one pass instead of two. The result does not depend
  on the window.

  Args:
    split: the model.
    tokens: i32[B, S] token ids, S <= max_len.
    boundary: i32[B] prompt lengths, 1 <= boundary <= S.
    return_cache: also return the KV cache of all S positions (prefill-tree entries
      below the prefill boundary, decode-tree entries from it on).
    window: static (lo, hi) bounds of the prefill boundary (`prefill_window` computes
      one); ignored by a tied model.
    dropout_key: PRNG key for training-time dropout (LoRA adapters); None: no dropout.

  Returns:
    f32[B, S, V] logits (position t predicts token t + 1), and the cache if asked.
  """
  split = check_split(split)
  pre = split.prefill_module()
  cfg = pre.cfg
  validation.check_tokens("tokens", tokens, cfg.vocab_size)
  b, s = tokens.shape
  if s > cfg.max_len:
    raise ValueError(f"tokens has length {s} > ModelConfig.max_len={cfg.max_len}")
  validation.check_lengths("boundary", boundary, b, 1, s)
  keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
  if split.tied and not return_cache:  # same weights in both phases: one plain pass
    return pre(tokens, mode=Mode.TRAIN, dropout_key=keys[0])[0]

  n_prefill = prefill_lengths(split, boundary.astype(jnp.int32))  # i32[B]
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  full = jnp.full((b,), s, jnp.int32)
  if split.tied:
    logits, cache = pre(tokens, mode=Mode.PREFILL, positions=positions,
                        cache=pre.init_cache(b, s), new_lengths=full, dropout_key=keys[0])
    return logits, cache
  lo, hi = _check_window(window, s)
  lo = min(lo, s - 1)  # every row all prompt: the decode tree still gets one position
  dec = split.decode_module()
  # Prefill tree on [0, hi): every slot is written, only slots < n_prefill stay valid.
  h_pre, cache = pre.hidden(tokens[:, :hi], mode=Mode.PREFILL, positions=positions[:, :hi],
                            cache=pre.init_cache(b, s), new_lengths=n_prefill,
                            dropout_key=keys[0])
  # Decode tree on [lo, S): the write rule keeps slots < n_prefill (the prefill KV).
  h_dec, cache = dec.hidden(tokens[:, lo:], mode=Mode.PREFILL, positions=positions[:, lo:],
                            cache=cache, new_lengths=full, dropout_key=keys[1])
  pre_logits = jnp.pad(pre.logits(h_pre), ((0, 0), (0, s - hi), (0, 0)))  # f32[B, S, V]
  dec_logits = jnp.pad(dec.logits(h_dec), ((0, 0), (lo, 0), (0, 0)))  # f32[B, S, V]
  from_prefill = (positions < n_prefill[:, None])[..., None]  # bool[B, S, 1]
  logits = jnp.where(from_prefill, pre_logits, dec_logits)
  return (logits, cache) if return_cache else logits


WINDOW_BUCKET = 16  # window bounds are rounded to this, so few windows get compiled


def _check_window(window, s: int) -> tuple[int, int]:
  if window is None:
    return 0, s
  lo, hi = window
  if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= s and hi >= 1):
    raise ValueError(f"window={window!r} must be static ints with 0 <= lo <= hi <= {s} "
                     "and hi >= 1")
  return lo, hi


def prefill_window(split: SplitModel, boundary, seq_len: int,
                   bucket: int = WINDOW_BUCKET) -> tuple[int, int] | None:
  """A static `split_forward` window for host-side (numpy) `boundary`, or None if tied.

  The bounds are rounded outwards to multiples of `bucket` (so batches of one dataset
  share a few compiled windows).
  """
  if split.tied:
    return None
  n = np.asarray(prefill_lengths(split, np.asarray(boundary, np.int64)))
  lo = int(n.min()) // bucket * bucket
  hi = min(seq_len, max(1, -(-int(n.max()) // bucket) * bucket))
  return lo, hi


def continuation_mask(boundary: jax.Array, length: int) -> jax.Array:
  """f32[B, S]: 1 where token t is a continuation token (t >= boundary)."""
  return (jnp.arange(length)[None, :] >= boundary[:, None]).astype(jnp.float32)


def next_token_loss(split: SplitModel, tokens: jax.Array, boundary: jax.Array,
                    loss_mask: jax.Array | None = None, **forward_kw) -> jax.Array:
  """Mean next-token cross-entropy over target tokens, through `split_forward`.

  Args:
    split: the model.
    tokens: i32[B, S].
    boundary: i32[B] prompt lengths.
    loss_mask: f32[B, S] weight of each token *as a target*; default: the continuation
      tokens (`t >= boundary`). Position 0 is never a target.
    **forward_kw: `window`, `dropout_key` for `split_forward`.

  Returns:
    Scalar float32 loss.
  """
  total, count = next_token_loss_sums(split, tokens, boundary, loss_mask, **forward_kw)
  return total / jnp.maximum(count, 1.0)


def next_token_loss_sums(split: SplitModel, tokens: jax.Array, boundary: jax.Array,
                         loss_mask: jax.Array | None = None, *,
                         window: tuple[int, int] | None = None,
                         dropout_key: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """(sum of masked next-token cross-entropies, sum of mask weights): f32 scalars.

  The unnormalised form of `next_token_loss`, so that gradient accumulation over
  micro-batches can divide by the token count of the whole batch.
  """
  logits = split_forward(split, tokens, boundary, window=window, dropout_key=dropout_key)
  if loss_mask is None:
    loss_mask = continuation_mask(boundary, tokens.shape[1])
  if loss_mask.shape != tokens.shape:
    raise ValueError(f"loss_mask must have shape {tuple(tokens.shape)}, got "
                     f"{tuple(loss_mask.shape)}")
  mask = loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
  return jnp.sum(ce * mask), jnp.sum(mask)


def _check_trainability(split: SplitModel, trainability: str) -> None:
  if trainability not in TRAINABILITY:
    raise ValueError(f"trainability={trainability!r} is not one of {TRAINABILITY}")
  if split.tied and trainability in ("prefill", "decode"):
    raise ValueError(
        f"trainability={trainability!r} trains one tree and freezes the other, but this "
        "SplitModel is tied (one tree serves both phases). Call split.untie() first.")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def has_adapters(tree) -> bool:
  """Whether a parameter tree holds LoRA adapter parameters (`nnx.LoRAParam`)."""
  return tree is not None and any(
      isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(tree, is_leaf=_is_variable))


def _trains(split: SplitModel, trainability: str) -> dict[str, bool]:
  _check_trainability(split, trainability)
  if split.tied:  # one tree, trained by "both", frozen by "none"
    return {"prefill": trainability == "both", "decode": False}
  return {"prefill": trainability in ("prefill", "both"),
          "decode": trainability in ("decode", "both")}


def param_labels(split: SplitModel, trainability: str) -> SplitModel:
  """The optimizer partition: a SplitModel-shaped tree of "trainable"/"frozen" labels.

  In a trained tree that carries LoRA adapters only the adapters are trainable; its
  base arrays stay frozen (`jaxsun.lora`).
  """
  trains = _trains(split, trainability)

  def label(tree, on):
    if tree is None:
      return None
    adapters = on and has_adapters(tree)

    def lab(v):
      trainable = on and (not adapters or isinstance(v, nnx.LoRAParam))
      return jax.tree.map(lambda _: TRAINABLE if trainable else FROZEN, v)

    return jax.tree.map(lab, tree, is_leaf=_is_variable)

  return split.replace(prefill=label(split.prefill, trains["prefill"]),
                       decode=label(split.decode, trains["decode"]))


def trained_trees(split: SplitModel, trainability: str) -> tuple[str, ...]:
  """Names of the tree slots ("prefill", "decode") that `trainability` trains."""
  return tuple(n for n, on in _trains(split, trainability).items() if on)


def partition(split: SplitModel, trainability: str) -> tuple[dict, dict]:
  """Splits the model into (trainable trees, frozen trees), dicts keyed by slot name.

  The tree-level form of `param_labels`: a trainer keeps optimizer state for (and may
  donate) the trainable dict only, while the frozen dict (possibly shared with other
  task models) is never modified. A trained slot with LoRA adapters appears in both:
  its adapters are trainable, its base arrays frozen. `combine` inverts it.
  """
  names = trained_trees(split, trainability)
  slots = {"prefill": split.prefill} if split.tied else {
      "prefill": split.prefill, "decode": split.decode}
  trainable, frozen = {}, {}
  for n, tree in slots.items():
    if n in names and has_adapters(tree):
      trainable[n], frozen[n] = nnx.split_state(tree, nnx.LoRAParam, ...)
    elif n in names:
      trainable[n] = tree
    else:
      frozen[n] = tree
  return trainable, frozen


def combine(split: SplitModel, trainable: dict, frozen: dict) -> SplitModel:
  """The SplitModel with the trees of `partition(split, ...)` (possibly updated) put back."""
  trees = {}
  for n in ("prefill", "decode"):
    if n in trainable and n in frozen:
      trees[n] = nnx.merge_state(frozen[n], trainable[n])
    elif n in trainable or n in frozen:
      trees[n] = trainable[n] if n in trainable else frozen[n]
  return split.replace(prefill=trees["prefill"], decode=trees.get("decode"))


def make_optimizer(tx: optax.GradientTransformation, split: SplitModel,
                   trainability: str) -> optax.GradientTransformation:
  """`tx` on the trainable trees, zero updates (and no optimizer state) on frozen ones."""
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                               param_labels(split, trainability))


def apply_updates(split: SplitModel, updates: SplitModel, trainability: str) -> SplitModel:
  """`optax.apply_updates` on the trainable trees; frozen trees are returned as-is
  (bitwise: not even `x + 0`, which would turn -0.0 into 0.0)."""
  labels = param_labels(split, trainability)
  return jax.tree.map(lambda p, u, lab: (p + u).astype(p.dtype) if lab == TRAINABLE else p,
                      split, updates, labels)


def make_train_step(tx: optax.GradientTransformation, trainability: str):
  """A jitted `step(split, opt_state, tokens, boundary, loss_mask=None)`.

  Returns `(split, opt_state, loss)`. The optimizer state must come from
  `make_optimizer(tx, split, trainability).init(split)`.
  """
  if trainability not in TRAINABILITY:
    raise ValueError(f"trainability={trainability!r} is not one of {TRAINABILITY}")

  @jax.jit
  def step(split, opt_state, tokens, boundary, loss_mask=None):
    opt = make_optimizer(tx, split, trainability)
    loss, grads = jax.value_and_grad(next_token_loss)(split, tokens, boundary, loss_mask)
    updates, opt_state = opt.update(grads, opt_state, split)
    return apply_updates(split, updates, trainability), opt_state, loss

  return step
