"""Hugging Face Llama / Qwen2 checkpoints <-> jaxsun `ModelConfig` + `SplitModel`.

    split = load_hf("/path/to/Llama-3.2-1B")              # config.json + *.safetensors
    split = load_hf(path, mesh=parallel.make_mesh(fsdp=8))  # each device reads its slice
    save_hf(split, "/path/out")                            # the same layout back

Supported: `LlamaForCausalLM` (Llama 2 / 3 / 3.1 / 3.2, incl. `rope_type: "llama3"`) and
`Qwen2ForCausalLM` (Qwen2 / Qwen2.5: q/k/v biases), GQA, explicit `head_dim`, tied or
untied embeddings, bf16 / f16 / f32 storage, single-file or sharded safetensors. Anything
else (another architecture, `mlp_bias`, o_proj biases, sliding windows, another RoPE type)
is refused with the config key named, never silently approximated.

Conventions. Hugging Face stores a linear layer as `weight[out, in]`; jaxsun as
`kernel[in, out]` (transposed here). Both apply RoPE in the rotate-half layout (HF's
conversion scripts permute Meta's interleaved q/k weights once, at conversion), so q/k
weights map without a permutation. RMSNorm, SwiGLU and the 1/sqrt(head_dim) attention
scale are the same formulas.

An untied split (a SUN or PrefillShare task model) exports as two complete checkpoints,
`<dir>/prefill` and `<dir>/decode` (each loadable by transformers on its own), with a
`jaxsun_split.json` naming the roles; `load_hf_split` reads it back.

Layer layouts: `load_hf(..., scan_layers=True)` builds a scanned model
(`ModelConfig.scan_layers`), reading each device's slice of every layer straight into
the stacked arrays; exporting a scanned model writes the same per-layer tensors
(`model.layers.{i}.…`) as the unrolled one.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jaxsun import parallel
from jaxsun.config import ModelConfig, RopeScaling
from jaxsun.interop import safetensors_io
from jaxsun.interop.safetensors_io import CheckpointError
from jaxsun.nn.decoder import Decoder
from jaxsun.split import SplitModel

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SPLIT_FILE = "jaxsun_split.json"
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Tensors some checkpoints carry that hold no parameters (old Llama conversions).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _get(config: dict, key: str, kind, default: Any = ...):
  if key not in config or config[key] is None:
    if default is ...:
      raise CheckpointError(f"config.json lacks the required key {key!r}")
    return default
  value = config[key]
  if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise CheckpointError(f"config.json key {key!r}={value!r} must be an integer")
  if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
    raise CheckpointError(f"config.json key {key!r}={value!r} must be a number")
  return kind(value)


def architecture(config: dict) -> str:
  """"llama" or "qwen2" from `architectures` / `model_type`; a clear error otherwise."""
  archs = config.get("architectures") or []
  known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
  if known:
    return known[0]
  if archs:
    raise CheckpointError(f"config.json key 'architectures'={archs} is not supported; "
                          f"jaxsun imports {sorted(ARCHITECTURES)}")
  model_type = config.get("model_type")
  if model_type in ARCHITECTURES.values():
    return model_type
  raise CheckpointError(f"config.json key 'model_type'={model_type!r} is not supported; "
                        f"jaxsun imports {sorted(ARCHITECTURES.values())}")


def _rope(config: dict) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from transformers 5's `rope_parameters` or the legacy keys."""
  params = config.get("rope_parameters") or config.get("rope_scaling") or {}
  key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
  if not isinstance(params, dict):
    raise CheckpointError(f"config.json key {key!r}={params!r} must be an object")
  theta = params.get("rope_theta", config.get("rope_theta", 10_000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise CheckpointError(f"config.json key '{key}.rope_type'={rope_type!r} is not "
                          "supported; jaxsun implements 'default' and 'llama3'")
  try:
    scaling = RopeScaling(factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_len=int(params["original_max_position_embeddings"]))
  except KeyError as e:
    raise CheckpointError(f"config.json key '{key}' lacks {e.args[0]!r} for "
                          "rope_type 'llama3'") from None
  return float(theta), scaling


def model_config(config: dict, *, param_dtype: str | None = None,
                 compute_dtype: str | None = None, max_len: int | None = None,
                 scan_layers: bool = False, remat: str = "none") -> ModelConfig:
  """The `ModelConfig` of a Hugging Face `config.json` (a dict).

  Args:
    config: parsed config.json.
    param_dtype: storage dtype of the imported parameters; default: the checkpoint's
      (`dtype` / `torch_dtype`, else float32).
    compute_dtype: matmul input dtype; default: `param_dtype`.
    max_len: longest sequence; default `max_position_embeddings`.
    scan_layers: `ModelConfig.scan_layers` (the layer layout; not in config.json).
    remat: `ModelConfig.remat` (not in config.json).
  """
  arch = architecture(config)
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"config.json key 'hidden_act'={act!r} is not supported "
                          "(SwiGLU with silu only)")
  if config.get("mlp_bias"):
    raise CheckpointError("config.json key 'mlp_bias'=true is not supported")
  if arch == "llama" and config.get("attention_bias"):
    raise CheckpointError("config.json key 'attention_bias'=true (biases on q/k/v and "
                          "o_proj) is not supported for llama")
  if config.get("use_sliding_window"):
    raise CheckpointError("config.json key 'use_sliding_window'=true is not supported")
  stored = config.get("dtype") or config.get("torch_dtype") or "float32"
  if stored not in _DTYPES:
    raise CheckpointError(f"config.json key 'dtype'={stored!r} is not one of "
                          f"{sorted(_DTYPES)}")
  param_dtype = param_dtype or stored
  heads = _get(config, "num_attention_heads", int)
  d_model = _get(config, "hidden_size", int)
  theta, scaling = _rope(config)
  try:
    return ModelConfig(
        name=config.get("_name_or_path") or arch,
        vocab_size=_get(config, "vocab_size", int),
        d_model=d_model,
        n_layers=_get(config, "num_hidden_layers", int),
        n_heads=heads,
        n_kv_heads=_get(config, "num_key_value_heads", int, heads),
        d_ff=_get(config, "intermediate_size", int),
        max_len=max_len or _get(config, "max_position_embeddings", int),
        head_dim=_get(config, "head_dim", int, None),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=arch == "qwen2",
        norm_eps=_get(config, "rms_norm_eps", float, 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype,
        scan_layers=scan_layers,
        remat=remat)
  except ValueError as e:
    raise CheckpointError(f"config.json describes a model jaxsun cannot build: {e}") from None


def hf_config(cfg: ModelConfig, *, dtype: str | None = None, base: dict | None = None
              ) -> dict:
  """A config.json dict for `cfg` (Qwen2 when it has q/k/v biases, else Llama).

  `base` (e.g. the imported checkpoint's config) supplies keys jaxsun does not model
  (token ids, ...); the architecture keys always come from `cfg`.
  """
  arch = "qwen2" if cfg.qkv_bias else "llama"
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_len}
  out = {k: v for k, v in (base or {}).items()
         if k not in ("rope_scaling", "torch_dtype", "transformers_version")}
  out.update({
      "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
      "model_type": arch,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu",
      "rope_parameters": rope,
      "rope_theta": cfg.rope_theta,
      "dtype": dtype or cfg.param_dtype,
  })
  if arch == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  return out


# --- parameter names -------------------------------------------------------------------

_LAYER = {
    ("attn", "q_proj", "kernel"): "self_attn.q_proj.weight",
    ("attn", "k_proj", "kernel"): "self_attn.k_proj.weight",
    ("attn", "v_proj", "kernel"): "self_attn.v_proj.weight",
    ("attn", "o_proj", "kernel"): "self_attn.o_proj.weight",
    ("attn", "q_bias"): "self_attn.q_proj.bias",
    ("attn", "k_bias"): "self_attn.k_proj.bias",
    ("attn", "v_bias"): "self_attn.v_proj.bias",
    ("mlp", "gate_proj", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up_proj", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down_proj", "kernel"): "mlp.down_proj.weight",
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
}


def hf_name(path: tuple) -> tuple[str, bool]:
  """(Hugging Face tensor name, transposed?) of a jaxsun parameter path."""
  if path == ("embed", "embedding"):
    return "model.embed_tokens.weight", False
  if path == ("final_norm", "scale"):
    return "model.norm.weight", False
  if path == ("lm_head", "kernel"):
    return "lm_head.weight", True
  if len(path) >= 3 and path[0] == "layers" and tuple(path[2:]) in _LAYER:
    name = _LAYER[tuple(path[2:])]
    return f"model.layers.{path[1]}.{name}", path[-1] == "kernel"
  raise CheckpointError(
      f"parameter {'.'.join(map(str, path))} has no Hugging Face name (only plain Llama / "
      "Qwen2 decoders export; merge LoRA adapters first with jaxsun.lora.merge_adapters)")


def _stacked(path: tuple) -> bool:
  """Whether a Decoder state path is a scanned model's stacked layer variable."""
  return len(path) >= 2 and path[0] == "layers" and not isinstance(path[1], int)


def hf_names(path: tuple, n_layers: int) -> tuple[list[str], bool]:
  """([Hugging Face names], transposed?): one name, or one per layer of a stacked path."""
  if not _stacked(path):
    name, transposed = hf_name(path)
    return [name], transposed
  names = [hf_name(("layers", i) + tuple(path[1:])) for i in range(n_layers)]
  return [n for n, _ in names], names[0][1]


def _check_shapes(reader: safetensors_io.CheckpointReader, flat, directory: str,
                  tied: bool, n_layers: int) -> None:
  # Some tied checkpoints also store the head; jaxsun's tied head is the embedding.
  expected = {"lm_head.weight"} if tied else set()
  for path, var in flat:
    names, transposed = hf_names(path, n_layers)
    shape = tuple(var.get_value().shape)[1 if _stacked(path) else 0:]  # one layer's
    want = shape[::-1] if transposed else shape
    for name in names:
      expected.add(name)
      got = reader.shape(name)
      if got != want:
        raise CheckpointError(f"tensor {name!r} in {directory} has shape {list(got)}; "
                              f"config.json implies {list(want)}")
  extra = [n for n in reader.names() if n not in expected and not _IGNORED.fullmatch(n)]
  if extra:
    raise CheckpointError(f"checkpoint {directory} has tensors jaxsun does not know "
                          f"(unsupported architecture variant?): {extra[:8]}"
                          f"{' ...' if len(extra) > 8 else ''}")


def _sharding_fn(mesh: Mesh | None, rules) -> Callable:
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    return lambda var: device
  return lambda var: NamedSharding(mesh, parallel.logical_to_spec(
      var.get_metadata().get("out_sharding") or (None,) * len(var.get_value().shape),
      var.get_value().shape, mesh, rules))


def load_decoder_state(directory: str, cfg: ModelConfig, *, mesh: Mesh | None = None,
                       rules=parallel.DEFAULT_RULES):
  """(graphdef, state) of a Decoder with the checkpoint's weights, placed by `mesh`.

  Each array is built with `jax.make_array_from_callback`: a device asks for its own
  slice and only that slice is read from the (memory-mapped) safetensors file. With
  `cfg.scan_layers`, a stacked [L, ...] array's slice is read layer by layer.
  """
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(abstract_state))
  sharding_of = _sharding_fn(mesh, rules)
  with safetensors_io.CheckpointReader(directory) as reader:
    _check_shapes(reader, flat, directory, cfg.tie_embeddings, cfg.n_layers)
    out = []
    for path, var in flat:
      names, transposed = hf_names(path, cfg.n_layers)
      dtype = var.get_value().dtype

      def read_one(name, index, transposed=transposed, dtype=dtype):
        if transposed:  # our [in, out] slice is the HF [out, in] slice, transposed
          return reader.read(name, tuple(index[::-1])).T.astype(dtype)
        return reader.read(name, tuple(index)).astype(dtype)

      def read(index, names=names, stacked=_stacked(path)):
        if not stacked:
          return read_one(names[0], index)
        layers = range(len(names))[index[0]]  # this device's layers, [l, ...]
        return np.stack([read_one(names[l], index[1:]) for l in layers])

      value = jax.make_array_from_callback(tuple(var.get_value().shape), sharding_of(var),
                                           read)
      out.append((path, var.replace(value)))
  return graphdef, nnx.from_flat_state(out)


