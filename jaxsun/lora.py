"""LoRA adapters on one tree of a split: low-rank updates over frozen, shared base arrays.

    cfg = LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=r"layers/\\d+/(attn|mlp)/.*")
    task = add_adapters(base.untie(), "prefill", cfg, key)   # SUN with LoRA
    trainer = Trainer(task, TrainConfig(steps=..., trainability="prefill"))
    merged = merge_adapters(trainer.split)                    # plain Linears again

A targeted `Linear` (matched by `targets`, a regular expression over its path such as
"layers/0/attn/q_proj") becomes a `LoRALinear`: `y = x W + (alpha / rank) · drop(x) A B`,
with `A: f32[in, rank]` ~ N(0, 1/in) and `B: f32[rank, out] = 0`, so an adapted model
starts exactly equal to its base. The adapters are `nnx.LoRAParam`s: in a trained tree
that carries them, `jaxsun.split.partition` makes only the adapters trainable and keeps
the base arrays frozen. Adding adapters copies nothing: the base arrays of the adapted
tree are the very arrays of the base tree (tests check identity), so a task model costs
its adapters only and the frozen tree can be shared.

Dropout acts on the adapter's input, only when the trainer passes a dropout key
(`Decoder.hidden(dropout_key=...)`); evaluation and generation never drop.

Scanned models (`ModelConfig.scan_layers`): `targets` keeps its per-layer meaning
("layers/3/attn/q_proj"). A dense layer of the stacked block is adapted when the regex
matches its path for every layer i (some layers only: a ValueError, since the stacked
block has one structure); its adapter is stacked too (`A: f32[L, in, rank]`), with the
values the unrolled layout would get from the same key, and the base arrays are still
shared, not copied.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun.nn.decoder import Decoder
from jaxsun.nn.fp8_linear import Fp8Linear
from jaxsun.nn.layers import Linear
from jaxsun.split import SplitModel, check_split

DEFAULT_TARGETS = r"layers/\d+/(attn|mlp)/\w+_proj"
SLOTS = ("prefill", "decode", "both")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which layers get adapters, and their shape.

  Attributes:
    rank: inner dimension r of `A: [in, r]` and `B: [r, out]`.
    alpha: the update is scaled by `alpha / rank`.
    dropout: dropout rate on the adapter input during training, in [0, 1).
    targets: regular expression, matched in full against a dense layer's path
      ("layers/0/attn/q_proj", "lm_head").
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRAConfig.rank={self.rank!r} must be an integer >= 1")
    if not self.alpha > 0:
      raise ValueError(f"LoRAConfig.alpha={self.alpha!r} must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRAConfig.dropout={self.dropout!r} must be in [0, 1)")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"LoRAConfig.targets={self.targets!r} is not a regular "
                       f"expression: {e}") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoRALinear(nnx.Module):
  """`base(x) + (alpha / rank) · drop(x) @ A @ B` around a frozen dense layer.

  Args:
    base: the wrapped `Linear` (or `Fp8Linear`); its arrays are kept, not copied. In a
      scanned model's stacked block its kernel is f[L, in, out].
    cfg: rank, alpha, dropout.
    key: PRNG key for A's initialisation; for a stacked base, L keys (one per layer).
  """

  takes_dropout_key = True

  def __init__(self, base: Linear | Fp8Linear, cfg: LoRAConfig, key: jax.Array):
    self.base = base
    self.in_features, self.out_features = base.in_features, base.out_features
    self.scale, self.dropout, self.rank = cfg.scale, cfg.dropout, cfg.rank
    lead = tuple(base.kernel.shape[:-2])  # (L,) in a scanned model's stacked block
    axes = base.kernel.get_metadata().get("out_sharding") or (None,) * (len(lead) + 2)

    def init_a(k):  # f32[in, r]
      a = jax.random.normal(k, (self.in_features, cfg.rank), jnp.float32)
      return a / jnp.sqrt(self.in_features)

    a = jax.vmap(init_a)(key) if lead else init_a(key)  # f32[*lead, in, r]
    self.lora_a = nnx.LoRAParam(a, out_sharding=tuple(axes[:-1]) + (None,),
                                eager_sharding=False)
    self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (cfg.rank, self.out_features), jnp.float32),
                                out_sharding=tuple(axes[:-2]) + (None, axes[-1]),
                                eager_sharding=False)

  def delta(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """The adapter's output f32[..., out] (dropout on its input when `key` is given)."""
    if key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    h = jnp.dot(x, self.lora_a[...].astype(x.dtype), preferred_element_type=jnp.float32)
    return self.scale * jnp.dot(h, self.lora_b[...], preferred_element_type=jnp.float32)

  def __call__(self, x: jax.Array, out_dtype=None, *, key: jax.Array | None = None):
    y = self.base(x) if out_dtype is None else self.base(x, out_dtype=out_dtype)
    return (y.astype(jnp.float32) + self.delta(x, key)).astype(y.dtype)

  def merged(self) -> Linear:
    """A plain `Linear` with kernel `W + scale · A @ B` (in float32, then W's dtype)."""
    if not isinstance(self.base, Linear):
      raise TypeError(f"only adapters over a Linear can be merged; this one wraps a "
                      f"{type(self.base).__name__}")
    w = self.base.kernel[...]
    update = self.scale * (self.lora_a[...] @ self.lora_b[...])  # batched when stacked
    out = nnx.clone(self.base)
    out.kernel = nnx.Param((w.astype(jnp.float32) + update).astype(w.dtype),
                           **_sharding_meta(self.base.kernel))
    return out


