"""The Llama-style decoder and its execution modes.

Modes (`Mode`) say how a call uses the KV cache, not which parameter tree runs it:

  * `TRAIN`: no cache; the T tokens attend causally among themselves.
  * `PREFILL`: T tokens are written into a cache (slots `positions`) and attend to it.
  * `DECODE`: one token per row, appended at slot `cache.lengths[b]`.

Tests check that the modes agree: a full `TRAIN` forward equals `PREFILL` of a prefix
followed by token-by-token `DECODE`.

Layer layouts (`ModelConfig.scan_layers`):

  * unrolled (default): `Decoder.layers` is an `nnx.List` of `n_layers` blocks, parameter
    paths `layers/<i>/attn/q_proj/kernel`; the forward is a Python loop (the compiled
    program grows with depth).
  * scanned: `Decoder.layers` is ONE `Block` whose every variable has a leading layer
    axis (logical axis name `"layers"`), paths `layers/attn/q_proj/kernel` with shape
    [n_layers, ...]; the forward runs the block under `jax.lax.scan`, so one block is
    compiled for any depth.

Both layouts compute the same function, initialise to the same values from the same
`rngs`, and keep the KV cache in the per-layer layout (`kv_cache.KVCache.layers`), so
generation and serving do not depend on the layout. `stack_layers` / `unstack_layers`
(modules), `stack_state` / `unstack_state` (an `nnx.State`, e.g. a checkpoint) and
`jaxsun.split.with_layout` (a `SplitModel`) convert between them. Code that addresses
parameters by a per-layer path (LoRA targets, quantization patterns, Hugging Face names)
keeps its `layers/<i>/...` meaning in the scanned layout.

`ModelConfig.remat` wraps the per-block function in `jax.checkpoint` with the policy
`REMAT_POLICIES[remat]`, in both layouts.
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun import kv_cache
from jaxsun import validation
from jaxsun.config import ModelConfig
from jaxsun.nn import attention as attention_lib
from jaxsun.nn import fp8_linear
from jaxsun.nn import layers


class Mode(str, enum.Enum):
  TRAIN = "train"
  PREFILL = "prefill"
  DECODE = "decode"

  @classmethod
  def parse(cls, mode: Mode | str) -> Mode:
    try:
      return cls(mode)
    except ValueError:
      raise ValueError(f"mode={mode!r} is not one of {[m.value for m in cls]}") from None


# The logical axis name of the leading layer axis of a scanned model's block variables.
LAYER_AXIS = "layers"

# Activations `remat="minimal"` saves, tagged with `jax.ad_checkpoint.checkpoint_name` in
# the attention module (projections and output) and in `layers.SwiGLU` (gate, up).
MINIMAL_REMAT_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out",
                       "mlp_gate", "mlp_up")

# `ModelConfig.remat` -> the `jax.checkpoint` policy of a block. "none" runs the block
# without `jax.checkpoint`; "full" saves nothing (the same as `policy=None`).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names(*MINIMAL_REMAT_NAMES),
}


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.norm_eps, param_dtype=cfg.params_dtype, dtype=cfg.dtype)
    self.attn_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.attn = attention_lib.ATTENTION_KINDS[cfg.attention](cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.mlp = layers.SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std,
                             param_dtype=cfg.params_dtype, dtype=cfg.dtype, rngs=rngs)
    fp8_linear.apply(self, cfg.fp8)  # the FP8 quantization rule (`jaxsun.quant.api`)

  def __call__(self, x, positions, *, cache=None, lengths=None, new_lengths=None,
               segment_ids=None, key=None, causal=False):
    k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
    kw = {} if key is None else {"key": k_attn}  # variants that predate `key` still work
    if causal:  # static promise: positions are arange(T), no cache, no segments
      kw["causal"] = True
    h, cache = self.attn(self.attn_norm(x), positions, cache=cache, lengths=lengths,
                         new_lengths=new_lengths, segment_ids=segment_ids, **kw)
    x = x + h
    mlp_kw = {} if key is None else {"key": k_mlp}
    return x + self.mlp(self.mlp_norm(x), **mlp_kw), cache


def _block_body(graphdef, x, layer_state, layer_cache, key, positions, lengths,
                new_lengths, segment_ids, *, causal: bool):
  """One block as a pure function of its state: (x, cache) -> (x, cache).

  The scanned and the unrolled layouts (and every remat policy) run this body, so they
  compute the same thing. `graphdef` and `causal` are static (closed over by callers).
  """
  before = jax.tree.leaves(layer_state)
  blk = nnx.merge(graphdef, layer_state)
  x, layer_cache = blk(x, positions, cache=layer_cache, lengths=lengths,
                       new_lengths=new_lengths, segment_ids=segment_ids, key=key,
                       causal=causal)
  # The body's outputs are (x, cache) only: a block that assigned to one of its variables
  # would lose the update here (the forward must be pure; state updated in training
  # steps goes through `jaxsun.nn.step_state`). Fail loudly instead of silently.
  after = jax.tree.leaves(nnx.state(blk))
  if len(after) != len(before) or any(a is not b for a, b in zip(after, before)):
    raise RuntimeError("a decoder block assigned to one of its variables during the "
                       "forward pass; the forward must be pure (see jaxsun.nn.step_state "
                       "for state that training steps update)")
  return x, layer_cache


@functools.partial(jax.jit, static_argnums=0)
def _attention_step(graphdef, state, x, positions, segment_ids):
  """(a block's output, its effective attention weights f32[B, H, T, T]), compiled once
  per block structure."""
  blk = nnx.merge(graphdef, state)
  w = blk.attn.attention_weights(blk.attn_norm(x), positions, segment_ids)
  return blk(x, positions, segment_ids=segment_ids)[0], w


def _remat(fn, remat: str, *, prevent_cse: bool):
  """`fn` under `jax.checkpoint` with `REMAT_POLICIES[remat]` ("none": `fn` itself)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"ModelConfig.remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
  if remat == "none":
    return fn
  # Under scan, CSE cannot merge the recomputation into the forward, and prevent_cse's
  # optimisation barriers would only cost (as `jax.checkpoint`'s documentation advises).
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


class Decoder(nnx.Module):
  """Token embedding -> `n_layers` blocks -> final RMSNorm -> LM head (tied or not).

  With `cfg.scan_layers`, `layers` is one `Block` holding every layer's variables on a
  leading axis (see the module docstring); otherwise an `nnx.List` of blocks. A scanned
  model is built block by block and then stacked (so both layouts get the same values
  from the same `rngs`); for a large model, build it under `jax.jit` or
  `nnx.eval_shape` so that the unstacked blocks are never materialised side by side.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    self.embed = layers.Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std,
                                  param_dtype=cfg.params_dtype, dtype=cfg.dtype, rngs=rngs)
    # Built block by block in both layouts, so the same `rngs` give the same values.
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
    self.layers = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                                     param_dtype=cfg.params_dtype, dtype=cfg.dtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"),
                                   std=cfg.init_std, param_dtype=cfg.params_dtype,
                                   dtype=cfg.dtype, rngs=rngs)

  def init_cache(self, batch: int, max_len: int | None = None) -> kv_cache.KVCache:
    """An empty cache of `max_len` slots (default `cfg.max_len`) for `batch` rows."""
    cfg = self.cfg
    max_len = cfg.max_len if max_len is None else max_len
    validation.check_positive_int("batch", batch)
    validation.check_positive_int("max_len", max_len)
    if max_len > cfg.max_len:
      raise ValueError(f"max_len={max_len} exceeds ModelConfig.max_len={cfg.max_len}")
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
      # The variant's state does not depend on parameters: build it once from the stacked
      # block, then give each layer its own buffers (a donated cache must not alias).
      state = self.layers.attn.init_state(batch, max_len)
      states = [state] + [jax.tree.map(jnp.copy, state) for _ in range(cfg.n_layers - 1)]
    else:
      states = [blk.attn.init_state(batch, max_len) for blk in self.layers]
    return kv_cache.KVCache(
        layers=tuple(
            kv_cache.LayerCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                                state=st)
            for st in states),
        lengths=jnp.zeros((batch,), jnp.int32))

  def hidden(self, tokens: jax.Array, *, mode: Mode | str = Mode.TRAIN,
             positions: jax.Array | None = None, cache: kv_cache.KVCache | None = None,
             new_lengths: jax.Array | None = None, segment_ids: jax.Array | None = None,
             dropout_key: jax.Array | None = None):
    """Runs the blocks; returns (hidden [B, T, D] before the final norm, cache).

    Args:
      tokens: i32[B, T] token ids in [0, vocab_size).
      mode: `Mode.TRAIN` (no cache), `Mode.PREFILL` or `Mode.DECODE` (T == 1).
      positions: i32[B, T] absolute positions. Default: `arange(T)` in train mode,
        `cache.lengths[:, None] + arange(T)` with a cache.
      cache: the KV cache (required for PREFILL/DECODE, forbidden for TRAIN).
      new_lengths: i32[B] valid slots after the call (e.g. prompt lengths of a padded
        batch). Default: `max(cache.lengths, positions[:, -1] + 1)`.
      segment_ids: i32[B, T] train mode only; attention stays within a segment.
      dropout_key: PRNG key for training-time dropout in adapter layers (`jaxsun.lora`);
        None (inference): no dropout. Layer i uses `fold_in(dropout_key, i)` in both
        layouts.

    In the scanned layout the per-layer caches are stacked into scan inputs and the
    outputs unstacked again, which costs one copy of the cache per call (train mode has
    no cache); the cache's per-layer layout is the same in both layouts.
    """
    mode = Mode.parse(mode)
    cfg = self.cfg
    default_positions = positions is None
    validation.check_tokens("tokens", tokens, cfg.vocab_size)
    b, t = tokens.shape
    if mode is Mode.TRAIN:
      if cache is not None:
        raise ValueError("mode='train' runs without a KV cache; pass cache=None "
                         "(or use mode='prefill' to build one)")
      if t > cfg.max_len:
        raise ValueError(f"tokens has length {t} > ModelConfig.max_len={cfg.max_len}")
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
      if cache is None:
        raise ValueError(f"mode={mode.value!r} needs a KV cache (Decoder.init_cache)")
      if segment_ids is not None:
        raise ValueError("segment_ids is only supported in mode='train'")
      if mode is Mode.DECODE and t != 1:
        raise ValueError(f"mode='decode' takes one token per row; tokens has shape {tokens.shape}")
      if cache.batch_size != b:
        raise ValueError(f"cache has batch {cache.batch_size} but tokens has batch {b}")
      if t > cache.max_len:
        raise ValueError(f"tokens has length {t} > cache max_len={cache.max_len}")
      if positions is None:
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    validation.check_int_array("positions", positions, (b, t))
    if cache is not None:
      if new_lengths is None:
        new_lengths = jnp.maximum(cache.lengths, positions[:, -1] + 1)
      validation.check_int_array("new_lengths", new_lengths, (b,))
      new_lengths = new_lengths.astype(jnp.int32)

    # The mask is the plain causal triangle: fused kernels can skip it (cuDNN, splash).
    causal = mode is Mode.TRAIN and default_positions and segment_ids is None
    x = self.embed(tokens)
    lengths = None if cache is None else cache.lengths
    if cfg.scan_layers:
      x, new_layers = self._scan_blocks(x, positions, cache, lengths, new_lengths,
                                        segment_ids, dropout_key, causal)
    else:
      new_layers = []
      for i, blk in enumerate(self.layers):
        graphdef, layer_state = nnx.split(blk)
        body = _remat(functools.partial(_block_body, graphdef, causal=causal), cfg.remat,
                      prevent_cse=True)
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        x, layer_cache = body(x, layer_state, None if cache is None else cache.layers[i],
                              key, positions, lengths, new_lengths, segment_ids)
        new_layers.append(layer_cache)
    if cache is None:
      return x, None
    return x, kv_cache.KVCache(layers=tuple(new_layers), lengths=new_lengths)

  def _scan_blocks(self, x, positions, cache, lengths, new_lengths, segment_ids,
                   dropout_key, causal):
    """The stacked block under `jax.lax.scan`; returns (x, per-layer caches or Nones)."""
    n = self.cfg.n_layers
    graphdef, stacked = nnx.split(self.layers)  # every leaf [L, ...]
    body = _remat(functools.partial(_block_body, graphdef, causal=causal), self.cfg.remat,
                  prevent_cse=False)

    def step(x, xs):
      layer_state, layer_cache, i = xs
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      x, layer_cache = body(x, layer_state, layer_cache, key, positions, lengths,
                            new_lengths, segment_ids)
      return x, layer_cache

    # The per-layer caches travel as scan inputs/outputs: [L, B, S, Hkv, hd] each.
    stacked_cache = None if cache is None else stack_trees(cache.layers)
    x, out_cache = jax.lax.scan(step, x, (stacked, stacked_cache, jnp.arange(n)))
    if cache is None:
      return x, [None] * n
    return x, unstack_trees(out_cache, n)

  def attention_weights(self, tokens: jax.Array, *,
                        segment_ids: jax.Array | None = None) -> jax.Array:
    """Every layer's effective attention weights in train mode: f32[L, B, H, T, T].

    For `jaxsun.analysis` (entropy, first-token mass, per-query mass, head diversity).
    Each kind reports the weights its naive path multiplies V by (`Attention.weights`:
    affine's alpha * softmax + beta, the sink's shrunken rows); gates act on the output
    and are not included. `layer_attention_weights` yields them one layer at a time.

    Args:
      tokens: i32[B, T] token ids.
      segment_ids: i32[B, T] optional packed-sequence segments.
    """
    return jnp.stack(list(self.layer_attention_weights(tokens, segment_ids=segment_ids)))

  def layer_attention_weights(self, tokens: jax.Array, *,
                              segment_ids: jax.Array | None = None):
    """Yields each layer's f32[B, H, T, T] weights in turn (one layer held at a time:
    the paper-scale analysis would need tens of GB for all of them at once)."""
    validation.check_tokens("tokens", tokens, self.cfg.vocab_size)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    blocks = (unstack_module(self.layers, self.cfg.n_layers) if self.cfg.scan_layers
              else list(self.layers))
    x = self.embed(tokens)
    for blk in blocks:
      graphdef, state = nnx.split(blk)
      x, w = _attention_step(graphdef, state, x, positions, segment_ids)
      yield w


  def logits(self, h: jax.Array) -> jax.Array:
    """Final norm + LM head: [..., D] -> f32[..., V]."""
    h = self.final_norm(h)
    if self.cfg.tie_embeddings:
      return self.embed.attend(h)
    return self.lm_head(h, out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, *, mode: Mode | str = Mode.TRAIN, **kwargs):
    """Returns (logits f32[B, T, V], cache or None). Keyword args as in `hidden`."""
    h, cache = self.hidden(tokens, mode=mode, **kwargs)
    return self.logits(h), cache


# --- layer layouts --------------------------------------------------------------------


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _layer_sharding(sharding, add: bool):
  """An abstract leaf's NamedSharding with a replicated layer axis added or removed."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding  # None, or one device: the same for any rank
  spec = tuple(sharding.spec)
  spec = (None,) + spec if add else spec[1:]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _stack_leaves(xs: Sequence[Any]):
  if isinstance(xs[0], jax.ShapeDtypeStruct):  # abstract trees (restore templates)
    return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype,
                                sharding=_layer_sharding(xs[0].sharding, True))
  return jnp.stack(xs)


