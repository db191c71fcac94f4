"""The attention benchmark runs (quick sizes) and reports; no timing is asserted.

Checks the result's schema, that every kind x impl x length row exists with positive
times and memory, that the fused and naive paths of the benchmarked layer agree
(outputs and gradients), and that the ratios and targets are computed from the rows.
"""

import json
import math

import pytest

from experiments.benchmarks import attention as bench

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("attention")
  result = bench.main(["--quick", "--out", str(out)])
  return result, out


def test_quick_run_writes_json_and_markdown(quick):
  result, out = quick
  backend = result["backend"]
  saved = json.loads((out / f"attention_quick_{backend}.json").read_text())
  assert saved == json.loads(json.dumps(result))
  for key in ("date", "machine", "versions", "config", "rows", "checks", "ratios",
              "targets", "benchmark", "mode"):
    assert key in saved, key
  assert saved["benchmark"] == "attention" and saved["mode"] == "quick"
  assert {"jax", "jaxlib"} <= set(saved["versions"])
  assert {"device_kind", "platform", "backend"} <= set(saved["machine"])
  cfg = saved["config"]
  assert cfg["kinds"] == list(bench.KINDS) and cfg["seqs"] == list(bench.SIZES["quick"]["seqs"])
  assert cfg["fused_impl"] in ("einsum", "xla", "cudnn")
  md = (out / f"attention_quick_{backend}.md").read_text()
  assert "| T | B | kind | fused ms |" in md and "## targets" in md


def test_every_row_exists_with_positive_time_and_memory(quick):
  result, _ = quick
  rows = {(r["kind"], r["impl"], r["seq_len"]): r for r in result["rows"]}
  seqs = bench.SIZES["quick"]["seqs"]
  assert set(rows) == {(k, i, n) for k in bench.KINDS for i in bench.IMPLS for n in seqs}
  tokens = bench.SIZES["quick"]["tokens"]
  for (kind, impl, n), r in rows.items():
    assert r["error"] is None, (kind, impl, n, r["error"])
    assert r["scope"] == "layer"
    assert r["batch"] * n == r["tokens"] == tokens  # constant tokens per step
    t = r["time_s"]
    assert len(t["trials"]) == result["config"]["trials"]
    assert t["median"] > 0 and t["mean"] > 0 and t["std"] >= 0
    assert r["tokens_per_s"] == pytest.approx(tokens / t["median"])
    m = r["memory"]
    assert m["peak_bytes"] == (m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"]
                               - m["alias_bytes"]) > 0
    assert m["argument_bytes"] > 0 and m["output_bytes"] > 0
    assert m["per_sequence_bytes"] == pytest.approx(m["peak_bytes"] / r["batch"])
    assert r["resolved_impl"] == (result["config"]["fused_impl"] if impl == "fused"
                                  else "naive")


def test_fused_and_naive_outputs_and_gradients_agree(quick):
  result, _ = quick
  checks = {(c["kind"], c["seq_len"]): c for c in result["checks"]}
  assert set(checks) == {(k, n) for k in bench.KINDS for n in bench.SIZES["quick"]["seqs"]}
  for c in checks.values():  # float32 on CPU: the fused rewrites are exact
    assert c["ok"] and c["tolerance"] == bench.TOLERANCE["float32"]
    assert 0 <= c["out_rel_err"] <= 1e-4 and 0 <= c["grad_rel_err"] <= 1e-4
  assert result["targets"]["fused_equals_naive"]["pass"]
  assert result["targets"]["no_errors"]["pass"]


