"""The checkpoint manager: Orbax saves of the train state, sealed, pruned, verified on restore.

(The package's doc, dca_jax/checkpoint/__init__.py, says what a checkpoint holds and how its
integrity is kept.)
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from dca_jax import config_lib
from dca_jax.checkpoint import orbax_logs
from dca_jax.checkpoint.integrity import verify_integrity, write_integrity
from dca_jax.errors import CheckpointError, DamagedCheckpointError, SaveError

# Meta keys that fix the shapes of the saved state must agree to restore; the others change what
# the model computes, not its shapes, so a difference is only warned about.
BEHAVIOUR_KEYS = config_lib.MODEL_BEHAVIOUR_KEYS


DAMAGED_DIR = 'damaged_checkpoints'      # in the workdir: damaged steps are moved here

# How a truncated, emptied or missing data file surfaces from TensorStore/Orbax when a step
# without an integrity record is restored (a tree or shape mismatch reads otherwise).
_DATA_ERROR_MARKERS = ('error while reading', 'data_loss', 'out_of_range', 'unexpected end',
                       'error reading', 'not_found', 'no such file', 'truncat', 'corrupt',
                       'checksum', 'crc', 'failed to decode', 'expecting value', 'jsondecodeerror',
                       'premature', 'short read')


def model_meta(config, *, loss_scale: bool) -> dict:
  """The model's settings (config_lib.model_settings) + whether the state holds a loss scale."""
  return {**config_lib.model_settings(config), 'precision_loss_scale': bool(loss_scale)}


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _is_primary() -> bool:
  return jax.process_index() == 0


