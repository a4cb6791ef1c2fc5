"""Tasks: what differs between fine-grained classification and re-identification, one module
each, found by `config.task`. The model, the train step, checkpoints and the loop stay one.

A task module (`dca_jax/tasks/<name>.py`) provides:

    METRIC                          the metric its main evaluator scores the best checkpoint by
    datasets()                      the dataset names it reads (from the data readers' registries)
    configure(c)                    its recipe on a base config (`config_lib.task_config`)
    check(config)                   its consistency checks (raise config_lib.ConfigError)
    default_evals(config)           {name: evaluator entry} when `config.evals` is empty
    bnneck(config)                  whether the model carries BN necks
    partners(rng, labels, n, groups)  PWCA partner indices for a batch of n images
    loss_options(config)            `losses.dcal_loss` keywords: its terms (config.loss_terms
                                    or LOSS_TERMS) and their options
    batch_fits(config, batch_size)  whether a physical batch suits its sampler (the planner)
    summary_line(result)            one console line of its eval results
    build_input(config, process_index, process_count, with_train)   its input (dca_jax.data)
    eval_transform(image, config)   a decoded image -> the uint8 crop its eval stream makes
    visualize(config, workdir, **options)                           the visualize mode
    export_outputs(config)          the `inference.forward_fn` outputs --mode export serialises
    export_transform(config)        the eval stream's host-side resize/crop, for preprocessing.json

Nothing outside this package tests `config.task`: `get(config.task)` is the one lookup. A third
task is one module here.
"""

from __future__ import annotations

import importlib
import pkgutil

# The tasks are the modules of this package: a new file is a new task.
NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_')))


def get(name: str):
  """The task module `name` ('fgvc' | 'reid')."""
  if name not in NAMES:
    raise ValueError(f'config.task={name!r} is not one of {NAMES}')
  return importlib.import_module(f'dca_jax.tasks.{name}')
