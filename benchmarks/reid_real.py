"""Re-ID on real images: does the model learn? Per-epoch training curves of config variants.

The set is tools/real_reid.py's (sklearn's real handwritten digits as 3-digit "identities",
Market-1501 layout, 4 cameras). For each variant x seed this trains with the project's own
Trainer and train step (the loop here only adds measurements) and writes one JSON line per
epoch: the epoch's mean train CE / triplet / triplet accuracy / loss weight per branch, and
every `--eval_every` epochs the retrieval mAP and rank-1 on the TEST identities (unseen) and
on the TRAINING identities (each train identity's first image as query, its others as the
gallery: does the model fit what it trains on?). The raw-pixel nearest-neighbour mAP of the
same test images is in the first line.

  python -m benchmarks.reid_real --variant fixed --seeds 0,1,2 \
      --out benchmarks/results/reid_real.jsonl
  python -m benchmarks.reid_real --variant demo_recipe --set bnneck=False --epochs 16
  python -m benchmarks.reid_real --variant fixed --seeds 0,1,2 --min_ratio 3   # the check

After the seeds it writes one 'seeds' line (mean +- std of the final test and train-id mAP,
the ratio to the raw-pixel baseline) and, with `--min_ratio R`, exits 1 when the mean test
mAP is below R x that baseline: the real-image learning check (minutes of CPU per seed,
too slow for the test suite; tests/test_real_reid.py checks the gate itself).

Variants (`VARIANTS`): `demo_recipe` = configs/reid_demo.py with the real set swapped in as
the issue did (the BEFORE); `fixed` = configs/reid_demo.py:real (the AFTER, from scratch);
`imagenet` = configs/reid_demo.py:real_imagenet (the paper's premise: ImageNet-pretrained
DeiT-T; needs its weights, not run on the development machine). `--set k=v` overrides any
config key on top (repeatable), e.g. `--set pretrained_model=runs/my_pretraining` (a run's
backbone), for the ablations in docs/REID.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from dca_jax import checks  # noqa: E402  pylint: disable=g-import-not-at-top
from dca_jax.weights import WeightLoadError  # noqa: E402  pylint: disable=g-import-not-at-top
from tools import real_reid  # noqa: E402  pylint: disable=g-import-not-at-top


def demo_recipe(data_dir: str):
  """The issue's run: configs/reid_demo.py, dataset/data_source/data_dir/num_classes swapped."""
  from configs import reid_demo  # pylint: disable=g-import-not-at-top
  c = reid_demo.get_config()
  c.dataset, c.data_source, c.data_dir, c.num_classes = 'market1501', 'folder', data_dir, 300
  c.triplet_feature = 'raw'  # the recipe its rows measured (the demo's triplet then)
  return c


def fixed(data_dir: str):
  """configs/reid_demo.py:real with the set's folder."""
  from configs import reid_demo  # pylint: disable=g-import-not-at-top
  c = reid_demo.get_config('real')
  c.data_dir = data_dir
  return c


def imagenet(data_dir: str):
  """configs/reid_demo.py:real_imagenet: the paper's premise, an ImageNet-pretrained DeiT-T
  (needs timm/deit_tiny_patch16_224.fb_in1k: fetched once where the network is open)."""
  from configs import reid_demo  # pylint: disable=g-import-not-at-top
  c = reid_demo.get_config('real_imagenet')
  c.data_dir = data_dir
  return c


VARIANTS = {'demo_recipe': demo_recipe, 'fixed': fixed, 'imagenet': imagenet}


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config, overrides: list[str]):
  for item in overrides:
    key, _, value = item.partition('=')
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = _parse_value(value)
  return config


def batch_check(trainer, epochs=(0, 1)) -> dict:
  """Identities, images per identity and cameras per identity group in the P x K batches."""
  source = trainer.input.source.dataset.train
  sampler = trainer.input.sampler
  ids, cams, per_id = [], [], []
  for epoch in epochs:
    for batch in sampler.epoch(epoch):
      pids, camids = source.pids[batch], source.camids[batch]
      ids.append(len(np.unique(pids)))
      for pid in np.unique(pids):
        per_id.append(int((pids == pid).sum()))
        cams.append(len(np.unique(camids[pids == pid])))
  return {'batches': len(ids), 'ids_per_batch': [int(min(ids)), int(max(ids))],
          'images_per_id': [int(min(per_id)), int(max(per_id))],
          'cameras_per_id_group_mean': round(float(np.mean(cams)), 3),
          'steps_per_epoch': int(sampler.steps_per_epoch)}


