"""The serving studies' instruments on the simulator (small and fast): SUN beats
conventional disaggregation under skew and not without it, a low-bit decode module
speeds decode, PrefillShare reuses prefixes across models; the configs that launch the
committed runs parse."""

from __future__ import annotations

import dataclasses

import pytest

from jaxsun.serving.sim import studies
from jaxsun.serving.sim.published import derived_calibration
from jaxsun.serving.workload import LengthDist


@pytest.fixture(scope="module")
def h100():
  return studies.Backend(kind="sim", calibration=derived_calibration("h100"))


SMALL = studies.SunStudy(n_models=4, skews=(0.0, 2.0), seeds=2, num_requests=120,
                         prompt_len=LengthDist.uniform(64, 128),
                         output_len=LengthDist.uniform(256, 512), slots=32, capacity=1024,
                         chunk=8, search_iters=4)


def test_sun_study_separates_the_deployments_under_skew(h100):
  r = studies.sun_study(h100, SMALL, progress=False)
  flat, skewed = (p["by_deployment"]["sun"]["per_device_vs_conventional"]
                  for p in r["points"])
  # Uniform popularity: SUN gains only from pooling the per-model fluctuations.
  # Zipf 2: the hot model's decode worker saturates alone under conventional serving.
  assert skewed["mean"] > 1.6
  assert skewed["mean"] - 2 * skewed["std"] > flat["mean"] + 2 * flat["std"]
  md = studies.markdown({**r, "command": "test"})
  assert "SUN vs conv." in md and "±" in md


def test_qsun_decodes_faster_with_a_low_bit_decode_module(h100):
  q = dataclasses.replace(h100, decode_variant="int4", _models={})
  st = dataclasses.replace(SMALL, seeds=2, search_iters=2)
  r = studies.qsun_study(h100, q, st, skew=1.0, progress=False)
  tpot = r["qsun_vs_sun"]["saturation_median_tpot_ms"]
  assert tpot["mean"] < 0.8  # int4 weights: well under bf16's decode step
  steps = studies.decode_step_times(h100, ["", "int4"], batch=1, context=1024, steps=1)
  assert steps["int4"] < 0.6 * steps["bf16"]


def test_prefillshare_reuses_prefixes_across_models(h100):
  st = studies.PrefillShareStudy(n_models=3, concurrency=(4, 16), seeds=2, turns=4,
                                 context_len=LengthDist.uniform(512, 1024),
                                 output_len=LengthDist.uniform(32, 64),
                                 observation_len=LengthDist.uniform(32, 64), slots=64,
                                 capacity=4096, prefix_cache_mb=2048.0)
  r = studies.prefillshare_study(h100, st, progress=False)
  for p in r["points"]:
    b = p["by_deployment"]["per_model_prefill"]["prefix_hit_rate"]["mean"]
    t = p["by_deployment"]["prefillshare"]["prefix_hit_rate"]["mean"]
    assert t > b + 0.2  # turn i+1 reuses turn i's KV only when the tree is shared
  assert r["points"][-1]["p95_latency_reduction"]["mean"] > 1.0


@pytest.mark.parametrize("variant", ["study_sun_h100", "study_qsun_engine",
                                     "study_prefillshare_h200"])
def test_study_configs_parse(variant):
  from configs import serving  # pylint: disable=import-outside-toplevel
  c = serving.get_config(variant)
  assert c.study.name in ("sun", "qsun", "prefillshare")
  backend = studies.backend_from_config(c.study)
  assert backend.kind == ("engine" if variant.endswith("engine") else "sim")
  with pytest.raises(ValueError, match="unknown study"):
    serving.get_config("study_sun_tpu")
