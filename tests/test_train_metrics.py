"""Metric writers (JSONL, TensorBoard read back without TF), progress timing, plots."""

import io
import json
import math
import os
import pathlib
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsun.train import metrics
from jaxsun.train import progress as progress_lib


# --- JSONL -------------------------------------------------------------------------------


def test_jsonl_round_trip_numpy_and_jax_scalars(tmp_path):
  path = tmp_path / "m.jsonl"
  with metrics.JsonlWriter(path) as w:
    w.write_hparams({"lr": 3e-3, "preset": "tiny", "shape": (2, 3)})
    w.write_scalars(np.int64(1), {"loss": np.float32(2.5), "lr": jnp.float32(1e-3),
                                  "tokens": np.int64(4096), "acc": jnp.asarray([0.25]),
                                  "bf16": jnp.bfloat16(1.5), "ok": np.bool_(True)})
    w.write_scalars(jnp.int32(2), {"loss": 2.25})
  hp, r1, r2 = metrics.read_jsonl(path)
  assert hp == {"hparams": {"lr": 3e-3, "preset": "tiny", "shape": [2, 3]}}
  assert r1 == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3, rel=1e-6), "tokens": 4096,
                "acc": 0.25, "bf16": 1.5, "ok": 1}
  assert type(r1["tokens"]) is int and type(r1["loss"]) is float
  assert r2 == {"step": 2, "loss": 2.25}


def test_jsonl_appends_on_reopen_and_isolates_a_cut_line(tmp_path):
  path = tmp_path / "m.jsonl"
  with metrics.JsonlWriter(path) as w:
    w.write_scalars(1, {"loss": 3.0})
  with metrics.JsonlWriter(path) as w:  # a resumed run
    w.write_scalars(2, {"loss": 2.0})
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]

  with open(path, "a") as f:  # a line cut short by a crash
    f.write('{"step": 3, "lo')
  with metrics.JsonlWriter(path) as w:
    w.write_scalars(3, {"loss": 1.0})
  with pytest.raises(ValueError, match=r"m.jsonl:3 is not a JSON object"):
    metrics.read_jsonl(path)
  assert [r["loss"] for r in metrics.read_jsonl(path, skip_invalid=True)] == [3.0, 2.0, 1.0]


def test_jsonl_one_write_per_record(tmp_path, monkeypatch):
  # One write(2) per line: a killed process leaves whole lines only.
  w = metrics.JsonlWriter(tmp_path / "m.jsonl")
  calls = []
  real_write = os.write
  monkeypatch.setattr(os, "write",
                      lambda fd, data: calls.append(bytes(data)) or real_write(fd, data))
  w.write_scalars(7, {f"metric_{i}": float(i) for i in range(200)})
  w.close()
  assert len(calls) == 1 and calls[0].endswith(b"\n") and calls[0].count(b"\n") == 1


def test_jsonl_non_finite_values_are_valid_json(tmp_path):
  path = tmp_path / "m.jsonl"
  with metrics.JsonlWriter(path) as w:
    w.write_scalars(5, {"nan": np.float32("nan"), "inf": jnp.inf, "ninf": -math.inf, "x": 1.0})
  line = path.read_text().strip()

  def reject(token):
    raise AssertionError(f"bare {token} is not JSON")

  assert json.loads(line, parse_constant=reject) == {
      "step": 5, "nan": "nan", "inf": "inf", "ninf": "-inf", "x": 1.0}
  (r,) = metrics.read_jsonl(path)
  assert math.isnan(r["nan"]) and r["inf"] == math.inf and r["ninf"] == -math.inf


def test_writer_errors_name_the_argument(tmp_path):
  w = metrics.JsonlWriter(tmp_path / "m.jsonl")
  with pytest.raises(ValueError, match="step must be >= 0"):
    w.write_scalars(-1, {"loss": 1.0})
  with pytest.raises(TypeError, match="step must be an integer"):
    w.write_scalars(1.5, {"loss": 1.0})
  with pytest.raises(ValueError, match=r"scalars\['v'\] must hold one value, got shape \(2,\)"):
    w.write_scalars(1, {"v": np.zeros(2)})
  with pytest.raises(ValueError, match="'step'"):
    w.write_scalars(1, {"step": 1})
  with pytest.raises(TypeError, match=r"scalars\['c'\] must be a real number"):
    w.write_scalars(1, {"c": np.complex64(1j)})
  w.close()
  with pytest.raises(ValueError, match="closed"):
    w.write_scalars(1, {"loss": 1.0})
  with pytest.raises(TypeError, match=r"writers\[1\]"):
    metrics.MultiWriter([metrics.JsonlWriter(tmp_path / "n.jsonl"), object()])