def load_hf(directory: str, *, param_dtype: str | None = None,
            compute_dtype: str | None = None, max_len: int | None = None,
            mesh: Mesh | None = None, rules=parallel.DEFAULT_RULES,
            last_prompt_token: str = "prefill", scan_layers: bool = False,
            remat: str = "none") -> SplitModel:
  """A tied `SplitModel` from a Hugging Face checkpoint directory.

  Args:
    directory: holds config.json and model.safetensors or a sharded index.
    param_dtype: storage dtype in jaxsun (default: the checkpoint's).
    compute_dtype: matmul dtype (default: `param_dtype`).
    max_len: cap on sequence length (default `max_position_embeddings`).
    mesh: place parameters on this (data, fsdp, tensor) mesh by their logical axes as
      they are read; None: the first device.
    rules: logical-axis rules for `mesh`.
    last_prompt_token: as in `SplitModel`.
    scan_layers: build the scanned layer layout (`ModelConfig.scan_layers`).
    remat: `ModelConfig.remat` of the model.
  """
  cfg = model_config(safetensors_io.read_config(directory), param_dtype=param_dtype,
                     compute_dtype=compute_dtype, max_len=max_len,
                     scan_layers=scan_layers, remat=remat)
  graphdef, state = load_decoder_state(directory, cfg, mesh=mesh, rules=rules)
  return SplitModel(graphdef=graphdef, prefill=state, decode=None,
                    last_prompt_token=last_prompt_token)


