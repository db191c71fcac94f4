"""Metric writers: one `write_scalars` call, several sinks (JSONL, TensorBoard), and plots.

    with create_default_writer(workdir) as writer:   # workdir/metrics.jsonl + tensorboard/
      writer.write_hparams({"lr": 3e-3, "preset": "tiny"})
      writer.write_scalars(step, {"train/loss": loss, "train/lr": lr})

    records = read_jsonl(workdir / "metrics.jsonl")
    plot_curves({"train": scalar_series(records, "train/loss")}, workdir / "loss.png",
                title="loss", ylabel="nats/token")

The interface follows clu's `metric_writers` and levanter's trackers: a writer takes a
step and a mapping of scalars; `MultiWriter` fans out to several. Values may be Python,
NumPy or JAX scalars (any size-1 array); converting a JAX array waits for it, so a
trainer that logs every step should fetch a batch of metrics at once.

JSONL is the record a run is judged by: one line per call, written with a single
`write` on an O_APPEND file, so a killed process leaves only whole lines and a resumed
run appends to the same file. Non-finite values are written as the JSON strings "nan",
"inf" and "-inf" (bare NaN is not JSON); `read_jsonl` turns them back into floats.
After a resume the file can hold a step twice (the steps logged after the last
checkpoint, then again by the resumed run); `scalar_series` keeps the later record.

TensorBoard event files are written by tensorboardX, which needs neither TensorFlow nor
the `tensorboard` package.
"""

from __future__ import annotations

import abc
import json
import math
import operator
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

PathLike = str | os.PathLike

# How JSONL spells the floats that JSON cannot.
_JSON_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _step(step: Any) -> int:
  """A non-negative Python int from an int-like step (Python, NumPy or JAX integer)."""
  try:
    step = operator.index(step)
  except TypeError:
    raise TypeError(f"step must be an integer, got {type(step).__name__}") from None
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  return int(step)


