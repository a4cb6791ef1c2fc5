"""The feature collapse of issue #25, measured: the spread of the retrieval feature over a
gallery batch while the demo recipe trains on tools/real_reid.py's set (one seed).

  python -m benchmarks.reid_real_spread 120                                   # raw triplet
  TW=0 python -m benchmarks.reid_real_spread 120                              # no triplet
  TF=batch_standardized python -m benchmarks.reid_real_spread 288             # the fix
  python -m benchmarks.reid_real_spread 120 learning_rate=1e-3                # + overrides

Prints, at a few steps, the step's CE and triplet of SA and the per-dimension standard
deviation across images ('across-image std') and mean |value| of sa_feature / glca_feature.
"""
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import reid_real  # noqa: E402
from dca_jax import distributed, train  # noqa: E402
from dca_jax.data import preprocess  # noqa: E402
from tools import real_reid  # noqa: E402


def main():
  if os.environ.get('TW') or os.environ.get('TF'):
    reid_real._patch_triplet(float(os.environ.get('TW', '1')), os.environ.get('TF', 'raw'))  # pylint: disable=protected-access
  config = reid_real.demo_recipe(real_reid.ensure(os.path.join(tempfile.gettempdir(),
                                                               'dca_jax_real_reid')))
  reid_real.apply_overrides(config, sys.argv[2:])
  trainer = train.Trainer(config, tempfile.mkdtemp(prefix='reid_spread_'))
  batches = trainer.input.train_iter(0)
  gallery = next(iter(trainer.input.eval_iter(split='gallery')))
  images = preprocess.device_normalize(jnp.asarray(gallery['image']), config, jnp.float32)

  def spread(tag):
    out = trainer.model.apply(trainer.state.variables, images, train=False)
    for key in ('sa_feature', 'glca_feature'):
      f = np.asarray(out[key])
      print(f'{tag} {key}: across-image std {f.std(0).mean():.2e}, '
            f'mean |value| {np.abs(f.mean(0)).mean():.2e}')

  spread('init')
  for step in range(int(sys.argv[1])):
    batch = distributed.global_batch(next(batches), trainer.batch_sharding)
    trainer.state, metrics = trainer.train_step(trainer.state, batch)
    if step in (0, 5, 20, 50, 100, 200, 287):
      metrics = jax.device_get(metrics)
      print(f'step {step}: ce_sa {float(metrics["ce_sa"]):.3f}, '
            f'triplet_sa {float(metrics["triplet_sa"]):.3f}')
      spread(f'step {step}')


if __name__ == '__main__':
  main()
