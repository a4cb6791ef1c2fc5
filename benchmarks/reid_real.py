"""Re-ID on real images, does the model learn? (docs/REID.md, "Real images"): trains a recipe on
tools/real_reid.py's set with the project's Trainer and step, one JSON line per epoch (mean train
CE / triplet / loss weight per branch; every --eval_every epochs the mAP and rank-1 on the unseen
TEST identities and on the TRAINING ones), then one 'seeds' line (mean +- std over the seeds,
the ratio to the raw-pixel baseline); --min_ratio R exits 1 below R x that baseline.

  python -m benchmarks.reid_real --variant fixed --seeds 0,1,2 --min_ratio 3 \
      --out benchmarks/results/reid_real.jsonl
  python -m benchmarks.reid_real --variant demo_recipe --set loss_terms=ce --epochs 16

Variants (`VARIANTS`, each configs/reid_demo.py with overrides): `demo_recipe`, `fixed` (+ `REAL`)
and `imagenet` (the paper's premise: needs DeiT-T's ImageNet weights); `--set KEY=VALUE` on top.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from configs import reid_demo  # noqa: E402
from dca_jax import checks, config_files, hub, tasks  # noqa: E402
from dca_jax.weights import WeightLoadError  # noqa: E402
from tools import real_reid  # noqa: E402

# configs/reid_demo.py on the real set, from scratch: the batch-standardised triplet (the raw
# one collapses every feature onto one point within ~20 steps there), no erasing or padding (on
# 64 x 32 px they wipe out a digit), AdamW lr 1e-3, 120 epochs (18 steps an epoch).
REAL = dict(dataset='market1501', data_source='folder', num_classes=300, random_erasing=0.0,
            crop_padding=0, learning_rate=1e-3, num_epochs=120, eval_frequency=20,
            save_frequency=20)


def _demo(**overrides):
  c = reid_demo.get_config()
  for key, value in overrides.items():
    c[key] = value
  return c


def demo_recipe():
  """The demo as it is with the real set swapped in, on TransReID's raw triplet."""
  return _demo(**{k: REAL[k] for k in ('dataset', 'data_source', 'num_classes')},
               triplet_feature='raw')


def fixed():
  return _demo(**REAL)


def imagenet():
  """`fixed` with the paper's premise: DeiT-T (12 blocks, width 192) with its ImageNet weights,
  the 64 x 32 images read at 128 x 64 (8 x 4 patches of 16 px), the paper's Re-ID optimiser
  (SGD, warm-up; dca_jax/tasks/reid.py) and TransReID's raw triplet."""
  c, base = fixed(), tasks.task_config('reid', 'deit_tiny')
  c.pretrained_model = hub.default_weights(base.backbone)
  c.input_size, c.input_width = 128, 64
  c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers = 12, 1, 12
  for key in ('backbone', 'backbone_overrides', 'optimizer', 'learning_rate', 'weight_decay',
              'lr_reference_batch', 'warmup_epochs', 'max_grad_norm', 'triplet_feature'):
    c[key] = base[key]
  return c


VARIANTS = {'demo_recipe': demo_recipe, 'fixed': fixed, 'imagenet': imagenet}


def batch_check(trainer, epochs=(0, 1)) -> dict:
  """Identities, images per identity and cameras per identity group in the P x K batches."""
  source, sampler = trainer.input.source.dataset.train, trainer.input.sampler
  ids, cams, per_id = [], [], []
  for batch in (b for epoch in epochs for b in sampler.epoch(epoch)):
    pids, camids = source.pids[batch], source.camids[batch]
    ids.append(len(np.unique(pids)))
    for pid in np.unique(pids):
      per_id.append(int((pids == pid).sum()))
      cams.append(len(np.unique(camids[pids == pid])))
  return {'batches': len(ids), 'ids_per_batch': [int(min(ids)), int(max(ids))],
          'images_per_id': [int(min(per_id)), int(max(per_id))],
          'cameras_per_id_group_mean': round(float(np.mean(cams)), 3),
          'steps_per_epoch': int(sampler.steps_per_epoch)}


def _train_ids_evaluator(config, trainer, data_dir: str):
  """Retrieval on the training identities (the set's train_ids/ copy)."""
  from dca_jax import data, evaluators  # pylint: disable=g-import-not-at-top
  from dca_jax.evaluators import retrieval  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.data_dir = os.path.join(data_dir, 'train_ids')
  return retrieval.Evaluator(evaluators.Context(
      c, trainer.model, data.build_input(c, with_train=False), trainer.mesh,
      trainer.shardings.variables, trainer.dtype))


def _write(out, record: dict) -> None:
  out.write(json.dumps(record) + '\n')
  out.flush()


