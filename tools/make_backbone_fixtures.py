"""The tiny timm parity fixtures of the families beyond the paper's, tests/fixtures/bb_*
(docs/WEIGHTS.md): DINOv2 (layer scale; with 4 registers), CLIP (pre-norm, its GELU and
QuickGELU logits) as timm state dicts, the same weights in Meta's DINOv2 and OpenAI's CLIP
layouts (each proven: timm's `checkpoint_filter_fn` gives back the timm state dict), and
bb_expected.npz (inputs, logits at native, larger and non-square sizes, CLS features). Seeded,
byte-identical re-runs.

  .venv-timm/bin/python -m tools.make_backbone_fixtures [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import numpy as np
import torch
from safetensors.torch import save_file

import timm
from timm.layers import LayerNorm
from timm.models import vision_transformer as tv

from tools.make_timm_fixtures import save_npz  # byte-identical re-runs (no zip timestamps)


def make_dinov2(img_size=56, registers=0):
  extra = dict(reg_tokens=registers, no_embed_class=True) if registers else {}
  return tv.VisionTransformer(img_size=img_size, patch_size=14, embed_dim=32, depth=2,
                              num_heads=2, mlp_ratio=2.0, num_classes=10, init_values=1e-5,
                              **extra)


def make_clip(img_size=32, act_layer=None):
  extra = dict(act_layer=act_layer) if act_layer else {}
  return tv.VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, mlp_ratio=2.0, num_classes=10, pre_norm=True,
                              norm_layer=partial(LayerNorm, eps=1e-5), **extra)


# name -> (builder, native size, other sizes (height, width))
MODELS = {
    'bb_dinov2': (make_dinov2, 56, ((84, 84), (84, 42))),
    'bb_dinov2_reg': (partial(make_dinov2, registers=4), 56, ((84, 84), (84, 42))),
    'bb_clip': (make_clip, 32, ((48, 48), (48, 24))),
}


@torch.no_grad()
def randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=g)
    if name.endswith('.gamma'):   # layer scale: O(1) and signed, so a missing gamma shows
      p.copy_(1.0 + 0.5 * noise)
    elif p.ndim == 1:             # norm scales / biases: away from 1 / 0
      p.add_(0.2 * noise)
    elif name in ('cls_token', 'pos_embed', 'reg_token'):
      p.copy_(0.3 * noise)
    else:                         # unit-gain weights so the logits depend on the input
      p.copy_(noise / np.sqrt(p[0].numel()))
  return model


def to_meta_dinov2(sd, seed):
  """timm DINOv2-with-registers state dict -> Meta's layout (the inverse of timm's
  `_convert_dinov2`: Meta's CLS has its own position slot; timm folds it into cls_token)."""
  out = {k: v.clone() for k, v in sd.items() if k not in ('reg_token', 'cls_token', 'pos_embed')}
  cls_pos = 0.3 * torch.randn(sd['cls_token'].shape, generator=torch.Generator().manual_seed(seed))
  out['register_tokens'] = sd['reg_token'].clone()
  out['cls_token'] = sd['cls_token'] - cls_pos
  out['pos_embed'] = torch.cat([cls_pos, sd['pos_embed']], dim=1)
  out['mask_token'] = torch.zeros(1, sd['cls_token'].shape[-1])
  return out


def to_openai_clip(sd):
  """timm CLIP state dict -> OpenAI's `visual.*` layout (the inverse of `_convert_openai_clip`;
  the head is CLIP's bias-free projection), plus one text-tower key the import must skip."""
  out = {'visual.conv1.weight': sd['patch_embed.proj.weight'],
         'visual.class_embedding': sd['cls_token'][0, 0],
         'visual.positional_embedding': sd['pos_embed'][0],
         'visual.ln_pre.weight': sd['norm_pre.weight'], 'visual.ln_pre.bias': sd['norm_pre.bias'],
         'visual.ln_post.weight': sd['norm.weight'], 'visual.ln_post.bias': sd['norm.bias'],
         'visual.proj': sd['head.weight'].t(),
         'token_embedding.weight': torch.zeros(7, 4)}
  depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
  names = {'norm1': 'ln_1', 'norm2': 'ln_2', 'attn.qkv.weight': 'attn.in_proj_weight',
           'attn.qkv.bias': 'attn.in_proj_bias', 'attn.proj': 'attn.out_proj',
           'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj'}
  for i in range(depth):
    for key, value in sd.items():
      if not key.startswith(f'blocks.{i}.'):
        continue
      rest = key[len(f'blocks.{i}.'):]
      for old, new in names.items():
        if rest.startswith(old):
          rest = new + rest[len(old):]
          break
      out[f'visual.transformer.resblocks.{i}.{rest}'] = value
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


def check_native(native, sd, model, what):
  back = tv.checkpoint_filter_fn(dict(native), model)
  assert set(back) == set(sd), (what, sorted(set(back) ^ set(sd)))
  err = max(float((back[k] - sd[k]).abs().max()) for k in sd)
  print(f'{what}: timm checkpoint_filter_fn(native) == timm state dict, max |d| = {err:.3g}')
  assert err < 1e-6, err


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                'fixtures'))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  expected = {}
  inputs = {}
  for size in (32, 48, 56, 84):
    inputs[size] = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    expected[f'inputs_{size}'] = inputs[size].numpy()
  for seed, (name, (make, native, others)) in enumerate(MODELS.items()):
    torch.manual_seed(200 + seed)
    model = randomize(make().eval(), 20 + seed)
    if name == 'bb_clip':
      with torch.no_grad():
        model.head.bias.zero_()  # CLIP's projection has no bias (the OpenAI layout has none)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(args.out, f'{name}.safetensors'))
    variants = {'': make}
    if name == 'bb_clip':
      variants['quickgelu_'] = partial(make_clip, act_layer='quick_gelu')
    for tag, builder in variants.items():
      net = builder().eval()
      net.load_state_dict(sd)
      with torch.no_grad():
        expected[f'{name}_{tag}logits_{native}'] = net(inputs[native]).numpy()
        features = net.forward_features(inputs[native])[:, 0]  # CLS after `norm`
        expected[f'{name}_{tag}features_{native}'] = features.numpy()
      for height, width in others:
        resized = builder(img_size=(height, width)).eval()
        resized.load_state_dict(tv.checkpoint_filter_fn(dict(sd), resized))
        x = inputs[height][:, :, :height, :width].contiguous()
        with torch.no_grad():
          expected[f'{name}_{tag}logits_{height}x{width}'] = resized(x).numpy()
        print(f'{name} {tag or "gelu "}{height}x{width}: grid {tuple(model.patch_embed.grid_size)}'
              f' -> {tuple(resized.patch_embed.grid_size)}')
    if name == 'bb_dinov2_reg':
      meta = to_meta_dinov2(sd, 7)
      check_native(meta, sd, model, 'Meta DINOv2 layout')
      save_file(meta, os.path.join(args.out, 'bb_dinov2_reg_meta.safetensors'))
    if name == 'bb_clip':
      openai = to_openai_clip(sd)
      check_native(openai, sd, model, 'OpenAI CLIP layout')
      save_file(openai, os.path.join(args.out, 'bb_clip_openai.safetensors'))
  save_npz(os.path.join(args.out, 'bb_expected.npz'), expected)
  print('timm', timm.__version__, 'torch', torch.__version__)
  for f in sorted(os.listdir(args.out)):
    if f.startswith('bb_'):
      print(f'  {f}: {os.path.getsize(os.path.join(args.out, f)) / 1024:.0f} KiB')


if __name__ == '__main__':
  main()
