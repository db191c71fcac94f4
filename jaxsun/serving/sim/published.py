"""Calibrations for H100 / H200 derived from published hardware figures, not measured.

A roofline-style linear step-time model (`jaxsun.serving.sim.stepmodel`) whose coefficients
come from datasheet peaks times stated efficiencies, for cluster-scale simulations on
hardware this project has not timed:

    cal = derived_calibration("h100")            # "prefill", "decode", "decode:int4", ...
    seconds = cal.predict("decode:int4", StepFeatures(steps=1, decode_rows=32, ...))
    python -m jaxsun.serving.sim.published       # writes the JSON files and a summary

Every figure is in `PUBLISHED` (with where it comes from) and every assumption is a
module-level constant below; `Calibration.source` lists the former, `Calibration.notes`
the latter, so a file states exactly what it rests on. Treat predictions as estimates to
be replaced by a measured calibration (`jaxsun.serving.sim.calibrate`) when one exists.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
from typing import Sequence

from jaxsun.config import ModelConfig
from jaxsun.serving.sim.stepmodel import (FEATURES, Calibration, ModuleModel, StepFeatures,
                                          TransportModel)

DEVICES = ("h100", "h200")
VARIANTS = ("int8", "fp8", "int4")  # decode trees in another weight format: "decode:<v>"
FORMATS = ("bf16", *VARIANTS)

PUBLISHED = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5 column: 80 GB HBM3 at 3.35 TB/s;
    # 989 TFLOP/s dense BF16 (1979 with 2:4 sparsity); 1979 TFLOP/s dense FP8 (3958
    # sparse). Sparse figures are not used: inference weights here are dense.
    "h100": {"device_kind": "NVIDIA H100 80GB HBM3", "memory_bytes": 80e9,
             "hbm_Bps": 3.35e12, "bf16_flops": 989e12, "fp8_flops": 1979e12},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: 141 GB HBM3e at 4.8 TB/s; the
    # same tensor-core peaks as H100 SXM (same GH100 die).
    "h200": {"device_kind": "NVIDIA H200", "memory_bytes": 141e9,
             "hbm_Bps": 4.8e12, "bf16_flops": 989e12, "fp8_flops": 1979e12},
    # H100 / H200 SXM datasheets: NVLink 4, 900 GB/s total per GPU (18 links; 450 GB/s
    # each direction).
    "nvlink4_total_Bps": 900e9,
    # NVIDIA Quantum-2 / ConnectX-7 InfiniBand NDR: 400 Gb/s per port.
    "ib_ndr_port_bps": 400e9,
}

# Assumed efficiencies and overheads (stated in every file's notes).
HBM_EFF = 0.80  # decode weight / KV streaming, bf16 / fp8 / int8 weights
HBM_EFF_INT4 = 0.65  # AWQ-style int4 GEMV kernels lose bandwidth to dequantisation
PREFILL_MATMUL_EFF = 0.55  # of the dense BF16 (fp8 trees: FP8) peak
PREFILL_ATTN_EFF = 0.40  # flash attention reaches less of the peak than plain GEMMs
CAUSAL_FRACTION = 0.5  # `prefill_attn` counts the full rectangle; causal masking halves it
DECODE_COMPUTE_EFF = 0.55
# Most decode matmul time hides under weight streaming at small batches; only this share
# of the per-token FLOP time is counted as exposed.
DECODE_COMPUTE_EXPOSED = 0.35
DECODE_STEP_S = 150e-6  # per decode step: kernel launches / CUDA graph replay / scheduler
CALL_S = 300e-6  # per decode call (chunk): dispatch and the host sync that reads tokens
# Per prefill call, in place of CALL_S: padding, page scatter, first-token sampling.
PREFILL_CALL_S = 2e-3
KV_ITEMSIZE = 2  # bf16 KV cache, also for quantized-weight trees
INT4_GROUP = 128  # AWQ group size
INT4_GROUP_BYTES = 4  # one fp16 scale and one fp16 zero per group
NVLINK_ALPHA_S, NVLINK_BPS = 20e-6, 300e9  # effective one-direction point-to-point rate
RDMA_ALPHA_S, RDMA_EFF = 50e-6, 0.80  # one NDR port at 80%: 40 GB/s
PCIE_ALPHA_S, PCIE_BPS = 30e-6, 25e9  # host-staged copy


def _check(what: str, value: str, known: Sequence[str]) -> None:
  if value not in known:
    raise ValueError(f"unknown {what} {value!r}; known: {list(known)}")


def _linear_params(cfg: ModelConfig) -> int:
  """Weights of the per-layer matmuls (q, k, v, o, gate, up, down): what quantization
  compresses. Embeddings, the LM head, norms and biases stay bf16."""
  d = cfg.d_model
  return cfg.n_layers * (2 * d * cfg.q_dim + 2 * d * cfg.kv_dim + 3 * d * cfg.d_ff)


def weight_bytes(cfg: ModelConfig, fmt: str) -> int:
  """Weight bytes one forward pass reads with the tree stored in `fmt`.

  Args:
    cfg: the architecture.
    fmt: "bf16" (every parameter at 2 bytes); "int8" / "fp8" (linear layers at 1 byte);
      "int4" (AWQ, group 128: linear layers at 0.5 byte plus an fp16 scale and zero per
      group). Embeddings, the LM head (unless tied), norms and biases stay bf16.

  Returns:
    Bytes, rounded up to whole bytes and groups.
  """
  _check("weight format", fmt, FORMATS)
  total = cfg.num_params()
  if fmt == "bf16":
    return 2 * total
  linear = _linear_params(cfg)
  rest = 2 * (total - linear)
  if fmt in ("int8", "fp8"):
    return linear + rest
  return (linear + 1) // 2 + -(-linear // INT4_GROUP) * INT4_GROUP_BYTES + rest


def kv_bytes_per_token(cfg: ModelConfig) -> int:
  """KV bytes one token occupies (K and V, every layer, bf16)."""
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * KV_ITEMSIZE


def _module(**coef: float) -> ModuleModel:
  return ModuleModel(coef={name: float(coef.get(name, 0.0)) for name in FEATURES})


def _prefill(cfg: ModelConfig, hw: dict) -> ModuleModel:
  peak = PREFILL_MATMUL_EFF * hw["bf16_flops"]
  # 4 FLOPs per channel per (query, key) pair: QK^T and PV, each a multiply-add.
  attn_flops = CAUSAL_FRACTION * 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim
  return _module(calls=PREFILL_CALL_S,
                 prefill_tokens=2 * cfg.num_params() / peak,
                 prefill_attn=attn_flops / (PREFILL_ATTN_EFF * hw["bf16_flops"]),
                 # Added, not overlapped with the matmuls: conservative, ~6 ms on H100.
                 weight_bytes=1 / (HBM_EFF * hw["hbm_Bps"]))


def _decode(cfg: ModelConfig, hw: dict, fmt: str) -> ModuleModel:
  # int8 / int4 are weight-only (activations bf16); fp8 trees run FP8 tensor cores.
  flops = hw["fp8_flops"] if fmt == "fp8" else hw["bf16_flops"]
  eff = HBM_EFF_INT4 if fmt == "int4" else HBM_EFF
  return _module(calls=CALL_S, steps=DECODE_STEP_S,
                 decode_rows=DECODE_COMPUTE_EXPOSED * 2 * cfg.num_params()
                 / (DECODE_COMPUTE_EFF * flops),
                 kv_tokens=kv_bytes_per_token(cfg) / (HBM_EFF * hw["hbm_Bps"]),
                 weight_bytes=1 / (eff * hw["hbm_Bps"]))


def _source(device: str, cfg: ModelConfig) -> str:
  hw = PUBLISHED[device]
  name = {"h100": "NVIDIA H100 SXM5 datasheet", "h200": "NVIDIA H200 SXM datasheet"}[device]
  return (f"derived from published figures: {name} ({hw['hbm_Bps'] / 1e12:g} TB/s HBM, "
          f"{hw['memory_bytes'] / 1e9:g} GB, {hw['bf16_flops'] / 1e12:g} TFLOP/s dense BF16, "
          f"{hw['fp8_flops'] / 1e12:g} TFLOP/s dense FP8); NVLink 4 "
          f"{PUBLISHED['nvlink4_total_Bps'] / 1e9:g} GB/s total per GPU; InfiniBand NDR "
          f"{PUBLISHED['ib_ndr_port_bps'] / 1e9:g} Gb/s per port; {cfg.name} architecture "
          f"(jaxsun ModelConfig preset, {cfg.num_params()} parameters)")


def _notes() -> str:
  pct = lambda x: f"{100 * x:g}%"  # noqa: E731
  return "; ".join([
      "not measured: every coefficient is a published peak times an assumed efficiency",
      f"decode weight and KV streaming at {pct(HBM_EFF)} of peak HBM bandwidth "
      f"(bf16 / fp8 / int8 weights)",
      f"int4 (AWQ-style GEMV) weight streaming at {pct(HBM_EFF_INT4)} of peak HBM bandwidth "
      f"(dequantisation overhead); its KV still streams at {pct(HBM_EFF)}",
      f"prefill matmuls 2 x params FLOPs per token at {pct(PREFILL_MATMUL_EFF)} of dense "
      f"BF16 peak (prefill trees are bf16)",
      f"prefill attention 4 x n_layers x n_heads x head_dim FLOPs per (query, key) pair, "
      f"x {CAUSAL_FRACTION:g} for causal masking, at {pct(PREFILL_ATTN_EFF)} of dense BF16 "
      f"peak",
      f"prefill weight pass at {pct(HBM_EFF)} of HBM bandwidth, added to (not overlapped "
      f"with) the matmul time",
      f"decode compute 2 x params FLOPs per generated token at {pct(DECODE_COMPUTE_EFF)} of "
      f"peak (dense BF16; FP8 for decode:fp8; int8 / int4 are weight-only, bf16 compute), "
      f"counted at {pct(DECODE_COMPUTE_EXPOSED)} because most of it overlaps with weight "
      f"streaming at small batches",
      f"per decode step {DECODE_STEP_S * 1e6:g} us (kernel launches / CUDA graphs / "
      f"scheduler)",
      f"per decode call {CALL_S * 1e6:g} us; per prefill call {PREFILL_CALL_S * 1e3:g} ms "
      f"(instead of the per-call figure)",
      f"KV cache bf16 ({KV_ITEMSIZE} bytes), paged layout (each live row reads its own "
      f"context)",
      f"weight bytes: bf16 = 2 x params; int8 / fp8 = linear layers at 1 byte; int4 = linear "
      f"layers at 0.5 byte + {INT4_GROUP_BYTES} bytes (fp16 scale and zero) per "
      f"{INT4_GROUP} weights; embeddings, LM head, norms at bf16 in every format",
      f"transports: nvlink alpha {NVLINK_ALPHA_S * 1e6:g} us, {NVLINK_BPS / 1e9:g} GB/s "
      f"(assumed effective one-direction point-to-point rate, 2/3 of 450 GB/s); rdma alpha "
      f"{RDMA_ALPHA_S * 1e6:g} us, one NDR port at {pct(RDMA_EFF)}; pcie alpha "
      f"{PCIE_ALPHA_S * 1e6:g} us, {PCIE_BPS / 1e9:g} GB/s (host-staged copy)",
  ])


def derived_calibration(device: str = "h100", model: str = "llama-3.1-8b", *,
                        variants: Sequence[str] = VARIANTS) -> Calibration:
  """A calibration for one `device` running `model`, from published figures.

  Args:
    device: one of DEVICES.
    model: a `ModelConfig` preset name.
    variants: quantized decode trees to add as "decode:<variant>" (from VARIANTS).

  Returns:
    A Calibration with modules "prefill" (bf16), "decode" (bf16), "decode:<variant>", and
    transports "nvlink", "rdma", "pcie".

  Raises:
    ValueError: an unknown device, model or variant.
  """
  _check("device", device, DEVICES)
  for v in variants:
    _check("decode variant", v, VARIANTS)
  cfg = ModelConfig.preset(model)
  hw = PUBLISHED[device]
  modules = {"prefill": _prefill(cfg, hw), "decode": _decode(cfg, hw, "bf16")}
  for v in dict.fromkeys(variants):
    modules[f"decode:{v}"] = _decode(cfg, hw, v)
  rdma_Bps = RDMA_EFF * PUBLISHED["ib_ndr_port_bps"] / 8
  transports = {"nvlink": TransportModel(NVLINK_ALPHA_S, NVLINK_BPS),
                "rdma": TransportModel(RDMA_ALPHA_S, rdma_Bps),
                "pcie": TransportModel(PCIE_ALPHA_S, PCIE_BPS)}
  arch = {"name": cfg.name, "params": cfg.num_params(), "n_layers": cfg.n_layers,
          "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
          "head_dim": cfg.head_dim, "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size,
          "tie_embeddings": cfg.tie_embeddings}
  engine = {"layout": "paged", "model": arch,
            "weight_bytes": {f: weight_bytes(cfg, f) for f in ("bf16", *dict.fromkeys(variants))},
            "kv_bytes_per_token": kv_bytes_per_token(cfg)}
  return Calibration(
      name=f"{device}-{model}-derived", modules=modules, transports=transports,
      source=_source(device, cfg),
      device={"device_kind": hw["device_kind"], "count": 1, "source": "datasheet",
              "memory_bytes": int(hw["memory_bytes"])},
      versions={"jaxsun": "derived"}, engine=engine,
      date=datetime.date.today().isoformat(), notes=_notes())


def _file_name(device: str, model: str) -> str:
  return f"{device}_{model}_derived.json"


def write_all(out_dir, model: str = "llama-3.1-8b") -> list[pathlib.Path]:
  """Writes `<device>_<model>_derived.json` for every device in DEVICES; returns the paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for device in DEVICES:
    path = out / _file_name(device, model)
    derived_calibration(device, model).save(path)
    paths.append(path)
  return paths


