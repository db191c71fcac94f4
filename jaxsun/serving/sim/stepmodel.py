"""Step-time and KV transport models for the serving simulator, and their calibration file.

One engine device call (a prefill call, or a decode chunk of several steps) is described by
physical features (`StepFeatures`) and timed by a per-module model (`ModuleModel`) fitted to
logged engine steps (`StepRecord`):

    models = fit(records)                        # {"prefill": ModuleModel, "decode": ...}
    cal = Calibration(name="cpu-2core-tiny", modules=models,
                      transports={"in_process": TransportModel.fit(nbytes, seconds)},
                      source="measured", device={...}, versions={...})
    cal.save("calibrations/cpu-2core-tiny.json")
    seconds = Calibration.load(path).predict("decode", StepFeatures(steps=8, ...))

The linear model is `coef . features`, fitted by non-negative least squares (unbiased in
total time, which a simulator's queues integrate); the table
model corrects it locally with the means of logged points. Held-out MAPE picks between
them, unless the better one misses the held-out total time by more than MAX_BIAS.
KV transfers cost
`alpha + bytes / bandwidth`.

Only numpy and scipy: the simulator runs where jax is absent or must not be initialised.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import optimize

SCHEMA_VERSION = 1

FEATURES = ("calls", "steps", "prefill_tokens", "prefill_attn", "decode_rows", "kv_tokens",
            "weight_bytes", "inserts")

MIN_SECONDS = 1e-9  # predictions are clamped here: a step never takes zero time
TABLE_K = 4  # nearest table points averaged by `ModuleModel.from_table`
MAX_BIAS = 0.1  # a predictor missing the held-out total time by more is not chosen
MIN_HELDOUT_RECORDS = 8  # below this, `fit_module` fits on everything and reports no MAPE


def _finite_nonneg(name: str, value: Any) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} must be a number") from None
  if not math.isfinite(x) or x < 0:
    raise ValueError(f"{name}={value!r} must be finite and >= 0")
  return x


def _optional_float(name: str, value: Any) -> float | None:
  return None if value is None else _finite_nonneg(name, value)


def _check_keys(what: str, d: Mapping, known: Sequence[str], required: Sequence[str] = ()):
  if not isinstance(d, Mapping):
    raise ValueError(f"{what}: expected a dict, got {d!r}")
  extra = sorted(set(d) - set(known))
  if extra:
    raise ValueError(f"{what}: unknown keys {extra}; known: {sorted(known)}")
  missing = [k for k in required if k not in d]
  if missing:
    raise ValueError(f"{what}: missing keys {missing}")


def _fields(cls) -> list[str]:
  return [fl.name for fl in dataclasses.fields(cls)]


def _required(cls) -> list[str]:
  return [fl.name for fl in dataclasses.fields(cls)
          if fl.default is dataclasses.MISSING and fl.default_factory is dataclasses.MISSING]


@dataclasses.dataclass(frozen=True)
class StepFeatures:
  """What one device call computes and reads; every field finite and >= 0.

  Attributes:
    calls: device calls (1 per logged record).
    steps: decode steps executed (0 for prefill).
    prefill_tokens: tokens computed by a prefill call (padded).
    prefill_attn: sum over those query tokens of the context length each attends to.
    decode_rows: sum over steps of rows computed (decode batch size x steps).
    kv_tokens: sum over steps of KV tokens read by attention.
    weight_bytes: weight bytes read (one pass per prefill call, one per decode step).
    inserts: requests admitted into the decode batch for this chunk (receiving the KV,
      checking its digest, writing it into the store: host and device work per request).
  """
  calls: float = 1.0
  steps: float = 0.0
  prefill_tokens: float = 0.0
  prefill_attn: float = 0.0
  decode_rows: float = 0.0
  kv_tokens: float = 0.0
  weight_bytes: float = 0.0
  inserts: float = 0.0

  def __post_init__(self):
    for name in FEATURES:
      object.__setattr__(self, name, _finite_nonneg(name, getattr(self, name)))

  def vector(self) -> np.ndarray:
    """The features as float64[len(FEATURES)], in `FEATURES` order."""
    return np.array([getattr(self, name) for name in FEATURES], np.float64)

  @classmethod
  def from_vector(cls, v: Sequence[float]) -> StepFeatures:
    if len(v) != len(FEATURES):
      raise ValueError(f"v has {len(v)} entries; expected {len(FEATURES)} ({FEATURES})")
    return cls(**{name: float(x) for name, x in zip(FEATURES, v)})

  def to_dict(self) -> dict[str, float]:
    return {name: getattr(self, name) for name in FEATURES}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> StepFeatures:
    """Missing features take their defaults; unknown keys are an error (a typo would
    otherwise silently read as zero work)."""
    _check_keys("StepFeatures", d, FEATURES)
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One logged device call: its module key, features and measured time.

  Attributes:
    module: the model it trains, e.g. "prefill", "decode" or "decode:int8".
    features: what the call computed.
    seconds: measured wall time (> 0).
  """
  module: str
  features: StepFeatures
  seconds: float

  def __post_init__(self):
    if not isinstance(self.module, str) or not self.module:
      raise ValueError(f"module={self.module!r} must be a non-empty string")
    if not isinstance(self.features, StepFeatures):
      raise ValueError(f"features={self.features!r} must be a StepFeatures")
    seconds = _finite_nonneg("seconds", self.seconds)
    if seconds <= 0:
      raise ValueError(f"seconds={self.seconds!r} must be > 0")
    object.__setattr__(self, "seconds", seconds)

  def to_dict(self) -> dict[str, Any]:
    return {"module": self.module, "features": self.features.to_dict(), "seconds": self.seconds}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> StepRecord:
    _check_keys("StepRecord", d, ("module", "features", "seconds"), _required(cls))
    return cls(module=d["module"], features=StepFeatures.from_dict(d["features"]),
               seconds=d["seconds"])


