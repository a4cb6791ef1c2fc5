"""ResNet-v2 stem of the R50+ViT hybrid (Flax Linen).

This is the backbone of the original R50+ViT-B/16 (Dosovitskiy et al. 2021) and of timm's
`vit_base_r50_s16_224/384`: timm's `ResNetV2(layers=(3, 4, 9), preact=False, stem_type='same',
conv_layer=StdConv2dSame(eps=1e-8), num_classes=0, global_pool='')`. Despite the "v2" name it is
*not* pre-activation: every conv is followed by GroupNorm(32) (+ ReLU, except after the last conv
of a unit, where ReLU comes after the residual sum), as in the Google `vit_jax` code.

Numerics follow timm (the parity target):
- weight standardisation over (kh, kw, cin) of each output filter with the biased variance and
  eps 1e-8 inside the square root (timm's `F.batch_norm(..., eps=1e-8)`; Google's vit_jax uses
  1e-5 — a ~1e-4 relative effect only on near-constant filters);
- GroupNorm eps 1e-5 (PyTorch's default, timm's `GroupNormAct`);
- TF 'SAME' padding for every conv and the 3x3/2 max-pool (pad total//2 before, the rest after;
  the pool pads with -inf), which is what `lax` 'SAME' does.

Parameter names are those of the Google npz (`conv_root`, `gn_root`,
`block{s}/unit{u}/{conv1,gn1,conv2,gn2,conv3,gn3,conv_proj,gn_proj}`), so importing the npz is a
renaming; all kernels are HWIO.
Channels: stem `width`; stage s (0-based) has bottleneck width `width * 2**s` and output
`4 * width * 2**s`; stage 0 has stride 1, every later stage stride 2 (output stride
4 * 2**(len(layers) - 1)).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
WS_EPS = 1e-8  # timm `_resnetv2`: partial(StdConv2dSame, eps=1e-8)
GN_EPS = 1e-5  # timm GroupNormAct default (torch.nn.GroupNorm)
GN_GROUPS = 32


def standardize_kernel(kernel, eps: float = WS_EPS):
  """Weight standardisation of an HWIO kernel, per output filter, in float32."""
  kernel = kernel.astype(jnp.float32)
  mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
  var = jnp.square(kernel - mean).mean(axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(var + eps)


class StdConv(nn.Module):
  """Bias-free conv with weight standardisation and TF 'SAME' padding."""
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                        (k, k, x.shape[-1], self.features))
    w = standardize_kernel(kernel).astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), w, window_strides=(self.strides, self.strides), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def group_norm(name: str):
  return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class Bottleneck(nn.Module):
  """Post-norm bottleneck unit: relu(gn3(conv3(...)) + shortcut)."""
  features: int  # output channels (4x the bottleneck width)
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    mid = self.features // 4
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = StdConv(self.features, 1, self.strides, self.dtype, name='conv_proj')(x)
      shortcut = group_norm('gn_proj')(shortcut)
    y = StdConv(mid, 1, 1, self.dtype, name='conv1')(x)
    y = nn.relu(group_norm('gn1')(y))
    y = StdConv(mid, 3, self.strides, self.dtype, name='conv2')(y)
    y = nn.relu(group_norm('gn2')(y))
    y = StdConv(self.features, 1, 1, self.dtype, name='conv3')(y)
    y = group_norm('gn3')(y)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """`depth` units `unit1..unit{depth}`; the first one carries the stride and the projection."""
  depth: int
  features: int
  first_stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for u in range(self.depth):
      x = Bottleneck(self.features, self.first_stride if u == 0 else 1, self.dtype,
                     name=f'unit{u + 1}')(x)
    return x


class ResNetStem(nn.Module):
  """NHWC images -> NHWC feature map of 4 * width * 2**(len(layers)-1) channels (float32)."""
  layers: Sequence[int]
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.width % GN_GROUPS:
      raise ValueError(f'ResNet width {self.width} must be a multiple of {GN_GROUPS} (GroupNorm)')
    x = StdConv(self.width, 7, 2, self.dtype, name='conv_root')(x)
    x = nn.relu(group_norm('gn_root')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for s, depth in enumerate(self.layers):
      x = ResNetStage(depth, 4 * self.width * 2 ** s, 1 if s == 0 else 2, self.dtype,
                      name=f'block{s + 1}')(x)
    return x
