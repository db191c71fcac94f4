"""The PTQ study: configs/ptq.py and jaxsun/jobs/ptq.py (a :smoke run end to end)."""

import json
import math

import ml_collections
import pytest

from configs import ptq as ptq_config
from jaxsun import jobs
from jaxsun.jobs import ptq


@pytest.mark.parametrize("variant", ptq_config.VARIANTS)
def test_every_variant_builds_and_validates(variant):
  c = ptq_config.get_config(variant)
  assert c.job == "ptq" and c.variant == variant
  with pytest.raises(AttributeError):
    c.recon.learning_rate = 1.0  # locked: lr lives in recon.lr.<method>
  if variant == "llama":
    with pytest.raises(ValueError, match=r"config\.base\.checkpoint is empty"):
      ptq.check_config(c)
    c.base.checkpoint = "/models/llama"  # the user's
  ptq.check_config(c)
  grid = ptq.cells(c)
  assert len(grid) == len(set(grid))
  if variant == "smoke":
    assert any(m in ptq.RECON_METHODS for m, _ in grid) and len(c.calib.seeds) == 1
    return
  g = c.group_size
  assert g == (128 if variant == "llama" else 32)
  five = {"w8a8", "w4a8", "w4a16", f"w3a16g{g}", f"w2a16g{g}"}
  low = {"w4a16", f"w3a16g{g}", f"w2a16g{g}"}
  for m in ("rtn", "flexround", "lrq"):
    assert set(c.grid[m]) == five
  for m in ("gptq", "awq", "uniquanf", "bcq"):
    assert set(c.grid[m]) == low
  assert tuple(c.grid.smoothquant) == ("w8a8",)
  assert len(grid) == 28 and tuple(c.calib.seeds) == (0, 1, 2)
  # UniQuanF's u / b learning rates in the official 5e-3 / 5e-4 ratio.
  assert c.recon.lr.uniquanf / c.recon.lr_b == pytest.approx(10.0)
  uq = ptq.recon_config(c, "uniquanf", 1)
  assert uq.lr_b == c.recon.lr_b and uq.seed == 1
  assert ptq.recon_config(c, "lrq", 0).lr_b is None
  assert ptq.recon_config(c, "rtn", 0) is None
  if variant == "llama":
    assert (ptq.recon_config(c, "lrq", 0).steps, uq.steps) == (5000, 2560)
    assert c.lrq_rank == 1024 and c.recon.batch_size == 1
    assert ptq.tokenizer_name(c) == "file:/models/llama/tokenizer.json"
  if variant == "tiny":
    # LRQ's rank-8 factors learn far fewer parameters than FlexRound's in x out matrix.
    assert c.lrq_rank * (64 + 192) < 64 * 192 / 4


def test_calibration_seeds_per_cell():
  c = ptq_config.get_config("tiny")
  assert ptq.seeds_of(c, "rtn", "w4a16") == (0,)  # no data: one run
  assert ptq.seeds_of(c, "bcq", "w3a16g32") == (0,)
  assert ptq.seeds_of(c, "rtn", "w4a8") == (0,)  # per-token activations: dynamic
  assert ptq.seeds_of(c, "rtn", "w8a8") == (0, 1, 2)  # static activation ranges
  assert ptq.seeds_of(c, "lrq", "w4a16") == (0, 1, 2)


def test_unknown_variant_names_it():
  with pytest.raises(ValueError, match="'huge'.*:tiny"):
    ptq_config.get_config("huge")


@pytest.mark.parametrize("key, value, match", [
    ("recon.lr.lrq", -1.0, r"config\.recon\.lr\.lrq=-1\.0"),
    ("recon.steps", -2, r"config\.recon\.steps=-2"),
    ("recon.batch_size", 64, r"config\.recon\.batch_size=64 exceeds config\.calib"),
    ("calib.seeds", (), r"config\.calib\.seeds"),
    ("calib.seq_len", 1, r"config\.calib\.seq_len=1"),
    ("eval.max_tokens", 10, r"config\.eval\.max_tokens=10"),
    ("lrq_rank", 0, r"config\.lrq_rank=0"),
    ("grid.rtn", ("w5a16",), r"config\.grid\.rtn.*'w5a16'"),
    ("grid.bcq", ("w4a8",), r"config\.grid\.bcq.*weight-only"),
    ("grid.smoothquant", ("w4a16",), r"config\.grid\.smoothquant"),
])
def test_field_validation_names_the_key(key, value, match):
  c = ptq_config.get_config("tiny")
  *parents, leaf = key.split(".")
  section = c
  for p in parents:
    section = section[p]
  section[leaf] = value
  with pytest.raises(ValueError, match=match):
    ptq.check_config(c)


def test_unknown_method_in_grid():
  c = ptq_config.get_config("smoke")
  c.unlock()
  c.grid.magic = ("w4a16",)
  with pytest.raises(ValueError, match=r"config\.grid\.magic.*unknown method"):
    ptq.check_config(c)


