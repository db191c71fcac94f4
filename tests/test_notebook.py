"""The notebooks execute top to bottom (on a small setting), so they cannot rot."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).parents[1]


def execute(name, tmp_path, monkeypatch, timeout=300):
  """Runs colab/<name> in a kernel on the small setting; returns the executed notebook."""
  nb = nbformat.read(ROOT / "colab" / name, as_version=4)
  nbformat.validate(nb)
  monkeypatch.setenv("JAXSUN_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAXSUN_TFDS_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The kernel runs in tmp_path: let it import this checkout even when not installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  return nb


def outputs(nb):
  return [out for cell in nb.cells if cell.cell_type == "code"
          for out in cell.get("outputs", [])]


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nb = execute("quickstart.ipynb", tmp_path, monkeypatch)
  text = "\n".join(out.get("text", "") if out.get("output_type") == "stream"
                   else str(out.get("data", {}).get("text/plain", "")) for out in outputs(nb))
  assert "decode tree unchanged: True" in text
  assert "exact match on 16 test items" in text
  assert "prefill-only: step 8/8" in text  # the trainer's progress lines
  # treescope rendered the trees (an HTML display and a text rendering).
  assert any("text/html" in out.get("data", {}) for out in outputs(nb))
  assert "embed" in text


def test_sun_prefillshare_notebook_executes(tmp_path, monkeypatch):
  nb = execute("sun_prefillshare.ipynb", tmp_path, monkeypatch, timeout=600)
  text = "\n".join(out.get("text", "") for out in outputs(nb)
                   if out.get("output_type") == "stream")
  assert text.count("decode tree unchanged: True") == 2  # two SUN task models
  assert "shared batch == each model alone (first 6 rows): True" in text
  assert "spell_backward: exact match" in text and "rotate_matrix: exact match" in text
  assert text.count("== separate run: True") == 3  # one shared KV, three decode trees
  assert "== separate run: False" not in text
  assert "suffix-only prefill == full prefill: True" in text
  assert "saved" in text


def test_import_and_evaluate_notebook_executes(tmp_path, monkeypatch):
  pytest.importorskip("lm_eval")
  nb = execute("import_and_evaluate.ipynb", tmp_path, monkeypatch, timeout=600)
  text = "\n".join(out.get("text", "") for out in outputs(nb)
                   if out.get("output_type") == "stream")
  err = float(text.split("max |logit - transformers| =")[1].split()[0])
  assert err <= 1e-4
  assert text.count("jaxsun_shakespeare_ppl") >= 2  # lm-eval tables before and after
  assert "decode tree unchanged: True" in text
  assert "held-out perplexity" in text
  assert "export -> import is bitwise equal: True" in text


def test_serving_notebook_executes(tmp_path, monkeypatch):
  nb = execute("serving.ipynb", tmp_path, monkeypatch, timeout=600)
  text = "\n".join(out.get("text", "") for out in outputs(nb)
                   if out.get("output_type") == "stream")
  assert text.count("streamed == jaxsun.generate: True") == 2
  assert "streamed == jaxsun.generate: False" not in text
  assert "'completed': 16, 'failed': 0, 'rejected': 0" in text
  assert "decode workers used: ['decode-shared-0']" in text  # one pool for both models
  assert "conventional decode workers: ['decode-code-0', 'decode-math-0']" in text
  assert any("image/png" in out.get("data", {}) for out in outputs(nb))  # the CDF plot


def test_attention_variants_notebook_executes(tmp_path, monkeypatch):
  import json  # pylint: disable=import-outside-toplevel
  import math  # pylint: disable=import-outside-toplevel
  nb = execute("attention_variants.ipynb", tmp_path, monkeypatch)
  text = "\n".join(out.get("text", "") for out in outputs(nb)
                   if out.get("output_type") == "stream")
  for kind in ("softmax", "affine"):  # both variants trained (the trainer's progress lines)
    assert f"trained {kind}: step 40/40" in text
  per_layer = {}
  for label in ("entropy per layer", "first-token mass per layer",
                "per-query mass, mean per layer"):
    for kind in ("softmax", "affine"):
      values = json.loads(text.split(f"{label}: {kind} ")[1].split("\n")[0])
      assert len(values) == 2 and all(math.isfinite(v) for v in values)  # two layers
      per_layer[label, kind] = values
  for kind in ("softmax", "affine"):  # entropy in (0, log T], T = 64 keys
    assert all(0 < v <= math.log(64) + 1e-4 for v in per_layer["entropy per layer", kind])
  assert per_layer["per-query mass, mean per layer", "softmax"] == [1.0, 1.0]
  # The affine model's alpha_ma moved from its initial value (AffineConfig.alpha_ma_init).
  assert "alpha_ma before training: [0.0]" in text
  assert "alpha_ma moved from its initial value: True" in text
  assert float(text.split("(max |change| ")[1].split(")")[0]) > 0
  # Displayed plots: training curves, entropy | first-token mass side by side, alpha_ma.
  assert sum("image/png" in out.get("data", {}) for out in outputs(nb)) == 3


def test_ptq_notebook_executes(tmp_path, monkeypatch):
  nb = execute("ptq.ipynb", tmp_path, monkeypatch)
  text = "\n".join(out.get("text", "") for out in outputs(nb)
                   if out.get("output_type") == "stream")
  assert all(f"{m} w3a16g32: ppl ID" in text for m in ("rtn", "lrq", "uniquanf"))
  uq_params = int(text.split("uniquanf w3a16g32: ppl ID")[1].split(", ")[1].split()[0]
                  .replace(",", ""))
  assert uq_params > 0
  assert "uniquanf layers: ['BCQLinear']" in text
  lrq_params = int(text.split("lrq w3a16g32: ppl ID")[1].split(", ")[1].split()[0]
                   .replace(",", ""))
  assert lrq_params > 0  # LRQ learned something; RTN learns nothing
  assert "0 learnable parameters" in text.split("lrq w3a16g32")[0]
  assert text.count("BCQ outputs == integer outputs: True") == 2  # RTN and LRQ
  assert "BCQ outputs == integer outputs: False" not in text
  assert "BCQLinear" in text
  assert any("image/png" in out.get("data", {}) for out in outputs(nb))


def test_precision_notebook_executes(tmp_path, monkeypatch):
  nb = execute("precision.ipynb", tmp_path, monkeypatch)
  text = "\n".join(out.get("text", "") for out in outputs(nb)
                   if out.get("output_type") == "stream")
  assert "E8M3: max" in text
  # 1.078 at 3 mantissa bits: 1.125 to nearest, 1 truncated.
  assert "nearest  1.125, " in text and "truncate 1, " in text
  for fmt in ("fp32", "e8m3", "e4m7", "fp8_delayed"):
    assert f"\n{fmt:12s} " in "\n" + text, fmt
  assert "E4M3/E4M3/E5M2-delayed" in text
  assert "with NaN        diverged=True" in text and "(nonfinite)" in text
  assert "(above_min)" in text and "fp32 seed 0     diverged=False" in text
  assert sum("image/png" in out.get("data", {}) for out in outputs(nb)) == 1