def _decode_ms(cal: Calibration, fmt: str, batch: int, context: int) -> float:
  """One decode step in its own call: `batch` live rows, each reading `context` KV tokens."""
  module = "decode" if fmt == "bf16" else f"decode:{fmt}"
  f = StepFeatures(calls=1, steps=1, decode_rows=batch, kv_tokens=batch * context,
                   weight_bytes=cal.engine["weight_bytes"][fmt])
  return 1e3 * cal.predict(module, f)


def _prefill_ms(cal: Calibration, tokens: int) -> float:
  """One prefill call of a `tokens`-token prompt with no cached prefix."""
  f = StepFeatures(calls=1, prefill_tokens=tokens, prefill_attn=tokens * tokens,
                   weight_bytes=cal.engine["weight_bytes"]["bf16"])
  return 1e3 * cal.predict("prefill", f)


BATCHES = (1, 32, 128)
CONTEXT = 1024
PROMPTS = (1024, 4096)


def table(cals: Sequence[Calibration]) -> str:
  """A markdown table of predicted decode step and prefill times, in ms."""
  head = (["device", "decode tree"] + [f"decode b={b}" for b in BATCHES]
          + [f"prefill {p // 1024}k" for p in PROMPTS])
  rows = [head, ["---"] * len(head)]
  for cal in cals:
    device = cal.name.split("-", 1)[0]
    for fmt in ("bf16", "int4"):
      if fmt != "bf16" and f"decode:{fmt}" not in cal.modules:
        continue
      prefill = ([f"{_prefill_ms(cal, p):.1f}" for p in PROMPTS] if fmt == "bf16"
                 else ["-"] * len(PROMPTS))
      rows.append([device, fmt] + [f"{_decode_ms(cal, fmt, b, CONTEXT):.2f}" for b in BATCHES]
                  + prefill)
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv: Sequence[str] | None = None) -> None:
  """Writes the derived calibrations and prints their predicted step times."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/serving/calibration",
                      help="directory for <device>_<model>_derived.json")
  args = parser.parse_args(argv)
  paths = write_all(args.out)
  for path in paths:
    print(f"wrote {path}")
  print(f"\nPredicted ms (derived, not measured): one decode step per call, every row "
        f"with {CONTEXT} KV tokens; prefill of a whole prompt, no cached prefix.\n")
  print(table([Calibration.load(p) for p in paths]))


if __name__ == "__main__":
  main()