def _broadcast_int(value: Optional[int]) -> Optional[int]:
  """Process 0's value on every process (the resume step must be the same everywhere)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  out = int(multihost_utils.broadcast_one_to_all(np.asarray(-1 if value is None else value,
                                                            np.int64)))
  return None if out < 0 else out


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train state: async saves that are sealed
  (fsync + integrity record) and pruned here, verified restores, one-line save failures."""

  def __init__(self, workdir: str, *, keep: int = 2, read_only: bool = False):
    # Every step is kept by Orbax; `_prune` deletes old ones only after a newer one is sealed.
    # `read_only` (eval, visualize, predict): never create, clean up or save. Orbax's own
    # read_only option warns on every open, so it is expressed through these options instead.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.LatestN(n=None),  # all enable_async_checkpointing=not read_only,
        # best_fn makes Orbax write each step's metrics and answer best_step().
        # 'score': config.best_metric's value (config_lib.best_metric: top-1, mAP, or on val).
        best_fn=lambda m: m['score'], best_mode='max',
        create=not read_only, cleanup_tmp_directories=not read_only)
    self.read_only, self.keep = read_only, keep
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    self._pending: Optional[int] = None   # saved by this process, not yet sealed
    self._failed = False
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # --- saving ---------------------------------------------------------------------------------
  def save(self, step: int, state: Any, meta: dict, score: Optional[float] = None,
           force: bool = False) -> None:
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened read-only')
    self.seal()  # the previous save: committed, fsynced, recorded; old steps pruned
    metrics = None if score is None else {'score': float(score)}
    if step in self.manager.all_steps():
      return  # this step is already on disk (e.g. end-of-run save right after a periodic one)
    del orbax_logs.CAPTURED[:]
    try:
      self._quiet_save(step, state, meta, metrics, force)
    except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
      self._fail(step, e)
    self._pending = step

  def _quiet_save(self, step, state, meta, metrics, force):
    # Orbax warns on every save between evaluations that no metric was given: they are
    # expected here (BestN ranks only the evaluated steps), so that one warning is not shown.
    logger = logging.get_absl_logger()
    quiet = orbax_logs.DropMessage('did not provide metrics')
    logger.addFilter(quiet)
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=force)
    finally:
      logger.removeFilter(quiet)

  def seal(self) -> None:
    """Waits for the pending async save; fsyncs it and writes its integrity record, then
    deletes the steps the keep policy no longer needs. Raises SaveError if it failed."""
    if self._pending is None:
      try:
        self.manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        self._fail(None, e)
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      if not os.path.isdir(self.step_dir(step)):  # Orbax renames only a complete step
        captured = orbax_logs.CAPTURED
        raise captured[-1] if captured else OSError(f'step {step} was not committed')
      if _is_primary():
        write_integrity(self.step_dir(step))
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    # an Orbax error that did not fail the save: still said, in a line
    for error in orbax_logs.CAPTURED:
      logging.warning('while saving step %d: %s', step, orbax_logs.io_reason(error))
    del orbax_logs.CAPTURED[:]
    self._prune()

  def _prune(self) -> None:
    steps = self.all_steps()
    keep = set(steps[-self.keep:]) if self.keep > 0 else set()
    best = self.manager.best_step()
    if best is not None:
      keep.add(best)
    for step in steps:
      if step not in keep:
        self.manager.delete(step)

  def _fail(self, step: Optional[int], error: BaseException) -> None:
    """Turns a failed save into one line: the cause, the step, what is intact on disk."""
    self._failed = True
    captured = orbax_logs.CAPTURED
    cause = captured[-1] if captured and not isinstance(error, OSError) else error
    del orbax_logs.CAPTURED[:]
    reason = orbax_logs.io_reason(cause)
    if _is_primary() and step is not None:  # the partial step frees its space
      for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
        if name.startswith(f'{step}.') and 'tmp' in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass
    intact = [s for s in self.all_steps() if s != step
              and verify_integrity(self.step_dir(s))[0] is not False]
    what = (f'checkpoint{"s" if len(intact) > 1 else ""} {", ".join(map(str, intact))} '
            f'{"are" if len(intact) > 1 else "is"} intact' if intact
            else 'no earlier checkpoint is on disk')
    where = f'step {step}' if step is not None else 'a checkpoint'
    raise SaveError(f'{reason} while saving {where} to {self.directory}; {what}; '
                    'free the space (or fix the error) and run the same command to resume'
                    ) from error

  # --- restoring ------------------------------------------------------------------------------
  def damage(self, step: int) -> Optional[str]:
    """Why `step` cannot be used (its files differ from its record, its meta is unreadable),
    or None. A step without a record (killed before it was sealed) is checked when restored."""
    ok, reason = verify_integrity(self.step_dir(step))
    if ok is False:
      return reason
    try:
      self.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      return f'its meta item cannot be read: {type(e).__name__}'
    return None

  def newest_intact_step(self, which: str = 'latest', *, set_aside: bool = False,
                         below: Optional[int] = None, say=print) -> Optional[int]:
    """The newest step (below `below`), or the best one, that is not damaged. Each damaged
    step on the way is named in one line, and with `set_aside` moved to
    WORKDIR/damaged_checkpoints/. A damaged best step raises DamagedCheckpointError."""
    step = None
    if _is_primary():
      candidates = ([self.best_step()] if which == 'best' else
                    [s for s in self.all_steps()[::-1] if below is None or s < below])
      for candidate in candidates:
        if candidate is None:
          continue
        reason = self.damage(candidate)
        if reason is None:
          step = candidate
          break
        if which == 'best':
          raise DamagedCheckpointError(self.directory, candidate, reason)
        say(self.report_damaged(candidate, reason, set_aside=set_aside))
    step = _broadcast_int(step)
    if set_aside and jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('dca_jax:damaged_checkpoints_set_aside')
    self.manager.reload()
    return step

  def report_damaged(self, step: int, reason: str, *, set_aside: bool) -> str:
    """The line for a damaged step; with `set_aside` (training), moves it out of the way."""
    line = f'checkpoint {self.directory}/{step} is damaged ({reason}); '
    if set_aside and not self.read_only and _is_primary():
      dest_root = os.path.join(self.workdir, DAMAGED_DIR)
      os.makedirs(dest_root, exist_ok=True)
      dest = os.path.join(dest_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
      os.rename(self.step_dir(step), dest)
      self.manager.reload()
      return line + f'moved to {dest}; using the newest intact checkpoint'
    return line + 'skipped; using the newest intact checkpoint'

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def check_meta(self, step: int, expected_meta: dict) -> None:
    """Raises CheckpointError if `step` was saved for a model of other shapes; warns about
    behaviour knobs that differ."""
    try:
      meta = self.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(self.directory, step, 'its meta item cannot be read: '
                                   f'{type(e).__name__}') from e
    # A key the checkpoint predates is taken at its default (task fgvc, no neck, square input).
    defaults = {'task': 'fgvc', 'bnneck': False, 'input_width': meta.get('input_size')}
    saved = lambda k: meta.get(k, defaults.get(k))
    for k in BEHAVIOUR_KEYS:
      if k in meta and meta[k] != expected_meta[k]:
        logging.warning('checkpoint %s/%d was trained with %s=%r; running with %r', self.directory,
                        step, k, meta[k], expected_meta[k])
    diff = [f'{k}: checkpoint {saved(k)!r} vs config {expected_meta[k]!r}'
            for k in expected_meta if k not in BEHAVIOUR_KEYS and saved(k) != expected_meta[k]]
    if diff:
      raise CheckpointError(f'checkpoint {self.directory}/{step} was made for another model ('
                            + '; '.join(diff) + '); use another --workdir or fix the config')

  def restore(self, step: int, abstract_state: Any, expected_meta: dict) -> Any:
    """Restores `step` into the shapes/shardings of `abstract_state` after checking the meta."""
    self.check_meta(step, expected_meta)
    state = self._restore(step, ocp.args.StandardRestore(abstract_state))
    if not self.read_only and _is_primary() and verify_integrity(self.step_dir(step))[0] is None:
      write_integrity(self.step_dir(step))  # read back whole: sealed now (killed before it was)
    return state

  def restore_variables(self, step: int, abstract_variables: dict, expected_meta: dict) -> dict:
    """Only the model variables ('params', and 'batch_stats' when the model has BN necks) of
    the saved train state: the optimizer state is never read."""
    self.check_meta(step, expected_meta)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                abstract_variables)
    return self._restore(step, ocp.args.PyTreeRestore(
        item=abstract_variables, restore_args=restore_args, partial_restore=True))

  def _restore(self, step: int, args) -> Any:
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
    except Exception as e:  # Orbax raises many types for tree/shape mismatches.
      first = (str(e).strip().splitlines() or [''])[0]
      # A step whose files match their record is intact: then the model is what differs.
      sealed, why = verify_integrity(self.step_dir(step))
      if sealed is False:
        raise DamagedCheckpointError(self.directory, step, why) from e
      if sealed is None and any(m in str(e).lower() for m in _DATA_ERROR_MARKERS):
        detail = first.split(' See full TensorStore details')[0]
        raise DamagedCheckpointError(self.directory, step,
                                     f'unreadable: {detail[:200]}') from e
      raise CheckpointError(f'cannot restore {self.directory}/{step} into this model: '
                            f'{type(e).__name__}: {first[:300]}') from e
    return restored['state']

  def close(self) -> None:
    """Seals the last save (SaveError if it failed) and closes the manager."""
    try:
      if not self.read_only and not self._failed:
        self.seal()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, the form StandardRestore expects."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