def decoder_tensors(state: nnx.State, *, dtype: str | None = None) -> dict[str, np.ndarray]:
  """{HF name: host array [out, in]} of a Decoder's state (either layer layout), in
  `dtype` if given."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    value = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None:
      value = value.astype(_DTYPES[dtype])
    names, transposed = hf_names(path, value.shape[0] if _stacked(path) else 1)
    # A stacked [L, ...] array is sliced on the host: layer i -> model.layers.{i}.
    values = list(value) if _stacked(path) else [value]
    for name, v in zip(names, values):
      out[name] = v.T if transposed else v
  return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(name: str):
  m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
  if m:
    return (1, int(m.group(1)), m.group(2))
  return (0 if name.startswith("model.embed") else 2, 0, name)


def save_hf(model: SplitModel | Decoder, directory: str, *, dtype: str | None = None,
            base_config: dict | None = None, max_shard_bytes: int | None = 5 * 2**30,
            overwrite: bool = False) -> str:
  """Exports a tied split (or a Decoder) as a Hugging Face checkpoint directory.

  Written to a temporary directory and renamed into place, so a failure leaves nothing
  half-written. An untied split needs `save_hf_split`.

  Args:
    model: a tied `SplitModel` or a `Decoder` (LoRA adapters merged).
    directory: the checkpoint directory to create.
    dtype: storage dtype (default: the model's `param_dtype`).
    base_config: config.json keys to carry over (e.g. the imported checkpoint's).
    max_shard_bytes: shard past this size (HF's default is 5 GB); None: one file.
    overwrite: replace an existing directory once the new one is complete.
  """
  if isinstance(model, Decoder):
    cfg, state = model.cfg, nnx.state(model)
  elif isinstance(model, SplitModel):
    if not model.tied:
      raise ValueError("save_hf needs a tied SplitModel; an untied one (SUN / "
                       "PrefillShare task model) is two trees: use save_hf_split")
    cfg, state = model.cfg, model.prefill
  else:
    raise TypeError(f"model must be a SplitModel or Decoder, got {type(model).__name__}")
  if dtype is not None and dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
  tensors = decoder_tensors(state, dtype=dtype)
  return safetensors_io.write_checkpoint(
      directory, hf_config(cfg, dtype=dtype, base=base_config), tensors,
      max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def save_hf_split(split: SplitModel, directory: str, **kwargs) -> str:
  """Exports a split: tied -> one checkpoint; untied -> `prefill/` and `decode/`.

  Both sub-checkpoints are complete Hugging Face models; `jaxsun_split.json` records
  which is which and `last_prompt_token`. The whole directory appears atomically.
  """
  if not isinstance(split, SplitModel):
    raise TypeError(f"split must be a SplitModel, got {type(split).__name__}")
  if split.tied:
    return save_hf(split, directory, **kwargs)
  with safetensors_io.atomic_directory(directory,
                                      overwrite=kwargs.pop("overwrite", False)) as tmp:
    for role, gd, state in (("prefill", split.graphdef, split.prefill),
                            ("decode", split.decode_gd, split.decode)):
      save_hf(nnx.merge(gd, state), os.path.join(tmp, role), **kwargs)
    with open(os.path.join(tmp, SPLIT_FILE), "w") as f:
      json.dump({"prefill": "prefill", "decode": "decode",
                 "last_prompt_token": split.last_prompt_token}, f, indent=2)
  return os.path.abspath(directory)


def load_hf_split(directory: str, **kwargs) -> SplitModel:
  """Reads `save_hf_split` output (or a plain HF checkpoint, as a tied split)."""
  marker = os.path.join(directory, SPLIT_FILE)
  if not os.path.exists(marker):
    return load_hf(directory, **kwargs)
  with open(marker) as f:
    meta = json.load(f)
  kwargs.setdefault("last_prompt_token", meta.get("last_prompt_token", "prefill"))
  p = load_hf(os.path.join(directory, meta["prefill"]), **kwargs)
  d = load_hf(os.path.join(directory, meta["decode"]), **kwargs)
  if p.graphdef != d.graphdef:
    raise CheckpointError(f"{directory}: the prefill and decode checkpoints describe "
                          "different architectures")
  return p.replace(decode=d.prefill)