@dataclasses.dataclass(frozen=True)
class ModuleModel:
  """Step time of one module: a linear model and a table of logged points.

  Attributes:
    coef: FEATURES name -> seconds per unit (>= 0); a missing name counts as 0.
    table: (feature vector in FEATURES order, mean seconds) points.
    use: which predictor `predict` uses, "linear" or "table".
    heldout_mape: held-out MAPE of the chosen predictor, percent (None: not measured).
    linear_mape: held-out MAPE of the linear predictor.
    table_mape: held-out MAPE of the table predictor.
    n_train: records the final model was fitted on.
  """
  coef: dict[str, float]
  table: tuple[tuple[tuple[float, ...], float], ...] = ()
  use: str = "linear"
  heldout_mape: float | None = None
  linear_mape: float | None = None
  table_mape: float | None = None
  n_train: int = 0
  heldout_bias: float | None = None  # held-out sum(predicted) / sum(measured) - 1

  def __post_init__(self):
    if not isinstance(self.coef, Mapping):
      raise ValueError(f"coef={self.coef!r} must be a mapping of FEATURES names to floats")
    _check_keys("coef", self.coef, FEATURES)
    coef = {name: _finite_nonneg(f"coef[{name!r}]", c) for name, c in self.coef.items()}
    table = []
    for i, point in enumerate(self.table):
      try:
        vec, seconds = point
        vec = tuple(_finite_nonneg(f"table[{i}] feature", x) for x in vec)
      except (TypeError, ValueError) as e:
        raise ValueError(f"table[{i}]={point!r} must be (feature vector, seconds): {e}") from None
      if len(vec) != len(FEATURES):
        raise ValueError(f"table[{i}] has {len(vec)} features; expected {len(FEATURES)}")
      seconds = _finite_nonneg(f"table[{i}] seconds", seconds)
      table.append((vec, seconds))
    if self.use not in ("linear", "table"):
      raise ValueError(f"use={self.use!r} must be 'linear' or 'table'")
    if self.use == "table" and not table:
      raise ValueError("use='table' needs a non-empty table")
    if isinstance(self.n_train, bool) or not isinstance(self.n_train, int) or self.n_train < 0:
      raise ValueError(f"n_train={self.n_train!r} must be an integer >= 0")
    object.__setattr__(self, "coef", coef)
    object.__setattr__(self, "table", tuple(table))
    for name in ("heldout_mape", "linear_mape", "table_mape"):
      object.__setattr__(self, name, _optional_float(name, getattr(self, name)))
    if self.heldout_bias is not None:
      if not math.isfinite(float(self.heldout_bias)):
        raise ValueError(f"heldout_bias={self.heldout_bias!r} must be finite")
      object.__setattr__(self, "heldout_bias", float(self.heldout_bias))
    # Precomputed arrays (not fields: equality and serialisation ignore them); the
    # simulator predicts many times per model.
    c = np.array([coef.get(name, 0.0) for name in FEATURES], np.float64)
    object.__setattr__(self, "_c", c)
    if table:
      points = np.array([v for v, _ in table], np.float64)
      logp = np.log1p(points)
      vary = logp.max(axis=0) > logp.min(axis=0)
      object.__setattr__(self, "_points", points)
      object.__setattr__(self, "_logp", logp[:, vary])
      object.__setattr__(self, "_vary", vary)
      object.__setattr__(self, "_times", np.array([t for _, t in table], np.float64))
      object.__setattr__(self, "_lin_points", points @ c)

  def _dot(self, v: np.ndarray) -> float:
    return float(v @ self._c)

  def linear(self, f: StepFeatures) -> float:
    """coef . features, in seconds (clamped to >= MIN_SECONDS)."""
    return max(self._dot(f.vector()), MIN_SECONDS)

  def from_table(self, f: StepFeatures) -> float:
    """The table's estimate, in seconds (clamped to >= MIN_SECONDS).

    An exact hit returns that point's time. Otherwise the TABLE_K nearest points in log1p
    feature space (the columns that vary in the table) are averaged with inverse-distance
    weights, each point's time first scaled by linear(f) / linear(point) so the table only
    corrects the linear model locally and extrapolates with it. An empty table falls back
    to `linear`.
    """
    if not self.table:
      return self.linear(f)
    v = f.vector()
    exact = np.flatnonzero(np.all(self._points == v, axis=1))
    if exact.size:
      return max(float(self._times[exact[0]]), MIN_SECONDS)
    d = np.sqrt(((self._logp - np.log1p(v[self._vary])) ** 2).sum(axis=1))
    k = min(TABLE_K, d.size)
    near = np.argpartition(d, k - 1)[:k] if k < d.size else np.arange(d.size)
    d, times, lin_points = d[near], self._times[near], self._lin_points[near]
    lin_f = self._dot(v)
    if lin_f > 0:
      # Points the linear model gives no time cannot be scaled; they count as they are.
      ok = lin_points > 0
      times = np.where(ok, times * lin_f / np.where(ok, lin_points, 1.0), times)
    at = d == 0  # equal on every varying column: those points decide alone
    w = at.astype(np.float64) if at.any() else 1.0 / d**2
    return max(float((w * times).sum() / w.sum()), MIN_SECONDS)

  def predict(self, f: StepFeatures) -> float:
    """Seconds for one device call with features `f` (> 0), by the chosen predictor."""
    return self.from_table(f) if self.use == "table" else self.linear(f)

  def to_dict(self) -> dict[str, Any]:
    return {
        "coef": dict(self.coef),
        "table_features": list(FEATURES),
        "table": [[list(v), t] for v, t in self.table],
        "use": self.use,
        "heldout_mape": self.heldout_mape,
        "linear_mape": self.linear_mape,
        "table_mape": self.table_mape,
        "n_train": self.n_train,
        "heldout_bias": self.heldout_bias,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModuleModel:
    _check_keys("ModuleModel", d, [*_fields(cls), "table_features"], _required(cls))
    d = dict(d)
    order = d.pop("table_features", list(FEATURES))
    if list(order) != list(FEATURES):
      raise ValueError(f"table_features={order!r} differ from this version's FEATURES "
                       f"{list(FEATURES)}; refit the calibration")
    d["table"] = tuple((tuple(v), t) for v, t in d.get("table", ()))
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class TransportModel:
  """KV transfer time `alpha_s + nbytes / bandwidth_Bps`.

  Attributes:
    alpha_s: fixed latency per transfer, seconds (>= 0).
    bandwidth_Bps: bytes per second (> 0; math.inf for a size-independent transfer).
  """
  alpha_s: float
  bandwidth_Bps: float

  def __post_init__(self):
    object.__setattr__(self, "alpha_s", _finite_nonneg("alpha_s", self.alpha_s))
    try:
      bw = float(self.bandwidth_Bps)
    except (TypeError, ValueError):
      raise ValueError(f"bandwidth_Bps={self.bandwidth_Bps!r} must be a number") from None
    if not bw > 0:  # also rejects nan
      raise ValueError(f"bandwidth_Bps={self.bandwidth_Bps!r} must be > 0 (math.inf allowed)")
    object.__setattr__(self, "bandwidth_Bps", bw)

  def seconds(self, nbytes: int) -> float:
    nbytes = _finite_nonneg("nbytes", nbytes)
    return self.alpha_s + nbytes / self.bandwidth_Bps

  @classmethod
  def fit(cls, nbytes: Sequence[int], seconds: Sequence[float]) -> TransportModel:
    """Non-negative least squares of seconds on [1, nbytes]; a zero slope gives an
    infinite bandwidth."""
    x = np.asarray(nbytes, np.float64).reshape(-1)
    y = np.asarray(seconds, np.float64).reshape(-1)
    if x.size != y.size or x.size == 0:
      raise ValueError(f"nbytes and seconds must be non-empty and equally long; got "
                       f"{x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
      raise ValueError("nbytes must be finite and >= 0")
    if not (np.all(np.isfinite(y)) and np.all(y >= 0)):
      raise ValueError("seconds must be finite and >= 0")
    scale = x.max() or 1.0  # bytes run to 1e9+: scale the column so NNLS is well conditioned
    (alpha, slope), _ = optimize.nnls(np.stack([np.ones_like(x), x / scale], axis=1), y)
    slope /= scale
    return cls(alpha_s=float(alpha), bandwidth_Bps=1.0 / slope if slope > 0 else math.inf)

  def to_dict(self) -> dict[str, Any]:
    # Strict JSON has no Infinity; float("inf") reads the string back.
    bw = self.bandwidth_Bps
    return {"alpha_s": self.alpha_s, "bandwidth_Bps": "inf" if math.isinf(bw) else bw}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TransportModel:
    _check_keys("TransportModel", d, ("alpha_s", "bandwidth_Bps"), _required(cls))
    return cls(alpha_s=d["alpha_s"], bandwidth_Bps=float(d["bandwidth_Bps"]))


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Fitted step-time and transport models for one device and engine configuration.

  Attributes:
    name: e.g. "cpu-2core-tiny" or "h100-8b-published".
    modules: module key -> its step-time model.
    transports: transport name -> its model, e.g. {"in_process": ..., "nvlink": ...}.
    source: "measured" or "derived from published figures: <what>".
    device: e.g. {"platform": "cpu", "device_kind": "cpu", "cores": 2}.
    versions: e.g. {"jax": "0.11.2", "jaxsun": "<git sha>"}.
    engine: how the engine's work was shaped ({"layout", "slots", "capacity", "chunk",
      "model", ...}; free-form, JSON-serialisable).
    date: when it was measured or derived.
    notes: free text.
    schema: the file format version (SCHEMA_VERSION).
  """
  name: str
  modules: dict[str, ModuleModel]
  transports: dict[str, TransportModel]
  source: str
  device: dict
  versions: dict
  engine: dict = dataclasses.field(default_factory=dict)
  date: str = ""
  notes: str = ""
  schema: int = SCHEMA_VERSION

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"name={self.name!r} must be a non-empty string")
    for field in ("source", "date", "notes"):
      if not isinstance(getattr(self, field), str):
        raise ValueError(f"{field}={getattr(self, field)!r} must be a string")
    for field, cls in (("modules", ModuleModel), ("transports", TransportModel)):
      value = getattr(self, field)
      if not isinstance(value, Mapping) or not all(
          isinstance(k, str) and isinstance(v, cls) for k, v in value.items()):
        raise ValueError(f"{field} must map names to {cls.__name__}; got {value!r}")
      object.__setattr__(self, field, dict(value))
    for field in ("device", "versions", "engine"):
      if not isinstance(getattr(self, field), Mapping):
        raise ValueError(f"{field}={getattr(self, field)!r} must be a dict")
    if self.schema != SCHEMA_VERSION:
      raise ValueError(f"schema={self.schema!r}; this version reads schema {SCHEMA_VERSION}")

  def predict(self, module: str, f: StepFeatures) -> float:
    """Seconds for one device call of `module` with features `f`."""
    model = self.modules.get(module)
    if model is None:
      raise ValueError(f"unknown module {module!r} in calibration {self.name!r}; known: "
                       f"{sorted(self.modules)}")
    return model.predict(f)

  def transfer_seconds(self, transport: str, nbytes: int) -> float:
    """Seconds to move `nbytes` of KV over `transport`."""
    model = self.transports.get(transport)
    if model is None:
      raise ValueError(f"unknown transport {transport!r} in calibration {self.name!r}; "
                       f"known: {sorted(self.transports)}")
    return model.seconds(nbytes)

  def scaled(self, factor: float) -> Calibration:
    """Every time multiplied by `factor` (coefficients, table times, transport alphas; the
    bandwidths divided): a deliberately wrong calibration, for tests of what relies on it."""
    factor = _finite_nonneg("factor", factor)
    if factor <= 0:
      raise ValueError(f"factor={factor!r} must be > 0")
    modules = {
        key: dataclasses.replace(
            m, coef={k: c * factor for k, c in m.coef.items()},
            table=tuple((v, t * factor) for v, t in m.table))
        for key, m in self.modules.items()}
    transports = {
        key: TransportModel(alpha_s=t.alpha_s * factor, bandwidth_Bps=t.bandwidth_Bps / factor)
        for key, t in self.transports.items()}
    return dataclasses.replace(self, name=f"{self.name}-x{factor:g}", modules=modules,
                               transports=transports)

  def to_dict(self) -> dict[str, Any]:
    return {
        "schema": self.schema,
        "name": self.name,
        "source": self.source,
        "device": dict(self.device),
        "versions": dict(self.versions),
        "engine": dict(self.engine),
        "date": self.date,
        "notes": self.notes,
        "modules": {k: m.to_dict() for k, m in self.modules.items()},
        "transports": {k: t.to_dict() for k, t in self.transports.items()},
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
    # The schema first: a newer file's other keys would otherwise hide the real cause.
    if not isinstance(d, Mapping) or d.get("schema") != SCHEMA_VERSION:
      got = d.get("schema") if isinstance(d, Mapping) else type(d).__name__
      raise ValueError(f"calibration schema {got!r}; this version reads schema "
                       f"{SCHEMA_VERSION}")
    _check_keys("Calibration", d, _fields(cls), _required(cls))
    d = dict(d)
    d["modules"] = {k: ModuleModel.from_dict(m) for k, m in d["modules"].items()}
    d["transports"] = {k: TransportModel.from_dict(t) for k, t in d["transports"].items()}
    return cls(**d)

  def save(self, path: str | os.PathLike) -> None:
    """Writes JSON (indent=1, sorted keys) atomically: a temporary file in the same
    directory, then os.replace, so a reader never sees a half-written calibration."""
    path = os.fspath(path)
    text = json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
      os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
      with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
      os.replace(tmp, path)
    except BaseException:
      try:
        os.unlink(tmp)
      except FileNotFoundError:
        pass
      raise

  @classmethod
  def load(cls, path: str | os.PathLike) -> Calibration:
    with open(path) as fh:
      d = json.load(fh)
    if not isinstance(d, dict) or d.get("schema") != SCHEMA_VERSION:
      got = d.get("schema") if isinstance(d, dict) else type(d).__name__
      raise ValueError(f"{os.fspath(path)}: calibration schema {got!r}; this version reads "
                       f"schema {SCHEMA_VERSION}")
    return cls.from_dict(d)


def mape(pred: Sequence[float], true: Sequence[float]) -> float:
  """Mean absolute percentage error, in percent: 100 * mean(|pred - true| / true)."""
  p = np.asarray(pred, np.float64).reshape(-1)
  t = np.asarray(true, np.float64).reshape(-1)
  if p.size != t.size or t.size == 0:
    raise ValueError(f"pred and true must be non-empty and equally long; got {p.size} and "
                     f"{t.size}")
  if not np.all(t > 0):
    raise ValueError("true must be > 0")
  return float(100.0 * np.mean(np.abs(p - t) / t))


def _fit_linear(x: np.ndarray, y: np.ndarray, cols: np.ndarray) -> dict[str, float]:
  coef = dict.fromkeys(FEATURES, 0.0)
  if not cols.any():
    return coef
  a = x[:, cols]
  # Plain least squares: with the per-call column the residuals sum to zero, so the model
  # is unbiased in total time, which queues and throughput integrate (a relative-error
  # fit lands below the mean of right-skewed timings). Scaling the columns (bytes ~1e10
  # next to calls ~1) keeps NNLS well conditioned.
  scale = np.abs(a).max(axis=0)
  scale[scale == 0] = 1.0  # a requested all-zero column gets a zero coefficient
  c, _ = optimize.nnls(a / scale, y)
  for name, value in zip(np.asarray(FEATURES)[cols], c / scale):
    coef[str(name)] = float(value)
  return coef


def _table(x: np.ndarray, y: np.ndarray) -> tuple[tuple[tuple[float, ...], float], ...]:
  groups = collections.defaultdict(list)
  for v, t in zip(x, y):
    groups[tuple(float(e) for e in v)].append(float(t))
  return tuple((v, float(np.mean(ts))) for v, ts in groups.items())


def fit_module(records: Sequence[StepRecord], *, heldout_fraction: float = 0.25,
               seed: int = 0, features: Sequence[str] | None = None) -> ModuleModel:
  """Fits one module's step-time model to its logged records.

  A seeded permutation splits the records into train and held-out parts. The linear model
  is fitted on the train part by NNLS (least squares), over the FEATURES columns
  not all zero there (or `features`); the table holds the train part's mean time per distinct
  feature vector. The predictor with the lower held-out MAPE is chosen (ties: linear), then
  coefficients and table are refitted on all records, keeping the held-out MAPEs. With
  fewer than MIN_HELDOUT_RECORDS records everything is fitted at once, MAPEs are None and
  the linear predictor is used.

  Args:
    records: the records of one module key.
    heldout_fraction: share of records held out, in (0, 1).
    seed: seeds the split.
    features: FEATURES names the linear model may use (default: those not all zero).

  Returns:
    The fitted ModuleModel (n_train = len(records)).
  """
  records = list(records)
  if not records:
    raise ValueError("records is empty")
  modules = sorted({r.module for r in records})
  if len(modules) != 1:
    raise ValueError(f"records hold modules {modules}; fit_module takes one (use fit)")
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"heldout_fraction={heldout_fraction!r} must be in (0, 1)")
  if features is not None:
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
      raise ValueError(f"features has unknown names {unknown}; known: {list(FEATURES)}")
  x = np.stack([r.features.vector() for r in records])
  y = np.array([r.seconds for r in records], np.float64)

  def columns(rows: np.ndarray) -> np.ndarray:
    if features is not None:
      return np.array([name in features for name in FEATURES])
    return np.any(x[rows] != 0, axis=0)

  n = len(records)
  everything = np.arange(n)
  if n < MIN_HELDOUT_RECORDS:
    return ModuleModel(coef=_fit_linear(x, y, columns(everything)), table=_table(x, y),
                       n_train=n)
  perm = np.random.default_rng(seed).permutation(n)
  n_held = min(max(1, round(n * heldout_fraction)), n - 1)
  held, train = perm[:n_held], perm[n_held:]
  trial = ModuleModel(coef=_fit_linear(x[train], y[train], columns(train)),
                      table=_table(x[train], y[train]))
  held_features = [records[i].features for i in held]
  pred = {"linear": [trial.linear(f) for f in held_features],
          "table": [trial.from_table(f) for f in held_features]}
  errs = {k: mape(v, y[held]) for k, v in pred.items()}
  bias = {k: float(np.sum(v) / np.sum(y[held]) - 1.0) for k, v in pred.items()}
  # The lower held-out MAPE, unless that predictor misses the total time by more than
  # MAX_BIAS (a simulator's queues integrate it) and the other does not.
  use = "table" if errs["table"] < errs["linear"] else "linear"
  other = "linear" if use == "table" else "table"
  if abs(bias[use]) > MAX_BIAS and abs(bias[other]) < abs(bias[use]):
    use = other
  return ModuleModel(coef=_fit_linear(x, y, columns(everything)), table=_table(x, y), use=use,
                     heldout_mape=errs[use], linear_mape=errs["linear"],
                     table_mape=errs["table"], heldout_bias=bias[use], n_train=n)


def fit(records: Sequence[StepRecord], **kw) -> dict[str, ModuleModel]:
  """Fits one ModuleModel per module key (`kw` goes to `fit_module`)."""
  groups: dict[str, list[StepRecord]] = {}
  for r in records:
    groups.setdefault(r.module, []).append(r)
  return {module: fit_module(rs, **kw) for module, rs in groups.items()}
