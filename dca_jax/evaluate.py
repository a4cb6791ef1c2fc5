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
from dca_jax import data
from dca_jax import evaluators
from dca_jax import inference
from dca_jax import tasks


def evaluate_restored(restored: inference.InferenceModel, input_data) -> dict:
  """{metric: value} of the run's scoring evaluators on a restored model."""
  context = evaluators.Context(restored.config, restored.model, input_data, restored.mesh,
                               restored.variables_sharding, restored.dtype)
  results, _ = evaluators.Suite(context, eval_mode=True).run(restored.variables)
  return results


def measured_on(config, info, restored: inference.InferenceModel, workdir: str) -> dict:
  """What a result was measured on: the data (name, layout version, split sizes), the task's
  protocol, the checkpoint and the config's hash (the checked config, keys sorted)."""
  text = config.to_json_best_effort(sort_keys=True)
  return {'dataset': config.dataset, 'layout': info.version, 'data_dir': config.data_dir,
          'splits': info.splits, 'protocol': tasks.get(config.task).protocol(config, info),
          'checkpoint': {'workdir': os.path.abspath(workdir), 'which': restored.which,
                         'step': restored.step},
          'config_sha256': hashlib.sha256(text.encode()).hexdigest()}


def run_eval(config, workdir: str, which: str = 'latest', output: str = 'eval.json') -> dict:
  """The `eval` mode: whole-split metrics of a restored checkpoint -> WORKDIR/`output`."""
  config = checks.checked(config)
  restored = inference.load_for_inference(config, workdir, which)
  input_data = data.build_input(config, process_index=jax.process_index(),
                                process_count=jax.process_count(), with_train=False)
  result = evaluate_restored(restored, input_data)
  result.update(step=restored.step, checkpoint=which,
                measured_on=measured_on(restored.config, input_data.info, restored, workdir))
  if jax.process_index() == 0:
    path = os.path.join(workdir, output)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    line = tasks.get(config.task).summary_line(result)
    print(f'eval ({which} checkpoint, step {restored.step}) {line} -> {path}', flush=True)
  return result
