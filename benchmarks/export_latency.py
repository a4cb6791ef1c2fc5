"""Exported model sizes and CPU latency per image in one run (docs/BENCHMARKS.md, "Export"):
`jit` (`inference.forward_fn` jitted: what --mode predict runs), `stablehlo` (model.stablehlo
deserialised) and `onnxruntime` (model.onnx, default options), on the same uint8 images of a
randomly initialised model exported by `export.export_model`; median of --repeats calls after
two warm-ups, per image, and each runtime's largest |difference| to `jit`. One JSON line per
(model, batch).

  python -m benchmarks.export_latency --models demo,deit_tiny_448 --batches 1,8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks.machine import cpu_model, loadavg, median_seconds
from dca_jax import config_files, serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(name: str):
  """'demo': configs/demo.py (64 wide, 3 blocks, 56 px); 'deit_tiny_448': configs/cub.py's
  DeiT-T DCAL at 448 px, 200 classes; both float32."""
  path = {'demo': 'configs/demo.py', 'deit_tiny_448': 'configs/cub.py'}[name]
  return config_files.load(os.path.join(ROOT, path), ['--config.precision=fp32'])[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='demo,deit_tiny_448')
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dca_jax import config_lib, export, inference, tasks  # pylint: disable=g-import-not-at-top
  from dca_jax.models import build_model  # pylint: disable=g-import-not-at-top

  for name in args.models.split(','):
    config = model_config(name)
    model = build_model(export.export_config(config), dtype=jnp.float32)
    hw = config_lib.input_hw(config)
    variables = jax.jit(model.init, static_argnames='train')(
        jax.random.key(0), jnp.zeros((1, *hw, 3)), train=False)
    out_dir = tempfile.mkdtemp(prefix=f'export_{name}_')
    start = time.perf_counter()
    meta = export.export_model(config, variables, out_dir)
    export_seconds = time.perf_counter() - start
    forward = jax.jit(inference.forward_fn(model, config, jnp.float32,
                                           tasks.get(config.task).export_outputs(config)))
    def jit_predict(x, forward=forward, variables=variables):
      return jax.block_until_ready(forward(variables, x))

    runtimes = {
        'jit': jit_predict,
        'stablehlo': serving.ExportedModel(os.path.join(out_dir, 'model.stablehlo')),
        'onnxruntime': serving.ExportedModel(os.path.join(out_dir, 'model.onnx')),
    }
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(',')]:
      images = rng.integers(0, 256, (batch, *hw, 3), dtype=np.uint8)
      want = jax.device_get(runtimes['jit'](images))
      row = {'model': name, 'input': list(hw), 'batch': batch,
             'params_M': round(sum(x.size for x in jax.tree.leaves(variables)) / 1e6, 3),
             'file_MB': {f: round(meta['files'][f]['bytes'] / 1e6, 2) for f in meta['files']},
             'export_s': round(export_seconds, 1), 'onnx_opset': export.ONNX_OPSET}
      for key, fn in runtimes.items():
        got = fn(images)
        seconds = median_seconds(lambda: fn(images), args.repeats, warmups=2)
        row[f'{key}_ms_per_image'] = round(1e3 * seconds / batch, 2)
        row[f'{key}_max_abs_diff'] = max(float(np.abs(np.asarray(got[k]) - want[k]).max())
                                         for k in want)
      row.update(cpu=cpu_model(), cores=os.cpu_count(), loadavg=loadavg(),
                 jax=jax.__version__, onnxruntime=runtimes['onnxruntime'].runtime)
      print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
