"""Orbax checkpoints: async saves, keep the latest N plus the best by eval score, restore.

Each checkpoint holds the full train state (params, neck statistics, optimizer and accumulation
state, loss scale, step) and a JSON `meta` item describing the model, so that restoring into a
model of another backbone or class count fails with one clear line before anything is touched.
Inference restores the params and neck statistics alone (`restore_variables`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
from absl import logging
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from dca_jax import config_lib

# Meta keys that fix the shapes of the saved state must agree to restore; the others change what
# the model computes, not its shapes, so a difference is only warned about.
BEHAVIOUR_KEYS = config_lib.MODEL_BEHAVIOUR_KEYS


class CheckpointError(RuntimeError):
  pass


def model_meta(config, *, loss_scale: bool) -> dict:
  """The model's settings (config_lib.model_settings) + whether the state holds a loss scale."""
  return {**config_lib.model_settings(config), 'precision_loss_scale': bool(loss_scale)}


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train state."""

  def __init__(self, workdir: str, *, keep: int = 2, read_only: bool = False):
    # 'score': top-1 for FGVC, mAP for Re-ID (evaluate.score).
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        # BestN sorts ascending and keeps the last n: the highest score.
        cm.BestN(get_metric_fn=lambda m: m['score'], n=1, keep_checkpoints_without_metrics=False),
    ])
    # `read_only` (eval, visualize, predict): never create, clean up or save. Orbax's own
    # read_only option warns on every open, so it is expressed through these options instead.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=not read_only,
        # best_fn makes Orbax write each step's metrics and answer best_step().
        best_fn=lambda m: m['score'], best_mode='max',
        create=not read_only, cleanup_tmp_directories=not read_only)
    self.read_only = read_only
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, score: Optional[float] = None,
           force: bool = False) -> None:
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened read-only')
    metrics = None if score is None else {'score': float(score)}
    if step in self.manager.all_steps():
      return  # this step is already on disk (e.g. end-of-run save right after a periodic one)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def check_meta(self, step: int, expected_meta: dict) -> None:
    """Raises CheckpointError if `step` was saved for a model of other shapes; warns about
    behaviour knobs that differ."""
    meta = self.read_meta(step)
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
    return self._restore(step, ocp.args.StandardRestore(abstract_state))

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
      raise CheckpointError(f'cannot restore {self.directory}/{step} into this model: '
                            f'{type(e).__name__}: {str(e).splitlines()[0][:300]}') from e
    return restored['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, the form StandardRestore expects."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