def run(config, *, eval_every: int, out, tag: dict, data_dir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from dca_jax import distributed, evaluators, train  # pylint: disable=g-import-not-at-top
  from dca_jax.evaluators import retrieval  # pylint: disable=g-import-not-at-top
  from dca_jax import data  # pylint: disable=g-import-not-at-top
  checks.checked(config)
  workdir = tempfile.mkdtemp(prefix='reid_real_')
  start = time.time()
  trainer = train.Trainer(config, workdir)
  train_config = config.copy_and_resolve_references()
  train_config.data_dir = os.path.join(data_dir, 'train_ids')
  train_input = data.build_input(train_config, with_train=False)
  train_eval = retrieval.Evaluator(evaluators.Context(
      train_config, trainer.model, train_input, trainer.mesh, trainer.shardings.variables,
      trainer.dtype))
  record = dict(tag, event='start', batch_check=batch_check(trainer))
  out.write(json.dumps(record) + '\n')
  out.flush()
  steps_per_epoch = trainer.steps_per_epoch
  batches = trainer.input.train_iter(start_step=0)
  sums, count, last = {}, 0, {}
  for step in range(trainer.total_steps):
    batch = distributed.global_batch(next(batches), trainer.batch_sharding)
    trainer.state, metrics = trainer.train_step(trainer.state, batch)
    metrics = jax.device_get(metrics)
    for key, value in metrics.items():
      if key.startswith(('ce_', 'triplet', 'w_')) or key in ('loss', 'grad_norm'):
        sums[key] = sums.get(key, 0.0) + float(value)
    count += 1
    if (step + 1) % steps_per_epoch == 0:
      epoch = (step + 1) // steps_per_epoch
      record = dict(tag, event='epoch', epoch=epoch, step=step + 1,
                    seconds=round(time.time() - start, 1),
                    **{k: round(v / count, 4) for k, v in sums.items()})
      if epoch % eval_every == 0 or step + 1 == trainer.total_steps:
        test, _ = trainer.evaluate(trainer.state.variables)
        fit = dict(train_eval.run(trainer.state.variables))
        record.update(test_mAP=round(test['mAP'], 4), test_rank1=round(test['rank1'], 4),
                      train_ids_mAP=round(fit['mAP'], 4), train_ids_rank1=round(fit['rank1'], 4))
      out.write(json.dumps(record) + '\n')
      out.flush()
      print(json.dumps(record), flush=True)
      last = record
      sums, count = {}, 0
  trainer.checkpointer.close()
  return last


def _patch_triplet(weight: float, feature: str) -> None:
  """Ablation: the batch-hard triplet loss of every branch times `weight` (0 = CE only), on
  `feature` ('raw' / 'batch_standardized')."""
  from dca_jax import losses  # pylint: disable=g-import-not-at-top
  original = losses.batch_hard_triplet

  def patched(features, labels, margin=0.0, *unused, **unused_kw):
    loss, accuracy = original(features, labels, margin, feature)
    return loss * weight, accuracy
  losses.batch_hard_triplet = patched


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', choices=sorted(VARIANTS), default='fixed')
  parser.add_argument('--set', action='append', default=[], help='config override key=value')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--epochs', type=int, default=None, help='override num_epochs')
  parser.add_argument('--eval_every', type=int, default=4)
  parser.add_argument('--data_base', default=os.path.join(tempfile.gettempdir(), 'dca_jax_real_reid'))
  parser.add_argument('--name', default='', help='a label for the rows (default: the overrides)')
  parser.add_argument('--out', default='-')
  parser.add_argument('--triplet_weight', type=float, default=None,
                      help='ablation only: scale every branch\'s triplet loss (0 = off)')
  parser.add_argument('--triplet_feature', default='',
                      help='ablation only: raw / batch_standardized distances in the triplet')
  parser.add_argument('--same_scans', type=int, default=0,
                      help='1: each identity keeps its three real scans in every view')
  parser.add_argument('--min_ratio', type=float, default=0.0,
                      help='exit 1 unless the mean test mAP over the seeds is >= this many '
                           'times the raw-pixel baseline (the learning check of issue #25)')
  args = parser.parse_args(argv)
  if args.triplet_weight is not None or args.triplet_feature:
    _patch_triplet(1.0 if args.triplet_weight is None else args.triplet_weight,
                   args.triplet_feature or 'raw')
  data_dir = real_reid.ensure(args.data_base, real_reid.Params(same_scans=args.same_scans))
  out = sys.stdout if args.out == '-' else open(args.out, 'a')
  pixel_map, pixel_rank1 = real_reid.pixel_baseline(data_dir)
  finals = []
  variant = VARIANTS[args.variant]
  for seed in [int(s) for s in args.seeds.split(',')]:
    config = variant(data_dir)
    if args.epochs is not None:
      config.num_epochs = args.epochs
      config.eval_frequency = config.save_frequency = max(1, int(args.epochs))
    config = apply_overrides(config, args.set)
    config.seed = seed
    overrides = args.set + ([f'triplet_weight={args.triplet_weight}']
                            if args.triplet_weight is not None else []) + (
                                [f'triplet_feature={args.triplet_feature}']
                                if args.triplet_feature else [])
    tag = {'variant': args.variant, 'same_scans': args.same_scans, 'name': args.name or ' '.join(overrides) or args.variant,
           'overrides': overrides, 'seed': seed, 'epochs': config.num_epochs,
           'pixel_baseline_mAP': round(pixel_map, 4), 'pixel_baseline_rank1': round(pixel_rank1, 4)}
    try:
      last = run(config, eval_every=args.eval_every, out=out, tag=tag, data_dir=data_dir)
    except WeightLoadError as e:  # e.g. the imagenet variant where no weights can be had
      sys.exit(f'error: {e}')
    summary = dict(tag, event='final', **{k: last.get(k) for k in (
        'test_mAP', 'test_rank1', 'train_ids_mAP', 'train_ids_rank1', 'ce_sa', 'ce_glca',
        'ce_pwca', 'triplet_sa', 'w_sa', 'seconds')})
    out.write(json.dumps(summary) + '\n')
    out.flush()
    if out is not sys.stdout:
      print(json.dumps(summary), flush=True)
    finals.append(summary)
  verdict = check(finals, pixel_map, args.min_ratio)
  out.write(json.dumps(dict(finals[0], event='seeds', **verdict)) + '\n')
  print(json.dumps(verdict), flush=True)
  if not verdict['passed']:
    sys.exit(f"error: mean test mAP {verdict['test_mAP_mean']:.4f} is below {args.min_ratio} x "
             f'the raw-pixel baseline {pixel_map:.4f}')


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


if __name__ == '__main__':
  main()