def _index_leaf(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype,
                                sharding=_layer_sharding(x.sharding, False))
  return x[i]


def stack_trees(trees: Sequence[Any]) -> Any:
  """Stacks same-structured pytrees leaf-wise on a new leading (layer) axis.

  `nnx.Variable`s keep their type and metadata; a variable with logical axes
  (`out_sharding`) gets `LAYER_AXIS` in front of them. Leaves may be arrays or
  `jax.ShapeDtypeStruct`s; empty nodes (None, optax's `MaskedNode`) stay as they are.

  Raises:
    ValueError: the trees differ in structure (e.g. adapters or quantized layers on some
      layers only), so they have no stacked form.
  """
  trees = list(trees)
  if not trees:
    raise ValueError("stack_trees needs at least one tree")
  structs = [jax.tree.structure(t) for t in trees]
  for i, st in enumerate(structs[1:], 1):
    if st != structs[0]:
      raise ValueError(
          f"layer {i} differs in structure from layer 0, so the layers cannot be stacked "
          "(the scanned layout needs identical blocks: e.g. adapt or quantize every "
          f"layer, or use ModelConfig.scan_layers=False).\nlayer 0: {structs[0]}\n"
          f"layer {i}: {st}")

  def one(*leaves):
    if not _is_variable(leaves[0]):
      return _stack_leaves(leaves)
    value = jax.tree.map(lambda *xs: _stack_leaves(xs), *[v.get_raw_value() for v in leaves])
    axes = leaves[0].get_metadata().get("out_sharding")
    meta = {"out_sharding": (LAYER_AXIS,) + tuple(axes)} if axes else {}
    return leaves[0].replace(value, **meta)

  return jax.tree.map(one, *trees, is_leaf=_is_variable)


