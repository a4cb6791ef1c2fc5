"""The `eval` mode: every evaluator of the run (`config.evals`, dca_jax/evaluators/) on a
restored checkpoint, written to WORKDIR/eval.json.

The restore and the forward are the inference layer's (dca_jax/inference.py): what is scored
here is what predict prints and export serialises.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax

from dca_jax import checks
from dca_jax import config_lib
from dca_jax import data
from dca_jax import errors
from dca_jax import evaluators
from dca_jax import inference
from dca_jax import tasks


def evaluate_restored(restored: inference.InferenceModel, input_data) -> dict:
  """{metric: value} of the run's scoring evaluators on a restored model."""
  context = evaluators.Context(restored.config, restored.model, input_data, restored.mesh,
                               restored.variables_sharding, restored.dtype)
  results, _ = evaluators.Suite(context, eval_mode=True).run(restored.variables)
  return results


def measured_on(config, info, restored: inference.InferenceModel, workdir: str,
                selected_on: str = 'none') -> dict:
  """What a result was measured on: the data (name, layout version, split sizes), the task's
  protocol, the checkpoint (and the split it was chosen on) and the config's hash (the checked
  config, keys sorted)."""
  text = config.to_json_best_effort(sort_keys=True)
  return {'dataset': config.dataset, 'layout': info.version, 'data_dir': config.data_dir,
          'splits': info.splits, 'protocol': tasks.get(config.task).protocol(config, info),
          'checkpoint': {'workdir': os.path.abspath(workdir), 'which': restored.which,
                         'step': restored.step, 'selected_on': selected_on},
          'config_sha256': hashlib.sha256(text.encode()).hexdigest()}


def training_config(config, workdir: str):
  """The config the run trained with (WORKDIR/config.json), which chose its `best`; `config`
  when there is none or it no longer loads."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return config
  try:
    return config_lib.load_json(path)
  except errors.ConfigError:  # a config.json of an older version: the eval's config decides
    return config


def run_eval(config, workdir: str, which: str = 'latest', output: str = 'eval.json') -> dict:
  """The `eval` mode: whole-split metrics of a restored checkpoint -> WORKDIR/`output`."""
  config = checks.checked(config)
  restored = inference.load_for_inference(config, workdir, which)
  input_data = data.build_input(config, process_index=jax.process_index(),
                                process_count=jax.process_count(), with_train=False)
  result = evaluate_restored(restored, input_data)
  # The split the checkpoint was chosen on ('none': the latest is no choice), by the run's config.
  trained = training_config(config, workdir)
  chosen_on = evaluators.selected_on(trained) if which == 'best' else 'none'
  result.update(step=restored.step, checkpoint=which, selected_on=chosen_on,
                measured_on=measured_on(restored.config, input_data.info, restored, workdir,
                                        chosen_on))
  if jax.process_index() == 0:
    if chosen_on == 'test':
      print(evaluators.selection_warning(trained), flush=True)
    path = os.path.join(workdir, output)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    line = tasks.get(config.task).summary_line(result)
    print(f'eval ({which} checkpoint, step {restored.step}) {line} -> {path}', flush=True)
  return result
