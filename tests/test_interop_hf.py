"""Hugging Face checkpoints: parity with transformers' golden logits, lossless round
trips, untied splits, and clear errors for bad checkpoints.

The checkpoints and golden logits in tests/testdata/hf were written by transformers
(versions in VERSIONS.json) with scripts/make_hf_goldens.py; no torch is needed here.
"""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun import interop
from jaxsun import lora
from jaxsun.interop import hf
from jaxsun.interop import safetensors_io
from jaxsun.interop.safetensors_io import CheckpointError

DATA = pathlib.Path(__file__).parent / "testdata" / "hf"
MODELS = ("llama_untied", "llama3_scaled", "qwen2", "llama_bytes")


def model_dir(name):
  if name == "llama_bytes":  # shipped with the package
    from jaxsun.data import paths  # pylint: disable=g-import-not-at-top
    return paths.data_root() / "checkpoints" / name
  return DATA / name


def golden(name):
  g = np.load(model_dir(name) / "golden.npz")
  return g["tokens"], g["logits"]


def logits_of(split, tokens):
  return np.asarray(jax.jit(lambda s, t: s.prefill_module()(t)[0])(split, jnp.asarray(tokens)))


def mean_kl(ref, got):
  """Mean over tokens of KL(ref || got), from logits, in float64 (numpy)."""
  def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  lp, lq = log_softmax(ref), log_softmax(got)
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def copy_model(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(DATA / name, dst)
  return dst


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name):
  tokens, ref = golden(name)
  split = interop.load_hf(str(model_dir(name)), param_dtype="float32")
  got = logits_of(split, tokens)
  assert got.shape == ref.shape
  assert np.max(np.abs(got - ref)) <= 1e-4
  assert abs(mean_kl(ref, got)) <= 1e-6
  assert np.max(np.abs(ref)) > 1.0  # logits are not trivially small


def test_checkpoints_cover_the_conventions():
  cfgs = {n: hf.model_config(safetensors_io.read_config(str(model_dir(n)))) for n in MODELS}
  assert not cfgs["llama_untied"].tie_embeddings and cfgs["llama_untied"].head_dim == 16
  assert cfgs["llama_untied"].q_dim != cfgs["llama_untied"].d_model  # explicit head_dim
  assert cfgs["llama3_scaled"].rope_scaling == jaxsun.RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=32)
  assert cfgs["llama3_scaled"].param_dtype == "bfloat16"  # stored bf16
  assert cfgs["llama3_scaled"].tie_embeddings and cfgs["llama3_scaled"].n_kv_heads == 1
  assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].tie_embeddings
  tokens, _ = golden("llama3_scaled")
  assert tokens.shape[1] >= 3 * cfgs["llama3_scaled"].rope_scaling.original_max_len
  assert os.path.exists(DATA / "llama3_scaled" / safetensors_io.INDEX_FILE)  # sharded
  for n, cfg in cfgs.items():  # the parameter-count formula, biases included
    with safetensors_io.CheckpointReader(str(model_dir(n))) as r:
      assert cfg.num_params() == sum(int(np.prod(r.shape(t))) for t in r.names()), n


def test_llama3_scaling_is_what_makes_the_match():
  """Control: the same weights with plain RoPE miss the golden logits by far."""
  tokens, ref = golden("llama3_scaled")
  split = interop.load_hf(str(DATA / "llama3_scaled"), param_dtype="float32")
  plain = split.prefill_module()
  for blk in plain.layers:
    blk.attn.rope_scaling = None
  got = np.asarray(plain(jnp.asarray(tokens))[0])
  assert np.max(np.abs(got - ref)) > 1e-1