def unstack_trees(tree: Any, n: int) -> list[Any]:
  """The inverse of `stack_trees`: `n` trees, the i-th holding slice i of every leaf."""

  def one(i):
    def f(x):
      if not _is_variable(x):
        return _index_leaf(x, i)
      value = jax.tree.map(lambda a: _index_leaf(a, i), x.get_raw_value())
      axes = x.get_metadata().get("out_sharding")
      meta = {"out_sharding": tuple(axes[1:])} if axes and axes[0] == LAYER_AXIS else {}
      return x.replace(value, **meta)

    return jax.tree.map(f, tree, is_leaf=_is_variable)

  return [one(i) for i in range(n)]


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module whose variables stack those of `modules` (same graph) on axis 0."""
  splits = [nnx.split(m) for m in modules]
  graphdef = splits[0][0]
  for i, (gd, _) in enumerate(splits[1:], 1):
    if gd != graphdef:
      raise ValueError(
          f"layer {i} differs in structure from layer 0 (module types or static "
          "attributes), so the layers cannot be stacked; the scanned layout needs "
          "identical blocks (e.g. adapt or quantize every layer, or use "
          "ModelConfig.scan_layers=False)")
  return nnx.merge(graphdef, stack_trees([st for _, st in splits]))


def unstack_module(module: nnx.Module, n: int) -> list[nnx.Module]:
  """`n` modules, the i-th holding slice i of every variable of a stacked module."""
  graphdef, state = nnx.split(module)
  return [nnx.merge(graphdef, st) for st in unstack_trees(state, n)]


def _fresh(model: Decoder) -> Decoder:
  """New module and variable objects around the same arrays (nothing is copied)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def stack_layers(model: Decoder) -> Decoder:
  """The scanned-layout Decoder (`cfg.scan_layers=True`) with `model`'s values.

  Generic over the blocks' modules (adapters, quantized or FP8 layers, attention
  variants' extra variables) as long as every layer has the same structure. The layer
  arrays are copied into stacked ones; the other arrays are shared with `model`.
  """
  if not isinstance(model, Decoder):
    raise TypeError(f"model must be a jaxsun Decoder, got {type(model).__name__}")
  if model.cfg.scan_layers:
    raise ValueError("model is already in the scanned layout (ModelConfig.scan_layers)")
  out = _fresh(model)
  out.layers = stack_modules(list(out.layers))
  out.cfg = model.cfg.replace(scan_layers=True)
  return out


