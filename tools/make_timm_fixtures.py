"""The tiny timm parity fixtures of tests/fixtures/ (random weights, no download; docs/WEIGHTS.md,
"Proof of parity"): `vit` (ViT/DeiT) and `hybrid` (R50+ViT in miniature) as .safetensors, .pth
and Google .npz (`to_google_npz`, proven by timm's own npz loader), and expected.npz (inputs,
timm's logits at 32, 64, 64x32 and 48x24 px, timm's position-embedding resizes). Seeded, fixed
zip timestamps: a re-run with the same torch/timm writes byte-identical files.

  .venv-timm/bin/python -m tools.make_timm_fixtures [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
from functools import partial

import numpy as np
import torch
from safetensors.torch import save_file

import timm
from timm.layers import HybridEmbed, StdConv2dSame, resample_abs_pos_embed
from timm.models import vision_transformer as tv
from timm.models import vision_transformer_hybrid as tvh
from timm.models.resnetv2 import ResNetV2


def make_vit(img_size=32):
  return tv.VisionTransformer(img_size=img_size, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                              mlp_ratio=4.0, num_classes=10)


def make_hybrid(img_size=32):
  backbone = ResNetV2(layers=(1, 1), channels=(128, 256), stem_chs=32, num_classes=0,
                      global_pool='', preact=False, stem_type='same',
                      conv_layer=partial(StdConv2dSame, eps=1e-8))
  return tv.VisionTransformer(img_size=img_size, patch_size=1, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=10,
                              embed_layer=partial(HybridEmbed, backbone=backbone))


MODELS = {'vit': (make_vit, tv.checkpoint_filter_fn), 'hybrid': (make_hybrid, tvh.checkpoint_filter_fn)}

# Non-square inputs (height, width): the 4x4 grid of the 32 px checkpoint goes to 8x4 (rows up,
# columns kept) and to 6x3 (rows up, columns down), as persons at 256x128 take 14x14 to 16x8.
NON_SQUARE_SIZES = ((64, 32), (48, 24))

# resize_posemb references: (source grid side, target (height, width)).
POSEMB_CASES = ((6, (3, 3)), (6, (4, 4)), (6, (9, 9)), (6, (12, 12)), (6, (13, 13)),
                (6, (16, 8)), (6, (4, 9)), (14, (16, 8)))


def posemb_key(source_side, height, width):
  """expected.npz key of timm's bicubic resize (the square 6x6 ones keep their old names)."""
  if source_side == 6 and height == width:
    return f'posemb_bicubic_{height}'
  return f'posemb_bicubic_{source_side}_to_{height}x{width}'


