"""Evaluators: one module each, chosen by name in the config, several per run.

The protocol (big_vision's): a module `dca_jax/evaluators/<type>.py` defines

    class Evaluator:
      in_eval_mode: bool    # whether `--mode eval` runs it (False: pictures for TensorBoard)
      def __init__(self, context: Context, **kw): ...   # kw: the config entry, less type/prefix
      def run(self, variables) -> Iterator[tuple[str, value]]

yielding numbers (written to metrics.jsonl, TensorBoard and eval.json), text (eval.json only) or
uint8 [H, W, 3] pictures (TensorBoard images). The run lists them in `config.evals`:

    config.evals = {'test': {'type': 'classification', 'split': 'test', 'prefix': ''},
                    'val': {'type': 'classification', 'split': 'val'}}

An empty `config.evals` means the task's own list (`tasks.<task>.default_evals`). An entry's
metrics are named `<prefix><metric>`; the prefix defaults to '<entry name>/' ('' keeps the bare
names every published figure uses: 'accuracy', 'mAP'). `config.best_metric` names the metric the
best checkpoint is chosen by. To add an evaluator: one file here (or `register(type, cls)` of
a class defined elsewhere), then an entry in a config.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax import distributed
from dca_jax import tasks
from dca_jax import xla_cpu
from dca_jax.errors import ConfigError

# The evaluator types are the modules of this package (a new file is a new type) and the
# classes `register` adds.
_PACKAGE = tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))
_REGISTERED: dict[str, type] = {}


def types() -> tuple[str, ...]:
  return tuple(sorted({*_PACKAGE, *_REGISTERED}))


def register(kind: str, cls: type) -> None:
  """Adds evaluator type `kind`: `cls` follows the protocol above (in_eval_mode, run)."""
  if kind in types():
    raise ConfigError(f'evaluator type {kind!r} exists already: one of {types()}')
  missing = [name for name in ('in_eval_mode', 'run') if not hasattr(cls, name)]
  if missing:
    raise ConfigError(f'evaluator type {kind!r} lacks {", ".join(missing)} (the protocol: '
                      'dca_jax/evaluators/__init__.py)')
  _REGISTERED[kind] = cls


@dataclasses.dataclass
class Context:
  """What every evaluator may use: the run's config, model, eval input and where it runs."""
  config: Any
  model: Any
  input: Any          # dca_jax.data.Input (eval_iter(split=...))
  mesh: Any
  variables_sharding: Any
  dtype: Any

  @property
  def batch_sharding(self):
    return distributed.data_sharding(self.mesh)

  def jit(self, fn):
    """`fn(variables, batch)` jitted for the mesh: variables as trained, the batch
    data-sharded, the result replicated (every host reads it)."""
    return xla_cpu.jit(fn, platform=self.mesh.devices.flat[0].platform,
                       in_shardings=(self.variables_sharding, self.batch_sharding),
                       out_shardings=distributed.replicated(self.mesh))

  def batches(self, **split) -> Iterator[dict]:
    """The global eval batches of a split (padded; `mask` marks the real images)."""
    for batch in self.input.eval_iter(**split):
      yield distributed.global_batch(batch, self.batch_sharding)

  def summed(self, step, variables, **split) -> dict:
    """`step(variables, batch)`'s per-batch sums (padding masked inside it) added over a split's
    batches on the devices, then brought to the host once: a counting evaluator's loop."""
    totals = None
    for batch in self.batches(**split):
      sums = step(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return jax.device_get(totals)


def evaluator_class(kind: str):
  """The Evaluator class of `dca_jax/evaluators/<kind>.py`, or the one registered as `kind`."""
  if kind in _REGISTERED:
    return _REGISTERED[kind]
  if kind not in _PACKAGE:
    raise ValueError(f"evaluator type {kind!r} is not one of {types()} "
                     '(a module in dca_jax/evaluators/, or evaluators.register)')
  return importlib.import_module(f'dca_jax.evaluators.{kind}').Evaluator


def entries(config) -> dict[str, dict]:
  """{name: entry} of the run's evaluators: `config.evals`, or the task's own when empty."""
  evals = config.evals.to_dict() if hasattr(config.evals, 'to_dict') else dict(config.evals)
  return evals or tasks.get(config.task).default_evals(config)


def metric_names(config) -> set[str]:
  """Best-checkpoint candidates: `<prefix><metric>` of the run's scoring evaluators."""
  names = set()
  for name, entry in entries(config).items():
    cls = evaluator_class(entry.get('type', ''))
    names.update(prefix_of(name, entry) + m for m in getattr(cls, 'METRICS', ()))
  return names


def prefix_of(name: str, entry: dict) -> str:
  return entry['prefix'] if 'prefix' in entry else f'{name}/'


def best_metric(config) -> str:
  """The eval metric the best checkpoint is chosen by (`config.best_metric`, or the task's
  metric, on the validation split when there is one)."""
  if config.best_metric:
    return config.best_metric
  metric = tasks.get(config.task).METRIC
  return f'val/{metric}' if f'val/{metric}' in metric_names(config) else metric


def _scoring_entry(config):
  """(evaluator class, entry) of the evaluator that scores best_metric; None if none does."""
  metric = best_metric(config)
  for name, entry in entries(config).items():
    cls = evaluator_class(entry.get('type', ''))
    if metric in {prefix_of(name, entry) + m for m in getattr(cls, 'METRICS', ())}:
      return cls, entry
  return None


def selected_on(config) -> str:
  """The split `best` is chosen on: 'val' when best_metric's evaluator reads the held-out part
  of train, else 'test' (classification's default split; retrieval reads query and gallery)."""
  found = _scoring_entry(config)
  return 'val' if found and found[1].get('split') == 'val' else 'test'


def selection_warning(config) -> str:
  """One line when `best` is chosen on the test split (its test figures are then optimistic)
  and how to choose on a validation split instead; '' when it is chosen on one."""
  if selected_on(config) != 'test':
    return ''
  found = _scoring_entry(config)
  takes_split = found and 'split' in inspect.signature(found[0]).parameters
  if not takes_split:  # an evaluator without a split option
    fix = ('this task has no validation split: report --checkpoint latest '
           '(docs/TRAINING.md#choosing-the-best-checkpoint)')
  elif config.val_split > 0:
    fix = (f'val_split holds out a validation split: train with --config.best_metric='
           f'val/{tasks.get(config.task).METRIC} to choose on it')
  else:
    fix = 'train with --config.val_split=0.1 to hold out a validation split'
  return (f'Best checkpoint: chosen by {best_metric(config)} on the test split, so its test '
          f'figures are optimistic; {fix}')


def check(config) -> None:
  """Each evaluator entry names a known type; test_flip has an evaluator that scores mirrored
  images; best_metric is one the evaluators score (the one validator asks: dca_jax/checks.py)."""
  for name, entry in entries(config).items():
    if not isinstance(entry, dict) or 'type' not in entry:
      raise ConfigError(f'config.evals.{name} needs a type: one of {types()}')
    try:
      evaluator_class(entry['type'])
    except ValueError as e:
      raise ConfigError(f'config.evals.{name}: {e}') from None
  if config.test_flip and not any(entry.get('flip') for entry in entries(config).values()):
    raise ConfigError('config.test_flip=True but no evaluator of config.evals scores mirrored '
                      "images: add {'type': 'classification', 'flip': True} to it (Re-ID: "
                      'reid_flip_test)')
  if config.best_metric and config.best_metric not in metric_names(config):
    raise ConfigError(f'config.best_metric={config.best_metric!r} is not scored by config.evals: '
                      f'one of {sorted(metric_names(config))}')


class Suite:
  """The run's evaluators, built once; `run(variables)` -> (results, pictures)."""

  def __init__(self, context: Context, *, eval_mode: bool = False):
    self.context = context
    self.members = []
    for name, entry in entries(context.config).items():
      entry = dict(entry)
      cls = evaluator_class(entry.pop('type', ''))
      prefix = prefix_of(name, entry)
      entry.pop('prefix', None)
      if eval_mode and not cls.in_eval_mode:
        continue
      try:
        evaluator = cls(context, **entry)
      except TypeError as e:  # an option the evaluator does not take
        raise ValueError(f'config.evals.{name}: {e}') from None
      self.members.append((prefix, evaluator))

  def run(self, variables) -> tuple[dict, dict]:
    """({metric: number or text}, {tag: uint8 picture}) of every evaluator, on every process
    (the forwards are sharded programs); pictures only on process 0."""
    results, pictures = {}, {}
    for prefix, evaluator in self.members:
      for metric, value in evaluator.run(variables):
        if isinstance(value, np.ndarray) and value.ndim >= 2:
          pictures[prefix + metric] = value
        else:
          results[prefix + metric] = value
    return results, pictures