def unstack_layers(model: Decoder) -> Decoder:
  """The unrolled-layout Decoder (`cfg.scan_layers=False`) with `model`'s values."""
  if not isinstance(model, Decoder):
    raise TypeError(f"model must be a jaxsun Decoder, got {type(model).__name__}")
  if not model.cfg.scan_layers:
    raise ValueError("model is already in the unrolled layout (ModelConfig.scan_layers "
                     "is False)")
  out = _fresh(model)
  out.layers = nnx.List(unstack_module(out.layers, model.cfg.n_layers))
  out.cfg = model.cfg.replace(scan_layers=False)
  return out


def with_layout(model: Decoder, scan: bool) -> Decoder:
  """`model` in the requested layout (itself if it already is)."""
  if model.cfg.scan_layers == scan:
    return model
  return stack_layers(model) if scan else unstack_layers(model)


def state_is_scanned(state) -> bool:
  """Whether a Decoder's state (an `nnx.State` or mapping) is in the scanned layout."""
  layers_ = state["layers"]
  return not all(isinstance(k, int) or (isinstance(k, str) and k.isdigit())
                 for k in layers_.keys())


def _replace_layers(state, layers_):
  if isinstance(state, nnx.State):  # keep State's raw nested-dict form (as nnx.split's)
    out = nnx.State(dict(state.raw_mapping))
    out["layers"] = layers_
    return out
  return type(state)({**state, "layers": layers_})


