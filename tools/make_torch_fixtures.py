"""Builds the torch.save format fixtures in tests/fixtures/ (torch only: no timm, no jax).

  python -m venv $TORCH_VENV && $TORCH_VENV/bin/pip install torch==2.13.0 safetensors
  TORCH_VENV/bin/python -m tools.make_torch_fixtures [--out tests/fixtures]

What `dca_jax/weights.py` reads without torch, written by torch itself:
- `vit_legacy.pth`: the timm `vit` fixture's state dict (read from `vit.safetensors`, which
  tools/make_timm_fixtures.py made) in the legacy, pre-1.6 format
  (`_use_new_zipfile_serialization=False`; DeiT's 2020 releases and many Re-ID checkpoints are
  such files);
- `torch_layouts.pth` (zip) and `torch_layouts_legacy.pth`: a `{'model': state dict, 'epoch': 3}`
  whose tensors cover what a reader can get wrong: every float dtype (bf16, fp16, fp64), integer
  and bool storages, a transposed (non-contiguous) tensor, a slice at a storage offset, two
  tensors sharing one storage, an `nn.Parameter`, a 0-d and an empty tensor;
- `torch_layouts.npz`: the same tensors as torch's own `.numpy()` gives them (bf16 via float32).
Seeded; the expected values come from torch, not from the reader under test.
"""

from __future__ import annotations

import argparse
import collections
import os

import numpy as np
import torch
from safetensors.torch import load_file


def layouts():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  shared = torch.randn(12, generator=g)
  state = collections.OrderedDict()
  state['f32'] = torch.randn(3, 4, generator=g)
  state['f16'] = torch.randn(7, generator=g).half()
  state['bf16'] = torch.randn(2, 3, generator=g).bfloat16()
  state['f64'] = torch.randn(2, 2, generator=g).double()
  state['i64'] = torch.arange(-5, 5, dtype=torch.int64)
  state['i32'] = torch.tensor([[1, -2], [3, 2 ** 30]], dtype=torch.int32)
  state['u8'] = torch.tensor([0, 7, 255], dtype=torch.uint8)
  state['bool'] = torch.tensor([True, False, True])
  state['transposed'] = base.t()                  # stride (1, 5): not contiguous
  state['offset_slice'] = base[2:5, 1:4]          # storage offset 11, stride (5, 1)
  state['shared_a'] = shared[:6].view(2, 3)       # one storage, two views
  state['shared_b'] = shared[4:].view(4, 2)
  state['parameter'] = torch.nn.Parameter(torch.randn(4, generator=g))
  state['scalar'] = torch.tensor(2.5)
  state['empty'] = torch.zeros(0, 3)
  return {'model': state, 'epoch': 3}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                    'fixtures'))
  args = parser.parse_args()
  vit = load_file(os.path.join(args.out, 'vit.safetensors'))
  torch.save(vit, os.path.join(args.out, 'vit_legacy.pth'), _use_new_zipfile_serialization=False)
  checkpoint = layouts()
  torch.save(checkpoint, os.path.join(args.out, 'torch_layouts.pth'))
  torch.save(checkpoint, os.path.join(args.out, 'torch_layouts_legacy.pth'),
             _use_new_zipfile_serialization=False)
  expected = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
              for k, v in checkpoint['model'].items()}
  np.savez(os.path.join(args.out, 'torch_layouts.npz'), **expected)
  # torch reads back what it wrote (the reference the tests compare our reader with)
  for name in ('torch_layouts.pth', 'torch_layouts_legacy.pth'):
    back = torch.load(os.path.join(args.out, name), weights_only=True)['model']
    for k, v in back.items():
      got = (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
      assert np.array_equal(got, expected[k]) and got.dtype == expected[k].dtype, (name, k)
  print('wrote vit_legacy.pth, torch_layouts.pth, torch_layouts_legacy.pth, torch_layouts.npz '
        f'(torch {torch.__version__})')


if __name__ == '__main__':
  main()
