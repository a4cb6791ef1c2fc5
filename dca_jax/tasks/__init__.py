"""Tasks: what differs between fine-grained classification and re-identification, one module
each, found by `config.task`. The model, the train step, checkpoints and the loop stay one.

A task sits above the data, the model and the losses, which it composes, and below the train
step, the evaluators and the modes, which ask it (docs/ARCHITECTURE.md). Nothing below a task
calls back into it: what the lower layers need of it is resolved into the config once, at the
entry (`dca_jax/checks.py`: e.g. `bnneck`).

A task module (`dca_jax/tasks/<name>.py`) provides:

    METRIC                          the metric its main evaluator scores the best checkpoint by
    PICTURES                        what --mode visualize draws: 'classes' | 'rankings'
    datasets()                      the dataset names it reads (`data.registry.names(task)`)
    configure(c)                    its recipe on a base config (`task_config`)
    check(config)                   its consistency checks (raise errors.ConfigError)
    default_evals(config)           {name: evaluator entry} when `config.evals` is empty
    bnneck(config)                  whether the model carries BN necks (resolved into the config)
    partners(rng, labels, n, groups)  PWCA partner indices for a batch of n images
    loss_options(config)            `losses.dcal_loss` keywords: its terms (config.loss_terms
                                    or LOSS_TERMS) and their options
    batch_fits(config, batch_size)  whether a physical batch suits its sampler (the planner)
    summary_line(result)            one console line of its eval results
    protocol(config, info)          how its figures are measured (eval.json's `measured_on`)
    eval_transform(image, config)   a decoded image -> the uint8 crop its eval stream makes
    export_outputs(config)          the `inference.forward_fn` outputs --mode export serialises
    export_transform(config)        the eval stream's host-side resize/crop, for preprocessing.json

Its datasets name it in the data registry (`data.registry.register(name, task=...)`, with the
streams they give). Nothing outside this package tests `config.task`: `get(config.task)` is the
one lookup. A third task is one module here, or `register(name, module)` of a module (or any
object with the protocol) defined elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections

from dca_jax import config_lib
from dca_jax.errors import ConfigError

PROTOCOL = ('METRIC', 'PICTURES', 'datasets', 'configure', 'check', 'default_evals', 'bnneck',
            'partners', 'loss_options', 'batch_fits', 'summary_line', 'protocol',
            'eval_transform', 'export_outputs', 'export_transform')
# The modules of this package are tasks (a new file is a new task); `register` adds others.
_PACKAGE = tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))
_REGISTERED: dict = {}


def names() -> tuple[str, ...]:
  return tuple(sorted({*_PACKAGE, *_REGISTERED}))


def register(name: str, module) -> None:
  """Adds task `name`: `module` provides the protocol above (a module or any such object)."""
  if name in names():
    raise ConfigError(f'task {name!r} exists already: one of {names()}')
  missing = [attribute for attribute in PROTOCOL if not hasattr(module, attribute)]
  if missing:
    raise ConfigError(f'task {name!r} lacks {", ".join(missing)} of the task protocol '
                      '(dca_jax/tasks/__init__.py)')
  _REGISTERED[name] = module


def get(name: str):
  """The task module `name` ('fgvc' | 'reid' | a registered one)."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _PACKAGE:
    raise ConfigError(f'config.task={name!r} is not one of {names()}')
  return importlib.import_module(f'dca_jax.tasks.{name}')


def task_config(task: str, backbone: str) -> ml_collections.ConfigDict:
  """The base config with `task`'s recipe (`configure`) and `backbone`: where every experiment
  file in configs/ starts (`task_config('fgvc', 'vit_base')`)."""
  c = config_lib.base_config()
  get(task).configure(c)
  c.backbone = backbone
  return c