def _sharding_meta(var) -> dict:
  meta = var.get_metadata()
  return {k: meta[k] for k in ("out_sharding", "eager_sharding") if k in meta}


def _path(path) -> str:
  return "/".join(map(str, path))


def _get(root, path):
  for p in path:
    root = root[p] if isinstance(p, int) else getattr(root, p)
  return root


def _set(root, path, value) -> None:
  parent = _get(root, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _layer_paths(model: Decoder, path: tuple) -> list[tuple]:
  """The per-layer paths a module path stands for: itself, or in a scanned model's
  stacked block ("layers", "attn", ...) the paths ("layers", i, "attn", ...)."""
  if model.cfg.scan_layers and path and path[0] == "layers":
    return [("layers", i) + tuple(path[1:]) for i in range(model.cfg.n_layers)]
  return [path]


def _targets(model: Decoder, targets: str) -> list[tuple[tuple, list[int]]]:
  """[(module path, indices of its layers among all targets in unrolled order)].

  The indices are what the unrolled layout enumerates (layer by layer), so a scanned
  model's adapters get the same keys, hence the same values, as the unrolled model's.
  """
  regex = re.compile(targets)
  dense = [p for p, m in nnx.iter_modules(model)
           if isinstance(m, (Linear, Fp8Linear)) and not _inside_adapter(model, p)]
  # The unrolled order: the stacked block's layers expand, layer-major, in place.
  in_block = [p for p in dense if len(_layer_paths(model, p)) > 1]
  order = []
  for p in dense:
    if p not in in_block:
      order.append((p, p))
    elif p == in_block[0]:
      order.extend((q, lp) for lp_all in zip(*(_layer_paths(model, q) for q in in_block))
                   for q, lp in zip(in_block, lp_all))
  matched = [(p, lp) for p, lp in order if regex.fullmatch(_path(lp))]
  if not matched:
    names = sorted(_path(lp) for _, lp in order)
    raise ValueError(f"LoRAConfig.targets={targets!r} matches no dense layer; dense "
                     f"layers are e.g. {names[:6]}")
  found: dict[tuple, list[int]] = {}
  for i, (p, _) in enumerate(matched):
    found.setdefault(p, []).append(i)
  for p, idx in found.items():
    if len(idx) != len(_layer_paths(model, p)):
      raise ValueError(
          f"LoRAConfig.targets={targets!r} matches {_path(p)} in {len(idx)} of "
          f"{model.cfg.n_layers} layers; a scanned model (ModelConfig.scan_layers) stacks "
          "identical blocks, so target every layer or unstack the model first "
          "(jaxsun.nn.decoder.unstack_layers)")
  return list(found.items())


def target_paths(model: Decoder, targets: str) -> list[tuple]:
  """Paths of the dense layers (`Linear`, `Fp8Linear`) whose path matches `targets`.

  In a scanned model a path of the stacked block ("layers/attn/q_proj") stands for all
  its layers and is returned when `targets` matches every per-layer path
  ("layers/<i>/attn/q_proj").
  """
  return [p for p, _ in _targets(model, targets)]


def _inside_adapter(model, path) -> bool:
  return any(isinstance(_get(model, path[:i]), LoRALinear) for i in range(1, len(path)))


def adapt_module(model: Decoder, cfg: LoRAConfig, key: jax.Array) -> Decoder:
  """A new module graph with adapters on the targeted layers; base arrays are shared."""
  if not isinstance(model, Decoder):
    raise TypeError(f"model must be a jaxsun Decoder, got {type(model).__name__}")
  if any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)):
    raise ValueError("this tree already carries LoRA adapters")
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)  # fresh modules around the same arrays
  for path, idx in _targets(out, cfg.targets):
    keys = [jax.random.fold_in(key, i) for i in idx]
    stacked = len(_layer_paths(out, path)) > 1
    _set(out, path, LoRALinear(_get(out, path), cfg, jnp.stack(keys) if stacked else keys[0]))
  return out


