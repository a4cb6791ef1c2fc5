"""The one validator: a config is checked once, at the entry of a mode, into what the layers
below receive.

    config = checks.checked(config)   # first line of every mode (train, eval, visualize, ...)

Each part of dca_jax declares what it checks, and this module asks each once:

    config_lib.check_knobs   every key known, choices, ranges (from the knobs' declarations)
    tasks, data.registry     the task exists, the dataset is one of its datasets, task.check
    hub.check                the pretrained_model's form and its backbone (no network)
    losses.check             the loss terms exist
    evaluators.check         the evaluator entries, test_flip, best_metric

The result is a copy of the config with what the layers below a task need of it resolved into
plain knobs (`bnneck`: the Re-ID neck, never on FGVC), so that nothing below a task calls back
into it. Raises errors.ConfigError (a ValueError): one line naming the first problem.
"""

from __future__ import annotations

import copy

import ml_collections

from dca_jax import config_lib
from dca_jax import evaluators
from dca_jax import hub
from dca_jax import losses
from dca_jax import tasks
from dca_jax.data import registry
from dca_jax.errors import ConfigError


def _check_dataset(config, task) -> None:
  """The dataset is one of the task's (the data registry knows which task reads which)."""
  if config.dataset in task.datasets():
    return
  known = config.dataset in registry.names()
  hint = f" (or set task='{registry.get(config.dataset).task}')" if known else ''
  raise ConfigError(f'config.dataset={config.dataset!r} is not a {config.task} dataset: one of '
                    f'{task.datasets()}{hint}')


def checked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` checked by every part that declares checks, and resolved (see the module doc).
  Idempotent: a checked config checks again to itself."""
  config_lib.check_knobs(config)
  task = tasks.get(config.task)
  _check_dataset(config, task)
  task.check(config)
  hub.check(config)
  losses.check(config)
  evaluators.check(config)
  resolved = copy.deepcopy(config)
  resolved.bnneck = bool(task.bnneck(config))
  return resolved
