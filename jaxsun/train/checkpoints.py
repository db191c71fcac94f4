"""Checkpoints: orbax `CheckpointManager` (every N steps, keep the latest K, async).

A checkpoint is one step directory with two items:

* `state`: the array pytree (trainable trees, optimizer state, step, PRNG key data),
  written with `StandardSave`;
* `meta`: JSON (the data iterator's position, the step, anything the job adds).

Orbax writes a step into a temporary directory and renames it when complete, so a
process killed during a save leaves the previous checkpoints loadable; the unfinished
temporary directory is ignored and cleaned up by the next manager.

    ckpt = Checkpointer(workdir / "checkpoints", keep=2)
    ckpt.save(step, state, meta={"data": it.get_state()})
    restored = ckpt.restore(state_like=state)      # None when there is nothing to resume
    ckpt.close()

Layer layouts (`ModelConfig.scan_layers`): a checkpoint holds the model trees in the
layout they were trained in (per-layer `layers/<i>/...` or stacked `layers/...` arrays,
also in the optimizer moments). To restore one written in the other layout, say so:

    state, meta = ckpt.restore(trainer.state, saved_scan_layers=False)  # into a scanned run
    trainer.state = state

which restores into a template converted to the saved layout and converts the result
back (`convert_layout`; stacking copies the layer arrays once).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxsun.nn import decoder as decoder_lib

# A mapping with these keys is (a tree shaped like) a Decoder's state.
_DECODER_KEYS = frozenset({"embed", "layers", "final_norm"})


def _is_decoder_state(x) -> bool:
  return isinstance(x, Mapping) and _DECODER_KEYS <= set(x.keys())


def convert_layout(tree: Any, scan: bool) -> Any:
  """`tree` with every Decoder state in it (parameters, optimizer moments, ...) in the
  scanned (`scan=True`) or unrolled layer layout; other leaves are kept.

  Works on concrete arrays and on `jax.ShapeDtypeStruct` templates.
  """

  def one(x):
    if not _is_decoder_state(x) or decoder_lib.state_is_scanned(x) == scan:
      return x
    return decoder_lib.stack_state(x) if scan else decoder_lib.unstack_state(x)

  return jax.tree.map(one, tree, is_leaf=_is_decoder_state)


def scan_layout(tree: Any) -> bool | None:
  """The layout of the Decoder states in `tree`: True scanned, False unrolled, None none.

  Raises:
    ValueError: `tree` mixes the two layouts.
  """
  found = {decoder_lib.state_is_scanned(x)
           for x in jax.tree.leaves(tree, is_leaf=_is_decoder_state)
           if _is_decoder_state(x)}
  if len(found) > 1:
    raise ValueError("the tree holds Decoder states in both layer layouts")
  return found.pop() if found else None


class Checkpointer:
  """Saves and restores (array state, JSON meta) pairs by step.

  Args:
    directory: where step directories go; created if missing.
    keep: how many of the latest checkpoints to keep.
    async_save: write in a background thread while training goes on.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
               async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(directory).absolute()
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"checkpoint directory {str(self.directory)!r} cannot be created: "
                       f"{e}") from None
    if not os.access(self.directory, os.W_OK):
      raise ValueError(f"checkpoint directory {str(self.directory)!r} is not writable")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a save that was killed
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, meta: Mapping | None = None) -> None:
    """Starts saving `state` (+ `meta`) as `step` (the caller decides when; async)."""
    if step in self.all_steps():
      raise ValueError(f"a checkpoint for step {step} already exists in {self.directory}")
    self._manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(dict(meta or {}))),
        force=True)

  def restore(self, state_like: Any, step: int | None = None, *,
              saved_scan_layers: bool | None = None):
    """Restores (state, meta) at `step` (default: the latest), or None if there is none.

    Args:
      state_like: a pytree with the structure, shapes and dtypes of the saved state
        (concrete arrays or `jax.ShapeDtypeStruct`s); arrays come back with its shardings.
      step: which step to restore.
      saved_scan_layers: the layer layout the checkpoint was written in, when it differs
        from `state_like`'s (`ModelConfig.scan_layers`): the state is restored in that
        layout and converted to `state_like`'s (`convert_layout`). None: the same.
    """
    want = scan_layout(state_like)
    if saved_scan_layers is not None and want is not None and saved_scan_layers != want:
      # Convert an abstract template (no array is copied for it), restore, convert back.
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
      out = self.restore(convert_layout(abstract, saved_scan_layers), step)
      return None if out is None else (convert_layout(out[0], want), out[1])
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if step not in self.all_steps():
      raise ValueError(f"no checkpoint for step {step} in {self.directory}; "
                       f"available: {self.all_steps()}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
