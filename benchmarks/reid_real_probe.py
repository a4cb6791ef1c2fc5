"""Issue #25: does the trained Re-ID model fit its training identities, and does the feature's
geometry follow the identities? Trains a variant of configs/reid_demo.py:real on
tools/real_reid.py's set (one seed), then probes the trained model in eval mode:

  * identity accuracy of the SA / GLCA classifiers on the training images;
  * retrieval on the training identities (each identity's first image as the query) with the
    feature before / after the BN necks, the logits, the batch-standardised feature;
  * the nearest neighbour of each training image: same camera? same identity?
  * the share of the feature's variance between identities and between cameras;
  * test retrieval (before / after BN, logits).

  python -m benchmarks.reid_real_probe                           # :real as configured
  python -m benchmarks.reid_real_probe --conv_stem num_epochs=40 # + a small ResNet-v2 stem
  python -m benchmarks.reid_real_probe crop_padding=4 label_smoothing=0.1 weight_decay=0.3

`--conv_stem` = `backbone_overrides.resnet_layers=(1,) resnet_width=32 patch_size=2`: a
ResNet-v2 root conv + one bottleneck of width 32, then 2 x 2 patches: the same 8 x 4 token
grid as the 8 px patches.
"""
import argparse
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import reid_real  # noqa: E402
from dca_jax import config_lib, distributed, train  # noqa: E402
from dca_jax.data import preprocess, reid_sources  # noqa: E402
from dca_jax.reid import metrics  # noqa: E402
from tools import real_reid  # noqa: E402

CONV_STEM = dict(patch_size=2, resnet_layers=(1,), resnet_width=32)


def train_model(config):
  trainer = train.Trainer(config, tempfile.mkdtemp(prefix='reid_probe_'))
  batches = trainer.input.train_iter(start_step=0)
  start = time.time()
  for step in range(trainer.total_steps):
    batch = distributed.global_batch(next(batches), trainer.batch_sharding)
    trainer.state, metrics_ = trainer.train_step(trainer.state, batch)
    if (step + 1) % (10 * trainer.steps_per_epoch) == 0 or step + 1 == trainer.total_steps:
      shown = {k: round(float(v), 3) for k, v in jax.device_get(metrics_).items()
               if k.startswith(('ce_', 'triplet_sa', 'w_sa'))}
      print(f'step {step + 1} {time.time() - start:.0f} s {shown}', flush=True)
  trainer.checkpointer.close()
  return trainer.model, jax.device_get(trainer.state.variables)


def _l2(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def probe(config, model, variables) -> None:
  dataset = reid_sources.read_reid('market1501', config.data_dir, False)
  normalization = config_lib.resolve_normalization(config)
  forward = jax.jit(lambda images: model.apply(
      variables, preprocess.device_normalize(images, normalization, jnp.float32), train=False))

  def outputs(paths):
    parts = []
    for i in range(0, len(paths), 256):
      images = np.stack([np.asarray(Image.open(p).convert('RGB')) for p in paths[i:i + 256]])
      parts.append(jax.device_get(forward(jnp.asarray(images))))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != 'loss_weights'}

  def features(out):
    both = lambda suffix: np.concatenate([out['sa' + suffix], out['glca' + suffix]], 1)
    found = {'before_bn': both('_feature'), 'after_bn': both('_bn_feature'),
             'logits': both('_logits')}
    return found

  train_set = dataset.train
  out = outputs(list(train_set.paths))
  pids, cams = train_set.pids, train_set.camids
  for branch in ('sa', 'glca'):
    print(f'train-image accuracy {branch}: {(out[branch + "_logits"].argmax(1) == pids).mean():.3f}')
  first = np.zeros(len(pids), bool)
  first[np.unique(pids, return_index=True)[1]] = True
  found = features(out)
  raw = found['before_bn']
  found['standardized'] = (raw - raw.mean(0)) / (raw.std(0) + 1e-5)
  found['argmax_onehot'] = np.eye(out['glca_logits'].shape[1])[out['glca_logits'].argmax(1)]
  for name, feature in found.items():
    feature = _l2(feature)
    r = metrics.evaluate_features(feature[first], feature[~first], pids[first], pids[~first],
                                  cams[first], cams[~first])
    print(f'train-id retrieval {name}: mAP {r["mAP"]:.4f} rank-1 {r["rank1"]:.4f}')
  feature = _l2(raw)
  dist = ((feature[:, None] - feature[None]) ** 2).sum(-1)
  np.fill_diagonal(dist, np.inf)
  nearest = dist.argmin(1)
  chance = np.mean([(cams == c).mean() for c in cams])
  print(f'nearest neighbour same camera {(cams[nearest] == cams).mean():.3f} (chance '
        f'{chance:.3f}), same identity {(pids[nearest] == pids).mean():.3f}')
  total = ((feature - feature.mean(0)) ** 2).sum()
  for name, labels in (('identities', pids), ('cameras', cams)):
    between = sum((labels == l).sum() * ((feature[labels == l].mean(0) - feature.mean(0)) ** 2)
                  .sum() for l in np.unique(labels))
    print(f'variance between {name}: {between / total:.3f}')
  query, gallery = features(outputs(list(dataset.query.paths))), features(
      outputs(list(dataset.gallery.paths)))
  for name in query:
    r = metrics.evaluate_features(_l2(query[name]), _l2(gallery[name]), dataset.query.pids,
                                  dataset.gallery.pids, dataset.query.camids,
                                  dataset.gallery.camids)
    print(f'test retrieval {name}: mAP {r["mAP"]:.4f} rank-1 {r["rank1"]:.4f}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--conv_stem', action='store_true')
  parser.add_argument('--data_base', default=os.path.join(tempfile.gettempdir(), 'dca_jax_real_reid'))
  parser.add_argument('overrides', nargs='*', help='config key=value')
  args = parser.parse_args(argv)
  config = reid_real.fixed(real_reid.ensure(args.data_base, real_reid.Params()))
  if args.conv_stem:
    config.backbone_overrides.update(CONV_STEM)
  reid_real.apply_overrides(config, args.overrides)
  config_lib.validate(config)
  model, variables = train_model(config)
  probe(config, model, variables)


if __name__ == '__main__':
  main()