def save_npz(path, arrays):
  """np.savez without the wall-clock timestamps in the zip, so re-runs are byte-identical."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    for name, value in arrays.items():
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
      archive.writestr(zipfile.ZipInfo(name + '.npy', date_time=(1980, 1, 1, 0, 0, 0)),
                       buffer.getvalue())


@torch.no_grad()
def randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=g)
    if p.ndim == 1:      # norm scales / biases: away from 1 / 0
      p.add_(0.2 * noise)
    elif name in ('cls_token', 'pos_embed'):
      p.copy_(0.3 * noise)
    else:                # unit-gain weights (fan-in scaling) so the logits depend on the input
      p.copy_(noise / np.sqrt(p[0].numel()))
  return model


def to_google_npz(sd, num_heads):
  """timm state dict -> Google ViT npz naming (the inverse of timm's `_load_weights`)."""
  n = lambda t: t.detach().cpu().numpy().astype(np.float32)
  hwio = lambda t: n(t).transpose(2, 3, 1, 0)
  out = {}
  out['embedding/kernel'] = hwio(sd['patch_embed.proj.weight'])
  out['embedding/bias'] = n(sd['patch_embed.proj.bias'])
  out['cls'] = n(sd['cls_token'])
  out['Transformer/posembed_input/pos_embedding'] = n(sd['pos_embed'])
  out['Transformer/encoder_norm/scale'] = n(sd['norm.weight'])
  out['Transformer/encoder_norm/bias'] = n(sd['norm.bias'])
  out['head/kernel'] = n(sd['head.weight']).T
  out['head/bias'] = n(sd['head.bias'])
  depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
  for i in range(depth):
    b, g = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    mha = g + 'MultiHeadDotProductAttention_1/'
    out[g + 'LayerNorm_0/scale'] = n(sd[b + 'norm1.weight'])
    out[g + 'LayerNorm_0/bias'] = n(sd[b + 'norm1.bias'])
    out[g + 'LayerNorm_2/scale'] = n(sd[b + 'norm2.weight'])
    out[g + 'LayerNorm_2/bias'] = n(sd[b + 'norm2.bias'])
    qkv_w, qkv_b = n(sd[b + 'attn.qkv.weight']), n(sd[b + 'attn.qkv.bias'])
    d = qkv_w.shape[1]
    hd = d // num_heads
    for j, name in enumerate(('query', 'key', 'value')):
      out[mha + f'{name}/kernel'] = qkv_w[j * d:(j + 1) * d].T.reshape(d, num_heads, hd)
      out[mha + f'{name}/bias'] = qkv_b[j * d:(j + 1) * d].reshape(num_heads, hd)
    out[mha + 'out/kernel'] = n(sd[b + 'attn.proj.weight']).T.reshape(num_heads, hd, d)
    out[mha + 'out/bias'] = n(sd[b + 'attn.proj.bias'])
    for r in range(2):
      out[g + f'MlpBlock_3/Dense_{r}/kernel'] = n(sd[b + f'mlp.fc{r + 1}.weight']).T
      out[g + f'MlpBlock_3/Dense_{r}/bias'] = n(sd[b + f'mlp.fc{r + 1}.bias'])
  bb = 'patch_embed.backbone.'
  if bb + 'stem.conv.weight' in sd:
    out['conv_root/kernel'] = hwio(sd[bb + 'stem.conv.weight'])
    out['gn_root/scale'] = n(sd[bb + 'stem.norm.weight'])
    out['gn_root/bias'] = n(sd[bb + 'stem.norm.bias'])
    for k, v in sd.items():
      if not k.startswith(bb + 'stages.'):
        continue
      _, _, _, s, _, u, *rest = k.split('.')
      p = f'block{int(s) + 1}/unit{int(u) + 1}/'
      rest = '.'.join(rest)
      mod, what = rest.rsplit('.', 1)
      if what == 'weight' and mod.startswith('conv') or mod == 'downsample.conv':
        name = 'conv_proj' if mod == 'downsample.conv' else mod
        out[p + f'{name}/kernel'] = hwio(v)
      else:
        name = 'gn_proj' if mod == 'downsample.norm' else mod.replace('norm', 'gn')
        out[p + f'{name}/' + ('scale' if what == 'weight' else 'bias')] = n(v)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures'))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.manual_seed(0)
  expected = {}
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  x_big = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  expected['inputs_32'] = x.numpy()
  expected['inputs_64'] = x_big.numpy()
  for seed, (name, (make, filter_fn)) in enumerate(MODELS.items()):
    torch.manual_seed(100 + seed)
    model = randomize(make().eval(), 10 + seed)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with torch.no_grad():
      logits = model(x).numpy()
    save_file(sd, os.path.join(args.out, f'{name}.safetensors'))
    torch.save(sd, os.path.join(args.out, f'{name}.pth'))
    npz_path = os.path.join(args.out, f'{name}.npz')
    save_npz(npz_path, to_google_npz(sd, model.blocks[0].attn.num_heads))

    # Proof of the npz writer: timm's own npz loader into a fresh model.
    fresh = make().eval()
    tv._load_weights(fresh, npz_path)
    with torch.no_grad():
      npz_logits = fresh(x).numpy()
    err = np.abs(npz_logits - logits).max()
    print(f'{name}: timm npz loader round trip max |dlogit| = {err:.3g}')
    assert err < 1e-5, err

    expected[f'{name}_logits_32'] = logits
    # Other sizes: timm rebuilds the model at img_size and resamples the checkpoint's pos-embed
    # itself (checkpoint_filter_fn: bicubic, antialias).
    for height, width in ((64, 64),) + NON_SQUARE_SIZES:
      resized = make(img_size=64 if height == width else (height, width)).eval()
      resized.load_state_dict(filter_fn(dict(sd), resized))
      with torch.no_grad():
        resized_logits = resized(x_big[:, :, :height, :width].contiguous()).numpy()
      size = str(height) if height == width else f'{height}x{width}'
      expected[f'{name}_logits_{size}'] = resized_logits
      print(f'{name}: {height}x{width} px, grid {tuple(model.patch_embed.grid_size)} -> '
            f'{tuple(resized.patch_embed.grid_size)}, logits {resized_logits.shape}')

  # resize_posemb references from timm (bicubic, antialias=True, as checkpoint_filter_fn).
  sources = {6: torch.randn(1, 1 + 6 * 6, 8, generator=torch.Generator().manual_seed(3)),
             14: torch.randn(1, 1 + 14 * 14, 8, generator=torch.Generator().manual_seed(4))}
  expected['posemb_src'] = sources[6].numpy()
  expected['posemb_src_14'] = sources[14].numpy()
  for source_side, (height, width) in POSEMB_CASES:
    expected[posemb_key(source_side, height, width)] = resample_abs_pos_embed(
        sources[source_side], new_size=(height, width), num_prefix_tokens=1,
        interpolation='bicubic', antialias=True).numpy()
  save_npz(os.path.join(args.out, 'expected.npz'), expected)
  print('timm', timm.__version__, 'torch', torch.__version__)
  for f in sorted(os.listdir(args.out)):
    print(f'  {f}: {os.path.getsize(os.path.join(args.out, f)) / 1024:.0f} KiB')


if __name__ == '__main__':
  main()