def run(config, *, eval_every: int, out, tag: dict, data_dir: str) -> dict:
  """Trains `config` (the Trainer's own step), one record per epoch; returns the last."""
  import jax  # pylint: disable=g-import-not-at-top
  from dca_jax import distributed, train  # pylint: disable=g-import-not-at-top
  checks.checked(config)
  start = time.time()
  trainer = train.Trainer(config, tempfile.mkdtemp(prefix='reid_real_'))
  train_eval = _train_ids_evaluator(config, trainer, data_dir)
  _write(out, dict(tag, event='start', batch_check=batch_check(trainer)))
  batches = trainer.input.train_iter(start_step=0)
  sums, count, last = {}, 0, {}
  for step in range(1, trainer.total_steps + 1):
    batch = distributed.global_batch(next(batches), trainer.batch_sharding)
    trainer.state, metrics = trainer.train_step(trainer.state, batch)
    for key, value in jax.device_get(metrics).items():
      if key.startswith(('ce_', 'triplet', 'w_')) or key in ('loss', 'grad_norm'):
        sums[key] = sums.get(key, 0.0) + float(value)
    count += 1
    if step % trainer.steps_per_epoch:
      continue
    epoch = step // trainer.steps_per_epoch
    last = dict(tag, event='epoch', epoch=epoch, step=step, seconds=round(time.time() - start, 1),
                **{k: round(v / count, 4) for k, v in sums.items()})
    if epoch % eval_every == 0 or step == trainer.total_steps:
      test, _ = trainer.evaluate(trainer.state.variables)
      fit = dict(train_eval.run(trainer.state.variables))
      last.update(test_mAP=round(test['mAP'], 4), test_rank1=round(test['rank1'], 4),
                  train_ids_mAP=round(fit['mAP'], 4), train_ids_rank1=round(fit['rank1'], 4))
    _write(out, last)
    print(json.dumps(last), flush=True)
    sums, count = {}, 0
  trainer.checkpointer.close()
  return last


def check(finals: list[dict], pixel_map: float, min_ratio: float) -> dict:
  """Mean +- std (population, over the seeds) of the final test / train-id mAP, the ratio of
  the mean test mAP to the raw-pixel baseline, and whether it reaches `min_ratio`."""
  test = np.array([f['test_mAP'] for f in finals], np.float64)
  fit = np.array([f['train_ids_mAP'] for f in finals], np.float64)
  ratio = float(test.mean() / pixel_map) if pixel_map > 0 else float('inf')
  return {'seeds': [f['seed'] for f in finals], 'test_mAP_mean': round(float(test.mean()), 4),
          'test_mAP_std': round(float(test.std()), 4),
          'train_ids_mAP_mean': round(float(fit.mean()), 4),
          'train_ids_mAP_std': round(float(fit.std()), 4),
          'pixel_baseline_mAP': round(pixel_map, 4), 'ratio_to_pixels': round(ratio, 2),
          'min_ratio': min_ratio, 'passed': bool(ratio >= min_ratio)}


def _parser():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', choices=sorted(VARIANTS), default='fixed')
  parser.add_argument('--set', action='append', default=[], help='config override key=value')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--epochs', type=int, default=None, help='override num_epochs')
  parser.add_argument('--eval_every', type=int, default=4)
  parser.add_argument('--data_base',
                      default=os.path.join(tempfile.gettempdir(), 'dca_jax_real_reid'))
  parser.add_argument('--name', default='', help='a label for the rows (default: the overrides)')
  parser.add_argument('--out', default='-')
  parser.add_argument('--same_scans', type=int, default=0,
                      help='1: each identity keeps its three real scans in every view')
  parser.add_argument('--min_ratio', type=float, default=0.0,
                      help='exit 1 unless the mean test mAP over the seeds is >= this many '
                           'times the raw-pixel baseline')
  return parser


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  data_dir = real_reid.ensure(args.data_base, real_reid.Params(same_scans=args.same_scans))
  out = sys.stdout if args.out == '-' else open(args.out, 'a')
  pixel_map, pixel_rank1 = real_reid.pixel_baseline(data_dir)
  finals = []
  for seed in [int(s) for s in args.seeds.split(',')]:
    config = VARIANTS[args.variant]()
    config.data_dir, config.seed = data_dir, seed
    if args.epochs is not None:
      config.num_epochs = config.eval_frequency = config.save_frequency = args.epochs
    config = config_files.apply_overrides(config, [f'--config.{kv}' for kv in args.set])
    tag = {'variant': args.variant, 'same_scans': args.same_scans,
           'name': args.name or ' '.join(args.set) or args.variant, 'overrides': args.set,
           'seed': seed, 'epochs': config.num_epochs, 'pixel_baseline_mAP': round(pixel_map, 4),
           'pixel_baseline_rank1': round(pixel_rank1, 4)}
    try:
      last = run(config, eval_every=args.eval_every, out=out, tag=tag, data_dir=data_dir)
    except WeightLoadError as e:  # e.g. the imagenet variant where no weights can be had
      sys.exit(f'error: {e}')
    finals.append(dict(tag, event='final', **{k: last.get(k) for k in (
        'test_mAP', 'test_rank1', 'train_ids_mAP', 'train_ids_rank1', 'ce_sa', 'ce_glca',
        'ce_pwca', 'triplet_sa', 'w_sa', 'seconds')}))
    _write(out, finals[-1])
    if out is not sys.stdout:
      print(json.dumps(finals[-1]), flush=True)
  verdict = check(finals, pixel_map, args.min_ratio)
  _write(out, dict(finals[0], event='seeds', **verdict))
  print(json.dumps(verdict), flush=True)
  if not verdict['passed']:
    sys.exit(f"error: mean test mAP {verdict['test_mAP_mean']:.4f} is below {args.min_ratio} x "
             f'the raw-pixel baseline {pixel_map:.4f}')


if __name__ == '__main__':
  main()