def _scalar(key: str, value: Any) -> int | float:
  """A Python int or float from a Python, NumPy or JAX scalar (any size-1 array)."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, (int, float)):
    return value
  try:
    arr = np.asarray(value)  # a jax.Array waits for its computation here
  except Exception as e:
    raise TypeError(f"scalars[{key!r}] is not a number: {type(value).__name__}") from e
  if arr.size != 1:
    raise ValueError(f"scalars[{key!r}] must hold one value, got shape {arr.shape}")
  arr = arr.reshape(())
  if arr.dtype.kind in "biu":
    return int(arr)
  if arr.dtype.kind == "f":
    return float(arr)
  if arr.dtype.kind == "V":  # ml_dtypes (bfloat16, float8) are "V" to NumPy
    try:
      return float(arr)
    except (TypeError, ValueError):
      pass
  raise TypeError(f"scalars[{key!r}] must be a real number, got dtype {arr.dtype}")


def _scalars(scalars: Mapping[str, Any]) -> dict[str, int | float]:
  if not isinstance(scalars, Mapping):
    raise TypeError(f"scalars must be a mapping of name -> value, got {type(scalars).__name__}")
  out = {}
  for key, value in scalars.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f"scalars keys must be non-empty strings, got {key!r}")
    out[key] = _scalar(key, value)
  return out


class MetricWriter(abc.ABC):
  """Where metrics go. Subclasses write scalars; hparams, flush and close are optional.

  A writer is a context manager: `with writer:` closes it on exit.
  """

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Records `scalars` (name -> Python, NumPy or JAX scalar) at training step `step`."""

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyperparameters once; writers that cannot store them ignore them."""
    del hparams

  def flush(self) -> None:
    """Pushes buffered records to storage."""

  def close(self) -> None:
    """Flushes and releases the sink; later writes are errors."""
    self.flush()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _jsonable(value: int | float) -> int | float | str:
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


class JsonlWriter(MetricWriter):
  """Appends one JSON object per call, `{"step": step, **scalars}`, to a file.

  Each line goes to the OS in a single `write` on a file opened with O_APPEND and no
  user-space buffer, so a killed process leaves only whole lines and nothing waits in
  memory to be flushed. Opening an existing file appends to it (a resumed run continues
  the record). Non-finite floats are written as the strings "nan", "inf", "-inf".
  `write_hparams` writes one line `{"hparams": {...}}` (values that are not JSON become
  their `str`).

  Args:
    path: the JSONL file; its parent directory must exist.
  """

  def __init__(self, path: PathLike):
    self.path = pathlib.Path(path)
    try:
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
      raise OSError(f"path={str(self.path)!r} cannot be opened for appending: {e}") from e
    # A crash of some other writer can leave a last line without its newline; start a
    # fresh line so that our first record is not glued to it.
    size = os.fstat(self._fd).st_size
    if size:
      with open(self.path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
          self._write(b"\n")

  def _write(self, data: bytes) -> None:
    if self._fd is None:
      raise ValueError(f"JsonlWriter({str(self.path)!r}) is closed")
    view = memoryview(data)
    while view:  # os.write may write less than asked (rare for regular files)
      view = view[os.write(self._fd, view):]

  def _write_record(self, record: Mapping[str, Any]) -> None:
    line = json.dumps(record, allow_nan=False, separators=(", ", ": "))
    self._write((line + "\n").encode("utf-8"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    step = _step(step)
    values = _scalars(scalars)
    if "step" in values:
      raise ValueError("scalars must not contain the key 'step' (the JSONL step field)")
    self._write_record({"step": step, **{k: _jsonable(v) for k, v in values.items()}})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if not isinstance(hparams, Mapping):
      raise TypeError(f"hparams must be a mapping, got {type(hparams).__name__}")
    self._write_record({"hparams": json.loads(json.dumps(dict(hparams), default=str))})

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def _from_json(value: Any) -> Any:
  if isinstance(value, str):
    return _JSON_TO_NONFINITE.get(value, value)
  return value


def read_jsonl(path: PathLike, *, skip_invalid: bool = False) -> list[dict[str, Any]]:
  """The records of a JSONL file, with "nan"/"inf"/"-inf" turned back into floats.

  Only top-level values are decoded (hparams lines are returned as written).

  Args:
    path: a file written by `JsonlWriter`.
    skip_invalid: drop lines that are not JSON objects (e.g. a line cut short by a
      machine crash) instead of raising.

  Returns:
    One dict per line, in file order; blank lines are skipped.
  """
  path = pathlib.Path(path)
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError(f"expected a JSON object, got {type(record).__name__}")
      except ValueError as e:
        if skip_invalid:
          continue
        raise ValueError(f"{path}:{lineno} is not a JSON object: {e}") from e
      records.append({k: _from_json(v) for k, v in record.items()})
  return records


def scalar_series(records: Iterable[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
  """(step, value) pairs of `key`, sorted by step; for a step logged twice, the later wins.

  A step appears twice after a resume: once from the run that was killed after its last
  checkpoint, then from the resumed run, which is the one that continued.
  """
  by_step = {}
  for record in records:
    if key in record and "step" in record:
      by_step[int(record["step"])] = float(record[key])
  return sorted(by_step.items())


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files via tensorboardX (no TensorFlow, no `tensorboard` package).

  Each scalar becomes a `simple_value` summary (float32) under its name as the tag;
  hparams become a text summary "hparams" holding a JSON block.

  Args:
    logdir: directory for the event files; created if missing.
    purge_step: on resume, the step the run restarts from: TensorBoard then hides the
      events at or after it that the earlier run wrote, so curves do not double back.
    flush_secs: how often the background thread flushes events to disk.
  """

  def __init__(self, logdir: PathLike, *, purge_step: int | None = None, flush_secs: int = 30):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("TensorBoardWriter needs tensorboardX (pip install tensorboardX)") from e
    self.logdir = pathlib.Path(logdir)
    if purge_step is not None:
      purge_step = _step(purge_step)
    try:
      self.logdir.mkdir(parents=True, exist_ok=True)
      self._writer = SummaryWriter(logdir=str(self.logdir), purge_step=purge_step,
                                   flush_secs=flush_secs)
    except OSError as e:
      raise OSError(f"logdir={str(self.logdir)!r} cannot be written: {e}") from e
    self._closed = False

  def _check_open(self):
    if self._closed:
      raise ValueError(f"TensorBoardWriter({str(self.logdir)!r}) is closed")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._check_open()
    step = _step(step)
    for key, value in _scalars(scalars).items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._check_open()
    if not isinstance(hparams, Mapping):
      raise TypeError(f"hparams must be a mapping, got {type(hparams).__name__}")
    text = json.dumps(dict(hparams), indent=2, sort_keys=True, default=str)
    # Indented by four spaces: a Markdown code block, which the text plugin shows verbatim.
    self._writer.add_text("hparams", "\n".join("    " + l for l in text.splitlines()),
                          global_step=0)

  def flush(self) -> None:
    if not self._closed:
      self._writer.flush()

  def close(self) -> None:
    if not self._closed:
      self._writer.close()
      self._closed = True


class MultiWriter(MetricWriter):
  """Writes every call to each of `writers`, in order.

  `flush` and `close` reach every writer even when one fails; the first error is raised.

  Args:
    writers: the `MetricWriter`s to fan out to (may be empty: a writer that drops all).
  """

  def __init__(self, writers: Iterable[MetricWriter]):
    self.writers = tuple(writers)
    for i, w in enumerate(self.writers):
      if not isinstance(w, MetricWriter):
        raise TypeError(f"writers[{i}] must be a MetricWriter, got {type(w).__name__}")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_hparams(hparams)

  def _each(self, method: str) -> None:
    error = None
    for w in self.writers:
      try:
        getattr(w, method)()
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    if error is not None:
      raise error

  def flush(self) -> None:
    self._each("flush")

  def close(self) -> None:
    self._each("close")


