"""Full-size parity against timm with random weights, no download (docs/WEIGHTS.md, "Proof of
parity"): each case's timm model with every parameter perturbed (`randomize` of
tests/fixtures/make_timm.py), saved (.safetensors; ViT-B also Google's .npz), imported by
`dca_jax.weights.load_pretrained` into `vit.VisionTransformer`: the max |logit difference| on 2
random images, at native and resized sizes (timm's own `checkpoint_filter_fn` on its side).
Needs torch + timm and jax:

  PYTHONPATH=<jax's site-packages> .venv-timm/bin/python -m tools.compare_timm_fullsize [--only ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file
import timm
import jax
import jax.numpy as jnp

from dca_jax import weights as W
from dca_jax.models import vit
from tests.fixtures.make_timm import randomize, to_google_npz

# name: (timm model, our variant, native size, eval size (height, width), formats)
CASES = {
    'deit_tiny_224': ('deit_tiny_patch16_224', 'deit_tiny', 224, (224, 224), ('safetensors',)),
    'deit_tiny_448': ('deit_tiny_patch16_224', 'deit_tiny', 224, (448, 448), ('safetensors',)),
    'deit_tiny_256x128': ('deit_tiny_patch16_224', 'deit_tiny', 224, (256, 128), ('safetensors',)),
    'vit_base_224': ('vit_base_patch16_224', 'vit_base', 224, (224, 224), ('safetensors', 'npz')),
    'vit_base_256x128': ('vit_base_patch16_224', 'vit_base', 224, (256, 128),
                         ('safetensors', 'npz')),
    'r50_vit_base_224': ('vit_base_r50_s16_224', 'r50_vit_base', 224, (224, 224),
                         ('safetensors', 'npz')),
    # beyond the paper (dca_jax/backbones/): DINOv2 pretrained at 518 px, fine-tuned at 448
    'dinov2_small_reg4_448': ('vit_small_patch14_reg4_dinov2', 'dinov2_small_reg4', 518,
                              (448, 448), ('safetensors',)),
    'dinov2_base_448': ('vit_base_patch14_dinov2', 'dinov2_base', 518, (448, 448),
                        ('safetensors',)),
    'clip_base_224': ('vit_base_patch16_clip_224', 'clip_base', 224, (224, 224), ('safetensors',)),
    'clip_base_quickgelu_448': ('vit_base_patch16_clip_quickgelu_224', 'clip_base_quickgelu', 224,
                                (448, 448), ('safetensors',)),
}


def run_case(name, timm_name, variant, native, size, formats, batch=2):
  height, width = size
  torch.manual_seed(0)
  model = randomize(timm.create_model(timm_name, pretrained=False, num_classes=1000).eval(), 0)
  sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  if size != (native, native):
    img_size = height if height == width else (height, width)
    model = timm.create_model(timm_name, pretrained=False, num_classes=1000,
                              img_size=img_size).eval()
    filt = timm.models.vision_transformer.checkpoint_filter_fn
    model.load_state_dict(filt(dict(sd), model))
  x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
  t = time.time()
  with torch.no_grad():
    ref = model(x).numpy()
  t_timm = time.time() - t

  cfg = vit.get_variant(variant)
  ours = vit.VisionTransformer(cfg, num_classes=ref.shape[-1])
  shapes = jax.eval_shape(ours.init, jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])
  apply = jax.jit(lambda p, x: ours.apply({'params': p}, x))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for fmt in formats:
      path = os.path.join(tmp, f'{timm_name}.{fmt}')
      if fmt == 'safetensors':
        save_file(sd, path)
      else:
        np.savez(path, **to_google_npz(sd, cfg.num_heads))
      stride = cfg.patch_size * cfg.stem_stride  # 16 (patch or the R50 stem), 14 for DINOv2
      grid_hw = None if height == width else (height // stride, width // stride)
      loaded, report = W.load_pretrained(path, params, cfg, load_head=True, grid_hw=grid_hw)
      assert not report.newly_initialized, report.summary()
      t = time.time()
      out = np.asarray(apply(loaded, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
      t_ours = time.time() - t
      diff = float(np.abs(out - ref).max())
      rows.append((name, fmt, diff, float(np.abs(ref).max()), t_timm, t_ours,
                   '; '.join(report.notes)))
      print(f'{name:18s} {fmt:12s} max|dlogit| {diff:.3e}  max|logit| {np.abs(ref).max():.3f}  '
            f'timm {t_timm:.1f}s  ours(compile+run) {t_ours:.1f}s  {"; ".join(report.notes)}',
            flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--only', nargs='*', default=None, choices=sorted(CASES))
  args = ap.parse_args()
  print(f'timm {timm.__version__}  torch {torch.__version__}  jax {jax.__version__}  '
        f'device {jax.devices()[0].platform}', flush=True)
  worst = 0.0
  for name in args.only or CASES:
    for row in run_case(name, *CASES[name]):
      worst = max(worst, row[2])
  print(f'worst max|dlogit| = {worst:.3e}')


if __name__ == '__main__':
  main()