def _results(runs):
  """A results dict with cells {name: {seed: (ppl_id, ppl_ood)}}."""
  cells = {}
  for name, per_seed in runs.items():
    m, s = name.split(":")
    cells[name] = {"method": m, "scheme": s, "runs": {
        str(k): {"ppl_id": a, "ppl_ood": b, "params": 1, "seconds": 1.0}
        for k, (a, b) in per_seed.items()}}
  return {"cells": cells}


def test_comparisons_and_claims():
  r = _results({
      "lrq:w3a16g32": {0: (5.0, 10.0), 1: (5.1, 10.1), 2: (5.2, 10.2)},
      "flexround:w3a16g32": {0: (5.0, 11.0), 1: (5.1, 11.2), 2: (5.2, 11.1)},
      "uniquanf:w3a16g32": {0: (6.0, 12.0), 1: (6.5, 12.0), 2: (5.5, 12.0)},
      "bcq:w3a16g32": {0: (7.0, 11.0)}})
  c = ptq.compare(r, "lrq:w3a16g32", "flexround:w3a16g32", "ppl_ood")
  assert c["test"] == "paired" and c["n"] == 3
  assert c["diff"] == pytest.approx(-1.0) and c["beyond_2se"]
  c = ptq.compare(r, "uniquanf:w3a16g32", "bcq:w3a16g32", "ppl_id")
  assert c["test"] == "unpaired" and c["diff"] == pytest.approx(-1.0)
  assert c["se"] == pytest.approx(0.5 / math.sqrt(3)) and c["beyond_2se"]
  verdicts = {(x["claim"][:16], x.get("metric", "ppl_ood")): x["verdict"]
              for x in ptq.claims(r)}
  assert verdicts[("LRQ beats FlexRo", "ppl_ood")] == "agrees"
  assert verdicts[("UniQuanF beats B", "ppl_id")] == "agrees"
  assert verdicts[("UniQuanF beats B", "ppl_ood")] == "contradicts"
  assert verdicts[("UniQuanF beats F", "ppl_id")] == "contradicts"
  s = ptq.stats([1.0])
  assert s["std"] == 0.0 and s["se"] == 0.0


def test_smoke_study_end_to_end_and_resume(tmp_path, capsys):
  c = ptq_config.get_config("smoke")
  res = jobs.run(c, tmp_path)
  assert res["job"] == "ptq" and res["resumed_runs"] == 0
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert set(on_disk["cells"]) == {"rtn:w4a16", "rtn:w2a16g32", "lrq:w2a16g32"}
  fl = on_disk["float"]
  # Trained: well below a uniform guess over the byte vocabulary.
  assert fl["ppl_id"] < 0.5 * on_disk["vocab_size"] and math.isfinite(fl["ppl_ood"])
  for name, cell in on_disk["cells"].items():
    assert list(cell["runs"]) == ["0"]
    run = cell["runs"]["0"]
    for k in ("ppl_id", "ppl_ood", "params", "seconds", "weight_rel_error"):
      assert k in run
    assert math.isfinite(run["ppl_id"]) and math.isfinite(run["ppl_ood"])
    if name.startswith("lrq"):
      assert run["params"] > 0 and "reconstruction" in run
    else:
      assert run["params"] == 0
    s = on_disk["summary"][name]
    assert s["ppl_id"]["n"] == 1 and s["ppl_id"]["std"] == 0.0
  # Control: 2-bit weights cost perplexity; 4-bit costs less than 2-bit.
  w2 = on_disk["cells"]["rtn:w2a16g32"]["runs"]["0"]
  w4 = on_disk["cells"]["rtn:w4a16"]["runs"]["0"]
  assert w2["ppl_id"] > fl["ppl_id"] and w2["ppl_ood"] > fl["ppl_ood"]
  assert w4["ppl_id"] < w2["ppl_id"]
  assert on_disk["cells"]["lrq:w2a16g32"]["runs"]["0"]["ppl_id"] > fl["ppl_id"]
  table = (tmp_path / "table.md").read_text()
  assert "| RTN |" in table and "| LRQ |" in table and "float" in table
  assert "papers' claims" in table
  assert (tmp_path / "ppl_by_scheme.png").stat().st_size > 1000
  assert "configs/ptq.py:smoke" in (tmp_path / "COMMAND.md").read_text()
  out = capsys.readouterr().out
  assert "ptq: lrq:w2a16g32" in out and "ppl ID" in out

  # A rerun skips every finished run and gives the same numbers.
  res2 = jobs.run(c, tmp_path)
  assert res2["resumed_runs"] == 3
  assert "3 runs read back" in capsys.readouterr().out
  for name, cell in res2["cells"].items():
    assert cell["runs"] == on_disk["cells"][name]["runs"]

  # Adding a seed reuses the finished runs and runs only the new (non-deterministic) one.
  c2 = ptq_config.get_config("smoke")
  c2.calib.seeds = (0, 1)
  res3 = jobs.run(c2, tmp_path)
  assert res3["resumed_runs"] == 3
  assert list(res3["cells"]["lrq:w2a16g32"]["runs"]) == ["0", "1"]
  assert list(res3["cells"]["rtn:w4a16"]["runs"]) == ["0"]  # deterministic: once
