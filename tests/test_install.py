"""A built wheel, installed (not editable) into a fresh venv, works outside the checkout:
the shipped data files load through importlib.resources and `jaxsun-launch` runs the
quickstart's smoke job from a temporary directory, finding the config by name.

The fresh venv gets jaxsun from the wheel only; its dependencies (jax, flax, tfds, ...)
come from this test's environment through a .pth line (no network, no editable finder:
.pth files inside that directory are not executed).
"""

import json
import os
import pathlib
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("install")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", str(ROOT), "-w", str(tmp / "dist")],
                 check=True, capture_output=True, text=True, cwd=tmp)
  (wheel,) = (tmp / "dist").glob("jaxsun-*.whl")
  subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
  py = tmp / "venv" / "bin" / "python"
  purelib = subprocess.check_output(
      [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      text=True).strip()
  deps = [p for p in site.getsitepackages() if "site-packages" in p]
  pathlib.Path(purelib, "_jaxsun_test_deps.pth").write_text("\n".join(deps) + "\n")
  subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                  str(wheel)], check=True, capture_output=True, text=True)
  work = tmp / "elsewhere"
  work.mkdir()
  return py, work


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  env.pop("JAXSUN_DATA_ROOT", None)
  return env


def test_shipped_data_loads_from_the_installed_package(venv):
  py, work = venv
  code = ("import json, jaxsun, jaxsun.data as d\n"
          "from jaxsun.data import paths\n"
          "tok = d.get_tokenizer('bpe4k')\n"
          "print(json.dumps({'file': jaxsun.__file__, 'root': str(paths.data_root()),\n"
          "  'ids': tok.encode('To be, or not to be'),\n"
          "  'task': len(d.load_task('spell_backward', 'test')),\n"
          "  'chunks': len(d.corpus_chunks('shakespeare', 'validation'))}))")
  out = subprocess.run([str(py), "-c", code], cwd=work, env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert "site-packages" in res["file"] and not res["file"].startswith(str(ROOT))
  assert "site-packages" in res["root"]
  assert res["ids"] and res["task"] == 500 and res["chunks"] > 100


def test_launcher_runs_the_smoke_job_by_config_name(venv, tmp_path):
  py, work = venv
  launch = py.parent / "jaxsun-launch"
  out = subprocess.run([str(launch), "--config=quickstart:smoke",
                        f"--workdir={tmp_path / 'qs'}"], cwd=work, env=_env(),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
  results = json.loads((tmp_path / "qs" / "results.json").read_text())
  assert results["tasks"] and all("accuracy" in r for by_regime in results["tasks"].values()
                                  for r in by_regime.values())  # the task x regime table
  bad = subprocess.run([str(launch), "--config=nonesuch", f"--workdir={tmp_path / 'x'}"],
                       cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "no shipped config named 'nonesuch'" in bad.stderr
