"""Derived H100 / H200 calibrations: coefficients against hand arithmetic from the
datasheet figures, sanity ranges for an 8B model, and the written files."""

import dataclasses
import pathlib

import pytest

from jaxsun.config import ModelConfig
from jaxsun.serving.sim import published as pub
from jaxsun.serving.sim.stepmodel import Calibration, StepFeatures

REL = 1e-9
CAL_DIR = pathlib.Path(__file__).parents[1] / "experiments/results/serving/calibration"

# Llama 3.1 8B by hand: vocab 128256, d 4096, 32 layers, 32 heads, 8 KV heads of 128,
# d_ff 14336, untied head.
LINEAR = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)  # 6_979_321_856
EMBED = 128256 * 4096
PARAMS = LINEAR + 2 * EMBED + 65 * 4096  # + 2 norms per layer and the final norm
KV_BYTES = 2 * 32 * 8 * 128 * 2  # K and V, every layer, bf16
BW = {"h100": 3.35e12, "h200": 4.8e12}
BF16, FP8 = 989e12, 1979e12
BYTES = {"bf16": 2 * PARAMS,
         "int8": LINEAR + 2 * (PARAMS - LINEAR),
         "fp8": LINEAR + 2 * (PARAMS - LINEAR),
         "int4": LINEAR // 2 + LINEAR // 128 * 4 + 2 * (PARAMS - LINEAR)}


@pytest.fixture(scope="module")
def cals():
  return {d: pub.derived_calibration(d) for d in pub.DEVICES}


def decode_step(cal, module, fmt, batch, context):
  return cal.predict(module, StepFeatures(calls=1, steps=1, decode_rows=batch,
                                          kv_tokens=batch * context,
                                          weight_bytes=BYTES[fmt]))


def prefill(cal, tokens):
  return cal.predict("prefill", StepFeatures(calls=1, prefill_tokens=tokens,
                                             prefill_attn=tokens * tokens,
                                             weight_bytes=BYTES["bf16"]))


def test_weight_bytes_match_hand_arithmetic():
  cfg = ModelConfig.preset("llama-3.1-8b")
  assert cfg.num_params() == PARAMS == 8_030_261_248
  assert BYTES["int4"] == 5_809_643_520  # 3.49 GB packed + 0.22 GB scales + 2.10 GB bf16
  for fmt, n in BYTES.items():
    assert pub.weight_bytes(cfg, fmt) == n, fmt
  tied = ModelConfig.preset("llama-3.2-1b")  # tied head: one embedding matrix only
  assert pub.weight_bytes(tied, "bf16") == 2 * tied.num_params()
  with pytest.raises(ValueError, match="int3"):
    pub.weight_bytes(cfg, "int3")


@pytest.mark.parametrize("device", pub.DEVICES)
def test_coefficients_match_hand_arithmetic(cals, device):
  cal, bw = cals[device], BW[device]
  decode = cal.modules["decode"].coef
  assert decode["weight_bytes"] == pytest.approx(1 / (0.8 * bw), rel=REL)
  assert decode["kv_tokens"] == pytest.approx(KV_BYTES / (0.8 * bw), rel=REL)
  assert decode["decode_rows"] == pytest.approx(0.35 * 2 * PARAMS / (0.55 * BF16), rel=REL)
  assert decode["steps"] == pytest.approx(150e-6, rel=REL)
  assert decode["calls"] == pytest.approx(300e-6, rel=REL)
  int4 = cal.modules["decode:int4"].coef
  assert int4["weight_bytes"] == pytest.approx(1 / (0.65 * bw), rel=REL)
  assert int4["kv_tokens"] == pytest.approx(KV_BYTES / (0.8 * bw), rel=REL)
  assert cal.modules["decode:int8"].coef["weight_bytes"] == pytest.approx(1 / (0.8 * bw),
                                                                          rel=REL)
  assert cal.modules["decode:fp8"].coef["decode_rows"] == pytest.approx(
      0.35 * 2 * PARAMS / (0.55 * FP8), rel=REL)
  pre = cal.modules["prefill"].coef
  assert pre["prefill_tokens"] == pytest.approx(2 * PARAMS / (0.55 * BF16), rel=REL)
  assert pre["prefill_attn"] == pytest.approx(0.5 * 4 * 32 * 32 * 128 / (0.4 * BF16), rel=REL)
  assert pre["weight_bytes"] == pytest.approx(1 / (0.8 * bw), rel=REL)
  assert pre["calls"] == pytest.approx(2e-3, rel=REL)
  assert pre["steps"] == pre["decode_rows"] == pre["kv_tokens"] == 0
  assert set(cal.modules) == {"prefill", "decode", "decode:int8", "decode:fp8", "decode:int4"}
  nvlink, rdma, pcie = (cal.transports[k] for k in ("nvlink", "rdma", "pcie"))
  assert (nvlink.alpha_s, nvlink.bandwidth_Bps) == pytest.approx((20e-6, 300e9), rel=REL)
  assert (rdma.alpha_s, rdma.bandwidth_Bps) == pytest.approx((50e-6, 0.8 * 400e9 / 8), rel=REL)
  assert (pcie.alpha_s, pcie.bandwidth_Bps) == pytest.approx((30e-6, 25e9), rel=REL)


def test_sanity_ranges(cals):
  h100, h200 = cals["h100"], cals["h200"]
  # 16 GB / (0.8 x 3.35 TB/s) = 6.0 ms of weights, plus step / call overheads.
  t100 = decode_step(h100, "decode", "bf16", 1, 128)
  assert 6e-3 <= t100 <= 7e-3
  # H200 differs only in bandwidth: the weight term shrinks by 3.35 / 4.8.
  f = StepFeatures(calls=1, steps=1, decode_rows=1, weight_bytes=BYTES["bf16"])
  fixed = 300e-6 + 150e-6 + 0.35 * 2 * PARAMS / (0.55 * BF16)
  ratio = (h100.predict("decode", f) - fixed) / (h200.predict("decode", f) - fixed)
  assert ratio == pytest.approx(4.8 / 3.35, rel=REL)
  # 1k prefill: 30 ms of matmuls + 0.7 ms attention + 6 ms weights + 2 ms call.
  t = prefill(h100, 1024)
  assert 30e-3 <= t <= 40e-3
  hand = (2e-3 + 1024 * 2 * PARAMS / (0.55 * BF16)
          + 1024 * 1024 * 0.5 * 4 * 32 * 32 * 128 / (0.4 * BF16)
          + BYTES["bf16"] / (0.8 * 3.35e12))
  assert t == pytest.approx(hand, rel=REL)
  # QSUN's premise: int4 weights make a batch-1 decode step 2-3.2x faster. On H200 the
  # fixed 450 us per step and call weigh more next to faster weight streaming: ~2.0x.
  for cal, low in ((h100, 2.0), (h200, 1.95)):
    for context in (128, 1024):
      speedup = (decode_step(cal, "decode", "bf16", 1, context)
                 / decode_step(cal, "decode:int4", "int4", 1, context))
      assert low <= speedup <= 3.2, (cal.name, context, speedup)
  overhead = fixed + 1024 * KV_BYTES / (0.8 * 3.35e12)
  hand = ((overhead + BYTES["bf16"] / (0.8 * 3.35e12))
          / (overhead + BYTES["int4"] / (0.65 * 3.35e12)))  # 2.04
  assert decode_step(h100, "decode", "bf16", 1, 1024) / decode_step(
      h100, "decode:int4", "int4", 1, 1024) == pytest.approx(hand, rel=REL)


def test_source_notes_and_metadata(cals):
  for device, cal in cals.items():
    assert cal.source.startswith("derived from published figures")
    for figure in ("989", "1979", "900 GB/s", "400 Gb/s", f"{BW[device] / 1e12:g} TB/s"):
      assert figure in cal.source, figure
    for assumption in ("80%", "65%", "55%", "40%", "35%", "150 us", "300 us", "2 ms"):
      assert assumption in cal.notes, assumption
    assert cal.device["count"] == 1 and cal.device["source"] == "datasheet"
    assert cal.versions == {"jaxsun": "derived"}
    assert cal.engine["layout"] == "paged"
    assert cal.engine["model"]["params"] == PARAMS
    assert cal.engine["weight_bytes"] == BYTES
  assert cals["h100"].device["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert cals["h200"].device["device_kind"] == "NVIDIA H200"


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="h300"):
    pub.derived_calibration("h300")
  with pytest.raises(ValueError, match="int3"):
    pub.derived_calibration("h100", variants=("int8", "int3"))
  with pytest.raises(ValueError, match="no-such-model"):
    pub.derived_calibration("h100", "no-such-model")


def test_variants_subset():
  cal = pub.derived_calibration("h200", variants=("int4",))
  assert set(cal.modules) == {"prefill", "decode", "decode:int4"}


def test_write_all_round_trip(tmp_path, cals):
  paths = pub.write_all(tmp_path)
  assert [p.name for p in paths] == [f"{d}_llama-3.1-8b_derived.json" for d in pub.DEVICES]
  for device, path in zip(pub.DEVICES, paths):
    assert Calibration.load(path) == cals[device]


@pytest.mark.parametrize("device", pub.DEVICES)
def test_committed_files_are_current(cals, device):
  """The files under experiments/ match a fresh derivation (all but the date): rerun
  `python -m jaxsun.serving.sim.published` after changing a figure or assumption."""
  cal = Calibration.load(CAL_DIR / f"{device}_llama-3.1-8b_derived.json")
  assert dataclasses.replace(cal, date=cals[device].date) == cals[device]


def test_main_prints_table(tmp_path, capsys):
  pub.main(["--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| h100 | bf16 |" in out and "| h200 | int4 |" in out
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "h100_llama-3.1-8b_derived.json", "h200_llama-3.1-8b_derived.json"]