def create_default_writer(workdir: PathLike, *, jsonl: bool = True, tensorboard: bool = True,
                          name: str = "metrics", purge_step: int | None = None) -> MultiWriter:
  """The usual sinks of a run: `workdir/<name>.jsonl` and `workdir/tensorboard/`.

  Args:
    workdir: the run directory; created if missing.
    jsonl: write `workdir/<name>.jsonl` (appended to if it exists).
    tensorboard: write TensorBoard event files under `workdir/tensorboard/`.
    name: stem of the JSONL file.
    purge_step: on resume, the step the run restarts from (see `TensorBoardWriter`).

  Returns:
    A `MultiWriter` of the chosen writers (none: a writer that drops everything, e.g.
    for the processes other than 0 of a multi-host run).

  Raises:
    OSError: `workdir` cannot be created or written; the message names it.
  """
  if not name or os.sep in name or (os.altsep and os.altsep in name):
    raise ValueError(f"name must be a plain file stem, got {name!r}")
  workdir = pathlib.Path(workdir)
  if not jsonl and not tensorboard:
    return MultiWriter([])
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OSError(f"workdir={str(workdir)!r} cannot be created: {e}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise OSError(f"workdir={str(workdir)!r} is not writable")
  writers = []
  try:
    if jsonl:
      writers.append(JsonlWriter(workdir / f"{name}.jsonl"))
    if tensorboard:
      writers.append(TensorBoardWriter(workdir / "tensorboard", purge_step=purge_step))
  except OSError as e:
    for w in writers:
      w.close()
    raise OSError(f"workdir={str(workdir)!r} cannot be written: {e}") from e
  return MultiWriter(writers)


def _as_curves(series: Mapping[str, Sequence[tuple[float, float]]], where: str) -> dict:
  if not isinstance(series, Mapping) or not series:
    raise ValueError(f"{where} must be a non-empty mapping of label -> [(step, value), ...]")
  curves = {}
  for label, points in series.items():
    arr = np.asarray(list(points), dtype=np.float64)
    if arr.size and (arr.ndim != 2 or arr.shape[1] != 2):
      raise ValueError(f"{where}[{label!r}] must be a sequence of (step, value) pairs, "
                       f"got shape {arr.shape}")
    curves[label] = arr.reshape(-1, 2)
  return curves


def plot_curves(series: Mapping[str, Sequence[tuple[float, float]]], path: PathLike, *,
                title: str, ylabel: str, logy: bool = False, xlabel: str = "step") -> pathlib.Path:
  """Saves a PNG with one line per named series of (step, value) pairs.

  Draws on a Figure with the Agg canvas directly rather than through pyplot, so it works
  headless and leaves the process's matplotlib backend (e.g. a notebook's) alone. The
  file is written to a temporary name and renamed, so a reader never sees half a PNG.
  Non-finite values leave gaps; with `logy`, values <= 0 are not drawn.

  Args:
    series: label -> sequence of (step, value); at least one series.
    path: the PNG to write; its parent directory is created if missing.
    title: the plot title.
    ylabel: the y-axis label.
    logy: log-scale y axis.
    xlabel: the x-axis label.

  Returns:
    `path` as a `pathlib.Path`.
  """
  _as_curves(series, "series")  # errors name `series`
  return plot_panels({title: series}, path, ylabel=ylabel, logy=logy, xlabel=xlabel)


def plot_panels(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
                path: PathLike, *, ylabel: str, logy: bool = False, xlabel: str = "step",
                suptitle: str | None = None) -> pathlib.Path:
  """Like `plot_curves`, with one subplot per panel (title -> series), side by side."""
  if not isinstance(panels, Mapping) or not panels:
    raise ValueError("panels must be a non-empty mapping of title -> series")
  curves = {title: _as_curves(series, f"panels[{title!r}]")
            for title, series in panels.items()}

  # Lazy: matplotlib costs ~0.3 s to import and only plotting needs it.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  n = len(curves)
  fig = Figure(figsize=(6.4 if n == 1 else 4.6 * n, 4.0), dpi=100)
  FigureCanvasAgg(fig)
  for k, (title, by_label) in enumerate(curves.items()):
    ax = fig.add_subplot(1, n, k + 1)
    for label, arr in by_label.items():
      ax.plot(arr[:, 0], arr[:, 1], label=str(label), linewidth=1.2)
    if logy:
      ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if k == 0:
      ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, which="both" if logy else "major")
    if len(by_label) > 1:
      ax.legend()
  if suptitle:
    fig.suptitle(suptitle)
  fig.tight_layout()

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, format="png")
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a plot is meant to be read
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path
