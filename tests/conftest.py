import pytest
from flax import nnx

import jaxsun


@pytest.fixture
def cfg():
  # A larger init scale than the preset's 0.02 gives peaked attention and logits, so
  # that a wrong mask, position or tree would move the numbers the tests compare.
  return jaxsun.ModelConfig.preset("tiny", init_std=0.25)


@pytest.fixture
def model(cfg):
  return jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(autouse=True, scope="session")
def _tfds_dir_per_session(tmp_path_factory):
  """Datasets prepared by tests go to a temporary TFDS dir, not ~/.cache/jaxsun/tfds."""
  import os  # pylint: disable=g-import-not-at-top
  if "JAXSUN_TFDS_DIR" not in os.environ:
    os.environ["JAXSUN_TFDS_DIR"] = str(tmp_path_factory.mktemp("tfds"))
  yield


# -- native crashes under pytest-xdist -------------------------------------------------------
# A worker process that dies (a segfault inside a native library, not a Python failure) takes
# its current test with it. The CI and one local full run saw this in a test that passes
# alone (tests/test_shared_inference.py; a segfault in libgcc_s's unwinder on a 2-core
# machine); other full runs passed. Such a test gets one more run on the fresh worker
# xdist starts; a second crash fails it, and every rerun is counted in the summary
# ("1 rerun") with the worker's native traceback above it.
_CRASH_RERUNS = 1
_crashes: dict[str, int] = {}
_session_config = []


def pytest_configure(config):
  _session_config[:] = [config]


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
  _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
  if _crashes[crashitem] <= _CRASH_RERUNS:
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"
    report.longrepr = f"{report.longrepr}: rescheduled once on a fresh worker"
    tr = (_session_config[0].pluginmanager.get_plugin("terminalreporter")
          if _session_config else None)
    if tr is not None:  # name it in the log: `-q` shows a rerun only as "R"
      tr.write_line(f"\nRERUN {crashitem}: its worker crashed; rescheduled once",
                    yellow=True)


def pytest_report_teststatus(report):
  if report.outcome == "rerun":
    return "rerun", "R", ("RERUN (worker crashed)", {"yellow": True})
  return None