def test_scalar_series_keeps_the_resumed_run():
  records = [{"hparams": {}}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0},
             {"step": 3, "loss": 2.9}, {"step": 2, "loss": 3.1}, {"step": 3, "acc": 0.5},
             {"step": 3, "loss": 2.5}]
  assert metrics.scalar_series(records, "loss") == [(1, 4.0), (2, 3.1), (3, 2.5)]


# --- TensorBoard, read back without TensorFlow --------------------------------------------


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_tfrecords(path: pathlib.Path) -> list[bytes]:
  """TFRecord framing: u64 length, u32 masked crc(length), data, u32 masked crc(data)."""
  buf, pos, records = path.read_bytes(), 0, []
  while pos < len(buf):
    header = buf[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
    assert length_crc == _masked_crc(header)
    data = buf[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
    assert len(data) == length and data_crc == _masked_crc(data)
    records.append(data)
    pos += 16 + length
  return records


def test_crc32c_known_value():
  assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)


def test_tensorboard_events_read_back(tmp_path):
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  values = {1: (2.5, 1e-3), 2: (np.float32(1.0 / 3.0), jnp.float32(2e-3)), 10: (0.125, 3e-3)}
  with metrics.create_default_writer(tmp_path / "run") as w:
    w.write_hparams({"lr": 3e-3, "preset": "tiny"})
    for step, (loss, lr) in values.items():
      w.write_scalars(step, {"train/loss": loss, "train/lr": lr})

  (event_file,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
  scalars, texts = {}, []
  for record in _read_tfrecords(event_file):
    event = event_pb2.Event.FromString(record)
    for v in event.summary.value:
      if v.HasField("simple_value"):
        scalars[(v.tag, event.step)] = v.simple_value
      else:
        texts.append(v.tag)
  expected = {}
  for step, (loss, lr) in values.items():
    expected[("train/loss", step)] = float(np.float32(loss))  # simple_value is a float32
    expected[("train/lr", step)] = float(np.float32(lr))
  assert scalars == expected
  assert any("hparams" in t for t in texts)
  # The JSONL sink of the same writer got the same records.
  records = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in records[1:]] == [1, 2, 10]


def test_create_default_writer_unwritable_workdir(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  with pytest.raises(OSError, match=re.escape(f"workdir='{not_a_dir / 'run'}'")):
    metrics.create_default_writer(not_a_dir / "run")
  with metrics.create_default_writer(tmp_path / "w", tensorboard=False, name="eval") as w:
    w.write_scalars(0, {"acc": 1.0})
  assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["eval.jsonl"]


# --- Progress -----------------------------------------------------------------------------


class FakeClock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t

  def advance(self, seconds):
    self.t += seconds


def test_progress_excludes_compile_from_rate_and_eta():
  clock, out = FakeClock(), io.StringIO()
  p = progress_lib.Progress(total=21, log_every=5, tokens_per_step=1000, file=out, clock=clock)
  assert not p.tty and p.compile_seconds is None and p.eta_seconds is None
  clock.advance(100.0)  # step 1: tracing + compilation
  p.update(1, loss=5.0)
  assert p.compile_seconds == 100.0 and p.steps_per_second is None and p.eta_seconds is None
  for step in range(2, 12):
    clock.advance(1.0)
    p.update(step, loss=jnp.float32(5.0 - 0.1 * step))
  assert p.steps_per_second == 1.0
  assert p.eta_seconds == 10.0
  assert p.tokens_per_second == 1000.0
  assert p.compile_seconds == 100.0
  for step in range(12, 22):
    clock.advance(2.0)
    p.update(step, loss=1.0)
  assert p.steps_per_second == pytest.approx(20 / 30) and p.eta_seconds == 0.0
  p.close()

  lines = out.getvalue().splitlines()
  steps = [int(line.split()[1].split("/")[0]) for line in lines]
  assert steps == [1, 5, 10, 15, 20, 21]  # the compile step, every 5, and the last
  assert lines[0] == "step 1/21  loss 5  compile 100.0s"
  assert lines[2] == "step 10/21  loss 4  1,000 tok/s  ETA 0:00:11"


def test_progress_resume_and_close_prints_last_step():
  clock, out = FakeClock(), io.StringIO()
  p = progress_lib.Progress(total=100, initial=40, skip=2, log_every=10, desc="sun",
                            file=out, clock=clock)
  for step, dt in [(41, 30.0), (42, 1.0), (43, 0.5), (44, 0.5)]:
    clock.advance(dt)
    p.update(step)
  assert p.compile_seconds == 31.0 and p.steps_per_second == 2.0 and p.eta_seconds == 28.0
  with pytest.raises(ValueError, match="step must increase"):
    p.update(44)
  with pytest.raises(ValueError, match="step=101 exceeds total=100"):
    p.update(101)
  p.close()
  assert out.getvalue().splitlines() == ["sun: step 42/100  compile 31.0s",
                                         "sun: step 44/100  2 step/s  ETA 0:00:28"]


def test_progress_bar_on_a_terminal_starts_after_compile():
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  clock, out = FakeClock(), Terminal()
  with progress_lib.Progress(total=21, file=out, clock=clock) as p:
    clock.advance(100.0)
    p.update(1, loss=5.0)
    assert p._bar is not None and p._bar.initial == 1  # pylint: disable=protected-access
    for step in range(2, 12):
      clock.advance(1.0)
      p.update(step, loss=1.0)
    assert p._bar.n == 11 and p.eta_seconds == 10.0  # pylint: disable=protected-access
  assert "11/21" in out.getvalue()


def test_tqdm_rate_counts_only_steps_after_initial():
  # What the bar relies on (tqdm 4.70 format_meter): with no smoothed rate, the rate is
  # (n - initial) / elapsed, so a bar created after compilation with initial=1 is right.
  from tqdm import tqdm
  line = tqdm.format_meter(n=11, total=21, elapsed=10.0, initial=1, unit="step")
  assert "1.00step/s" in line and "<00:10" in line


def test_step_timer_and_tflops():
  clock = FakeClock()
  timer = progress_lib.StepTimer(clock=clock)
  for dt in (50.0, 2.0, 4.0):
    with timer:
      clock.advance(dt)
  assert timer.count == 3 and timer.last_seconds == 4.0
  assert timer.compile_seconds == 50.0 and timer.mean_seconds == 3.0
  assert progress_lib.model_tflops_per_second(6e12, 2.0) == 3.0
  with pytest.raises(ValueError, match="seconds must be finite and > 0"):
    progress_lib.model_tflops_per_second(1e12, 0.0)
  assert progress_lib.format_duration(3725.4) == "1:02:05"


# --- Plots --------------------------------------------------------------------------------


def test_plot_curves_writes_png(tmp_path):
  steps = np.arange(1, 51)
  path = metrics.plot_curves(
      {"train": list(zip(steps, 5.0 / steps)), "eval": [(10, 0.6), (20, float("nan")), (50, 0.2)]},
      tmp_path / "plots" / "loss.png", title="loss", ylabel="nats/token", logy=True)
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temp file left
  with pytest.raises(ValueError, match=r"series\['x'\] must be a sequence of \(step, value\)"):
    metrics.plot_curves({"x": [1, 2, 3]}, tmp_path / "bad.png", title="t", ylabel="y")


def test_plot_panels_draws_one_subplot_per_panel(tmp_path):
  import struct  # pylint: disable=g-import-not-at-top
  one = metrics.plot_curves({"a": [(1, 2.0), (2, 1.0)]}, tmp_path / "one.png", title="t",
                            ylabel="y")
  three = metrics.plot_panels({f"p{i}": {"a": [(1, 2.0), (2, 1.0)], "b": [(1, 3.0)]}
                               for i in range(3)}, tmp_path / "three.png", ylabel="y",
                              logy=True)
  width = lambda p: struct.unpack(">I", p.read_bytes()[16:20])[0]  # PNG IHDR width
  assert width(three) > 2 * width(one)
  with pytest.raises(ValueError, match=r"panels\['p'\]\['x'\]"):
    metrics.plot_panels({"p": {"x": [1, 2]}}, tmp_path / "bad.png", ylabel="y")