def test_rope_inv_freq_matches_the_llama3_formula():
  s = jaxsun.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_len=8192)
  got = np.asarray(jaxsun.nn.layers.rope_inv_freq(128, 500_000.0, s), np.float64)
  base = 1.0 / 500_000.0 ** (np.arange(64) / 64)
  out = []
  for f in base:  # Meta's reference loop (llama-models, apply_scaling), in float64
    wavelen = 2 * np.pi / f
    if wavelen < 8192 / 4.0:
      out.append(f)
    elif wavelen > 8192 / 1.0:
      out.append(f / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      out.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(got, out, rtol=1e-5)
  assert np.sum(got < base * 0.99) > 0 and np.sum(np.isclose(got, base)) > 0  # both bands


@pytest.mark.parametrize("name", MODELS)
def test_import_export_import_is_bitwise(name, tmp_path):
  src = model_dir(name)
  split = interop.load_hf(str(src))  # stored dtype (bf16 stays bf16)
  out = interop.save_hf(split, str(tmp_path / "out"), max_shard_bytes=50_000,
                        base_config=safetensors_io.read_config(str(src)))
  with safetensors_io.CheckpointReader(str(src)) as a, \
       safetensors_io.CheckpointReader(out) as b:
    assert a.names() == b.names()
    for n in a.names():
      x, y = a.read(n), b.read(n)
      assert x.dtype == y.dtype and x.shape == y.shape, n
      assert x.tobytes() == y.tobytes(), n
  again = interop.load_hf(out)
  assert again.cfg == split.cfg.replace(name=again.cfg.name)
  for (p, u), (_, v) in zip(nnx.to_flat_state(split.prefill), nnx.to_flat_state(again.prefill)):
    assert np.asarray(u.get_value()).tobytes() == np.asarray(v.get_value()).tobytes(), p
  assert len(json.load(open(os.path.join(out, safetensors_io.INDEX_FILE)))["weight_map"]) \
      == len(a.names())


def test_export_dtype_and_single_file(tmp_path):
  split = interop.load_hf(str(DATA / "qwen2"))
  out = interop.save_hf(split, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_bytes=None)
  assert os.path.exists(os.path.join(out, safetensors_io.SINGLE_FILE))
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["Qwen2ForCausalLM"]
  with safetensors_io.CheckpointReader(out) as r:
    assert {r.dtype(n) for n in r.names()} == {"BF16"}
  back = interop.load_hf(out, param_dtype="float32")
  tokens, ref = golden("qwen2")
  err = np.max(np.abs(logits_of(back, tokens) - ref))
  assert 1e-4 < err < 0.5  # bf16 rounding moves the logits a little, not a lot


def test_untied_split_exports_as_two_checkpoints(tmp_path):
  base = interop.load_hf(str(DATA / "llama_untied")).untie()
  decode = jax.tree.map(lambda x: x * 1.01, base.decode)  # a "task" decode tree
  split = base.replace(decode=decode, last_prompt_token="decode")
  out = interop.save_hf_split(split, str(tmp_path / "task"))
  assert sorted(os.listdir(out)) == ["decode", hf.SPLIT_FILE, "prefill"]
  with pytest.raises(ValueError, match="save_hf_split"):
    interop.save_hf(split, str(tmp_path / "nope"))
  back = interop.load_hf_split(out)
  assert not back.tied and back.last_prompt_token == "decode"
  for tree_a, tree_b in ((split.prefill, back.prefill), (split.decode, back.decode)):
    for (p, u), (_, v) in zip(nnx.to_flat_state(tree_a), nnx.to_flat_state(tree_b)):
      assert np.array_equal(np.asarray(u.get_value()), np.asarray(v.get_value())), p
  # Each half is a plain checkpoint of its own.
  alone = interop.load_hf(os.path.join(out, "decode"))
  tokens, _ = golden("llama_untied")
  np.testing.assert_array_equal(logits_of(alone, tokens),
                                logits_of(split.replace(prefill=split.decode, decode=None),
                                          tokens))
  # A tied split is a single checkpoint, readable by load_hf_split too.
  tied = interop.save_hf_split(interop.load_hf(str(DATA / "qwen2")), str(tmp_path / "tied"))
  assert interop.load_hf_split(tied).tied


def test_lora_adapted_model_must_be_merged_first(tmp_path):
  split = interop.load_hf(str(DATA / "llama_untied"), param_dtype="float32").untie()
  adapted = lora.add_adapters(split, "prefill", lora.LoRAConfig(rank=2),
                              jax.random.key(0))
  with pytest.raises(CheckpointError, match="merge_adapters"):
    interop.save_hf_split(adapted, str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")
  assert [p for p in os.listdir(tmp_path)] == []  # no temporary directory left behind
  merged = lora.merge_adapters(adapted)
  interop.save_hf_split(merged, str(tmp_path / "x"))


def test_loads_onto_a_single_device_mesh():
  mesh = jaxsun.parallel.make_mesh()
  split = interop.load_hf(str(DATA / "qwen2"), mesh=mesh)
  tokens, ref = golden("qwen2")
  assert np.max(np.abs(logits_of(split, tokens) - ref)) <= 1e-4


def test_imported_model_generates_through_the_split():
  split = interop.load_hf(str(DATA / "llama3_scaled"), param_dtype="float32")
  tokens, ref = golden("llama3_scaled")
  out = jaxsun.generate(split, jnp.asarray(tokens[:, :40]), max_new_tokens=1)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, -1], ref[:, 39].argmax(-1))


# --- bad input -------------------------------------------------------------------------


def test_unknown_architecture_is_named(tmp_path):
  d = copy_model("qwen2", tmp_path)
  cfg = json.load(open(d / "config.json"))
  cfg["architectures"] = ["GPT2LMHeadModel"]
  json.dump(cfg, open(d / "config.json", "w"))
  with pytest.raises(CheckpointError, match="'architectures'.*GPT2LMHeadModel"):
    interop.load_hf(str(d))