def test_ratios_are_computed_from_the_rows(quick):
  result, _ = quick
  rows = {(r["kind"], r["impl"], r["seq_len"]): r for r in result["rows"]}

  def t(k, i, n):
    return rows[(k, i, n)]["time_s"]["median"]

  def m(k, i, n, f="peak_bytes"):
    return rows[(k, i, n)]["memory"][f]

  rat = result["ratios"]
  seqs = bench.SIZES["quick"]["seqs"]
  assert len(rat["fused_over_naive"]) == len(bench.KINDS) * len(seqs)
  for x in rat["fused_over_naive"]:
    k, n = x["kind"], x["seq_len"]
    assert x["time"] == pytest.approx(t(k, "fused", n) / t(k, "naive", n))
    assert x["memory"] == pytest.approx(m(k, "fused", n) / m(k, "naive", n))
  for x in rat["over_softmax"]:
    k, i, n = x["kind"], x["impl"], x["seq_len"]
    assert x["time"] == pytest.approx(t(k, i, n) / t("softmax", i, n))
  assert len(rat["memory_growth"]) == len(bench.KINDS) * len(bench.IMPLS)
  for g in rat["memory_growth"]:
    k, i, a, b = g["kind"], g["impl"], g["from"], g["to"]
    assert (a, b) == tuple(seqs) and g["length_ratio"] == b / a
    want = m(k, i, b, "per_sequence_bytes") / m(k, i, a, "per_sequence_bytes")
    assert g["per_sequence_growth"] == pytest.approx(want)
    assert g["total_growth"] == pytest.approx(m(k, i, b) / m(k, i, a))
    assert g["exponent"] == pytest.approx(math.log(want) / math.log(b / a))
  # The targets read these same numbers; which ones bind depends on a fused kernel.
  tg = result["targets"]
  kernel = tg["fused_kernel"]
  assert tg["fused_beats_naive"]["applies"] == kernel
  assert tg["fused_not_slower_than_naive"]["applies"] == (not kernel)
  items = tg["fused_not_slower_than_naive"]["items"]
  assert [it["value"] for it in items] == [x["time"] for x in rat["fused_over_naive"]]
  affine = {it["seq_len"]: it["value"] for it in tg["affine_overhead"]["items"]}
  assert affine == pytest.approx({n: t("affine", "fused", n) / t("softmax", "fused", n)
                                  for n in seqs})
  assert isinstance(tg["all_applicable_pass"], bool)


def _row(kind, impl, n, sec, peak, batch):
  return {"scope": "layer", "kind": kind, "impl": impl, "seq_len": n, "batch": batch,
          "error": None, "time_s": {"median": sec},
          "memory": {"peak_bytes": peak, "temp_bytes": peak,
                     "per_sequence_bytes": peak / batch}}


def test_targets_on_synthetic_rows():
  """A fused kernel with linear memory, faster than naive, affine 3% over softmax: pass;
  affine 10% over: that one target fails, and is reported, not raised."""
  seqs, tokens = (512, 2048, 8192), 16384

  def rows(affine_over):
    out = []
    for n in seqs:
      b = tokens // n
      for kind, f in (("softmax", 1.0), ("affine", affine_over)):
        out.append(_row(kind, "fused", n, 1.0 * f, 100.0, b))  # constant at fixed tokens
        out.append(_row(kind, "naive", n, 2.0 * f, 100.0 * n, b))  # ~ T: quadratic/seq
    return out

  checks = [{"scope": "layer", "kind": k, "seq_len": n, "out_rel_err": 1e-3,
             "grad_rel_err": 2e-3, "loss_rel_err": 0.0} for k in ("softmax", "affine")
            for n in seqs]
  for over, ok in ((1.03, True), (1.10, False)):
    r = rows(over)
    rat = bench.ratios(r)
    tg = bench.targets(r, rat, checks, "cudnn", "bfloat16")
    assert tg["fused_beats_naive"]["applies"] and tg["fused_beats_naive"]["pass"]
    lin = tg["fused_memory_linear"]
    assert lin["pass"] and all(it["value"] == pytest.approx(1.0) for it in lin["items"])
    naive_growth = [g for g in rat["memory_growth"] if g["impl"] == "naive"
                    and (g["from"], g["to"]) == (512, 8192)]
    assert all(g["exponent"] == pytest.approx(2.0) for g in naive_growth)  # quadratic
    assert tg["affine_overhead"]["pass"] is ok
    assert tg["all_applicable_pass"] is ok
    assert not tg["fused_not_slower_than_naive"]["applies"]
  assert not bench.targets(r, rat, [], "cudnn", "bfloat16")["fused_equals_naive"]["pass"]
  # On CPU (no fused kernel) 1e-3 exceeds float32's tolerance: reported as a failure.
  cpu = bench.targets(r, rat, checks, "xla", "float32")
  assert cpu["fused_not_slower_than_naive"]["applies"]
  assert cpu["fused_not_slower_than_naive"]["pass"]
  assert not cpu["fused_equals_naive"]["pass"] and not cpu["all_applicable_pass"]
  assert not cpu["affine_overhead"]["applies"]


def test_cli_paths_and_kinds(tmp_path):
  assert bench._out_paths(str(tmp_path / "x.json"), "s") == (tmp_path / "x.json",
                                                             tmp_path / "x.md")
  assert bench._out_paths(str(tmp_path), "s") == (tmp_path / "s.json", tmp_path / "s.md")
  with pytest.raises(SystemExit):
    bench.main(["--quick", "--kinds", "no_such_kind", "--out", str(tmp_path)])