def add_adapters(split: SplitModel, slot: str, cfg: LoRAConfig, key: jax.Array
                 ) -> SplitModel:
  """The split with adapters on one tree: "prefill" (SUN), "decode" (PrefillShare), or
  "both" (the tied tree of full fine-tuning, or each tree of an untied split).

  Args:
    split: the base task model (untie it first for "prefill"/"decode").
    slot: which tree gets adapters.
    cfg: the adapters.
    key: PRNG key for the adapters' initialisation.
  """
  split = check_split(split)
  if slot not in SLOTS:
    raise ValueError(f"slot={slot!r} is not one of {SLOTS}")
  if split.tied and slot != "both":
    raise ValueError(f"slot={slot!r} adapts one tree of two, but this SplitModel is tied; "
                     "call split.untie() first (or use slot='both')")
  k_pre, k_dec = jax.random.split(key)
  base_decode_gd = split.decode_gd
  out = split
  if slot in ("prefill", "both"):
    gd, st = nnx.split(adapt_module(split.prefill_module(), cfg, k_pre))
    out = out.replace(graphdef=gd, prefill=st)
  if not split.tied:
    if slot in ("decode", "both"):
      gd, st = nnx.split(adapt_module(split.decode_module(), cfg, k_dec))
      out = out.replace(decode=st, decode_graphdef=gd)
    else:
      out = out.replace(decode_graphdef=base_decode_gd)
  return out


def _merge_module(model: Decoder) -> Decoder:
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)
  paths = [p for p, m in nnx.iter_modules(out) if isinstance(m, LoRALinear)]
  for path in paths:
    _set(out, path, _get(out, path).merged())
  return out


def merge_adapters(split: SplitModel) -> SplitModel:
  """The split with every adapter folded into its base kernel (`W + scale · A B`), as
  plain Linears: same logits, no adapter cost at inference."""
  split = check_split(split)
  gd, st = nnx.split(_merge_module(split.prefill_module()))
  out = split.replace(graphdef=gd, prefill=st)
  if not split.tied:
    gd_d, st_d = nnx.split(_merge_module(split.decode_module()))
    out = out.replace(decode=st_d, decode_graphdef=None if gd_d == gd else gd_d)
  return out


def adapter_count(split: SplitModel) -> int:
  """Number of adapter parameters in the split."""
  return int(sum(v.size for v in jax.tree.leaves(
      nnx.filter_state(split.prefill, nnx.LoRAParam)) +
      ([] if split.tied else jax.tree.leaves(nnx.filter_state(split.decode, nnx.LoRAParam)))))