@pytest.mark.parametrize("key,value,match", [
    ("hidden_act", "gelu", "'hidden_act'"),
    ("mlp_bias", True, "'mlp_bias'"),
    ("use_sliding_window", True, "'use_sliding_window'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "rope_type'='yarn'"),
    ("num_key_value_heads", 3, "n_kv_heads=3"),
    ("hidden_size", "64", "'hidden_size'"),
])
def test_unsupported_config_keys_are_named(tmp_path, key, value, match):
  d = copy_model("qwen2", tmp_path)
  cfg = json.load(open(d / "config.json"))
  cfg[key] = value
  json.dump(cfg, open(d / "config.json", "w"))
  with pytest.raises(CheckpointError, match=match):
    interop.load_hf(str(d))


def test_missing_config_and_directory(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    interop.load_hf(str(tmp_path / "absent"))
  d = copy_model("qwen2", tmp_path)
  os.remove(d / "config.json")
  with pytest.raises(CheckpointError, match="config.json is missing"):
    interop.load_hf(str(d))


def test_missing_shard_is_named(tmp_path):
  d = copy_model("llama3_scaled", tmp_path)
  os.remove(d / "model-00002-of-00003.safetensors")
  with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
    interop.load_hf(str(d))


def test_corrupt_and_truncated_files(tmp_path):
  d = copy_model("qwen2", tmp_path)
  path = d / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # truncated
  with pytest.raises(CheckpointError, match="corrupt or truncated"):
    interop.load_hf(str(d))
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
  with pytest.raises(CheckpointError, match="corrupt or truncated"):
    interop.load_hf(str(d))


def test_missing_unknown_and_misshaped_tensors(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  d = copy_model("qwen2", tmp_path)
  path = str(d / "model.safetensors")
  tensors = load_file(path)
  save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, path)
  with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
    interop.load_hf(str(d))
  save_file({**tensors, "model.layers.0.mlp.extra.weight": tensors["model.norm.weight"]}, path)
  with pytest.raises(CheckpointError, match="model.layers.0.mlp.extra.weight"):
    interop.load_hf(str(d))
  bad = dict(tensors)
  bad["model.layers.1.self_attn.k_proj.weight"] = bad["model.layers.1.self_attn.q_proj.weight"]
  save_file(bad, path)
  with pytest.raises(CheckpointError, match="k_proj.weight.*shape"):
    interop.load_hf(str(d))


@pytest.mark.parametrize("name", ["llama3_scaled", "qwen2"])
def test_legacy_config_keys(tmp_path, name):
  """Configs written before transformers 5 (as on the Hub for Llama 3.1 / Qwen2.5):
  top-level `rope_theta`, `rope_scaling` with `rope_type`, `torch_dtype`."""
  d = copy_model(name, tmp_path)
  cfg = json.load(open(d / "config.json"))
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
  cfg["torch_dtype"] = cfg.pop("dtype")
  json.dump(cfg, open(d / "config.json", "w"))
  split = interop.load_hf(str(d), param_dtype="float32")
  assert split.cfg == interop.load_hf(str(DATA / name), param_dtype="float32").cfg
  tokens, ref = golden(name)
  assert np.max(np.abs(logits_of(split, tokens) - ref)) <= 1e-4


def test_tied_checkpoint_that_also_stores_the_head(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  d = copy_model("qwen2", tmp_path)  # tied
  path = str(d / "model.safetensors")
  tensors = load_file(path)
  save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, path)
  tokens, ref = golden("qwen2")
  assert np.max(np.abs(logits_of(interop.load_hf(str(d)), tokens) - ref)) <= 1e-4


def test_failed_export_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
  split = interop.load_hf(str(DATA / "llama_untied"))
  out = interop.save_hf(split, str(tmp_path / "ckpt"), max_shard_bytes=50_000)
  before = {f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(out)}
  calls = []
  real = safetensors_io.save_file

  def failing(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:  # the second shard: the first is already on disk
      raise OSError("disk full")
    return real(tensors, filename, metadata=metadata)

  monkeypatch.setattr(safetensors_io, "save_file", failing)
  changed = split.replace(prefill=jax.tree.map(lambda x: x * 2, split.prefill))
  with pytest.raises(OSError, match="disk full"):
    interop.save_hf(changed, out, max_shard_bytes=50_000, overwrite=True)
  assert {f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(out)} == before
  assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left
  with pytest.raises(FileExistsError, match="overwrite=True"):
    interop.save_hf(changed, out)
  monkeypatch.undo()
  interop.save_hf(changed, out, overwrite=True)  # replaces it once complete
  np.testing.assert_array_equal(
      np.asarray(interop.load_hf(out).prefill["final_norm"]["scale"][...]),
      2 * np.asarray(split.prefill["final_norm"]["scale"][...]))