def stack_state(state):
  """A Decoder state (e.g. parameters, gradients or optimizer moments restored from a
  checkpoint) converted from the unrolled to the scanned layout.

  `state["layers"]` maps layer indices to per-layer subtrees; the result holds one
  stacked subtree instead (as `nnx.state(stack_layers(model))`).
  """
  if state_is_scanned(state):
    raise ValueError("state is already in the scanned layout")
  layers_ = state["layers"]
  keys = sorted(layers_.keys(), key=int)
  return _replace_layers(state, stack_trees([layers_[k] for k in keys]))


def unstack_state(state, n_layers: int | None = None):
  """The inverse of `stack_state`: a scanned Decoder state in the unrolled layout.

  Args:
    state: the scanned state.
    n_layers: the number of layers; default: the leading size of the layer arrays.
  """
  if not state_is_scanned(state):
    raise ValueError("state is already in the unrolled layout")
  layers_ = state["layers"]
  if n_layers is None:
    leaves = jax.tree.leaves(layers_)
    if not leaves:
      raise ValueError("cannot infer n_layers from a state without arrays; pass it")
    n_layers = leaves[0].shape[0]
  per_layer = unstack_trees(layers_, n_layers)
  if isinstance(layers_, nnx.State):
    inner = nnx.State({})
    for i, t in enumerate(per_layer):
      inner[i] = t  # stores the raw mapping
  else:
    inner = type(layers_)(enumerate(per_layer))
  return _replace_layers(state, inner)
