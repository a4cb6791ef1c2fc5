"""The torch.save fixtures of tests/fixtures/, written by torch itself (torch only; docs/WEIGHTS.md):
`vit_legacy.pth` (the `vit` fixture in the pre-1.6 format), `torch_layouts{,_legacy}.pth` (every
dtype, integer and bool storages, transposed, offset and shared-storage tensors, a Parameter, 0-d
and empty tensors) and `torch_layouts.npz` (torch's own `.numpy()` of them).

  .venv-timm/bin/python -m tools.make_torch_fixtures [--out tests/fixtures]
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
