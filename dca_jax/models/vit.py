"""Pre-LN Vision Transformer (ViT / DeiT / R50+ViT hybrid / DINOv2 / CLIP) in Flax Linen.

Parameter names follow timm's `vision_transformer.py` (`patch_embed`, `cls_token`, `reg_token`,
`pos_embed`, `norm_pre`, `block_{i}/{norm1,attn/{qkv,proj},ls1,norm2,mlp/{fc1,fc2},ls2}`,
`norm`), so the weight importer is a plain renaming. The variants (and what each carries: its
normalisation, interpolation, weights) are registered in `dca_jax/backbones/`, one file per
family; `get_variant` builds a `ViTConfig` from there. The attention exposes its pieces (q/k/v
projection, attention, output projection) because DCAL reuses one block's weights with other
query and key/value sets (GLCA, PWCA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dca_jax import backbones

Dtype = Any
LN_EPS = 1e-6  # timm and the original ViT use 1e-6, not PyTorch's 1e-5.
dense_init = nn.initializers.truncated_normal(0.02)


@jax.custom_jvp
def gelu_exact(x):
  """The exact (erf) GELU of timm/PyTorch nn.GELU, with a hand-written derivative.

  Same values as `nn.gelu(x, approximate=False)`, but the derivative Phi(x) + x*phi(x) reuses
  the erf and one exp: on XLA's CPU backend the MLP's forward+backward runs about 2x faster than
  with jax.nn.gelu's erfc form and its autodiff (docs/BENCHMARKS.md).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return x * cdf, (cdf + x * pdf) * t


def quick_gelu(x):
  """CLIP's (OpenAI) activation, x * sigmoid(1.702 x) (timm `QuickGELU`)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': gelu_exact, 'quick_gelu': quick_gelu}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 16
  resnet_layers: Optional[Sequence[int]] = None  # R50 hybrid: ResNet-v2 stage depths
  resnet_width: int = 64
  layer_scale: bool = False      # DINOv2/DeiT-III: x + gamma * branch(x), gamma per channel
  num_registers: int = 0         # register tokens after CLS (DINOv2 reg4): [CLS, regs, patches]
  no_embed_class: bool = False   # timm's: pos_embed covers the patches only (not CLS/registers)
  pre_norm: bool = False         # CLIP: LayerNorm (`norm_pre`) on the tokens before block 0
  patch_bias: bool = True        # CLIP's patch embedding has no bias
  norm_eps: float = LN_EPS       # every LayerNorm's eps (CLIP 1e-5)
  activation: str = 'gelu'       # MLP: gelu (exact) | quick_gelu (OpenAI CLIP)

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation {self.activation!r} not in {tuple(ACTIVATIONS)}')
    if self.num_registers < 0:
      raise ValueError(f'num_registers={self.num_registers} must be >= 0')
    if self.num_registers and not self.no_embed_class:
      raise ValueError('register tokens need no_embed_class=True: the position table covers the '
                       'patches only (timm, DINOv2 reg4)')

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches: CLS and the registers."""
    return 1 + self.num_registers

  @property
  def stem_stride(self) -> int:
    # ResNet-v2 stem: conv/2 + pool/2, then every stage after the first halves the map.
    return 1 if self.resnet_layers is None else 4 * 2 ** (len(self.resnet_layers) - 1)

  def grid_size(self, input_size: int) -> int:
    stride = self.stem_stride * self.patch_size
    if input_size % stride:
      raise ValueError(f'input_size {input_size} is not a multiple of the backbone stride {stride}')
    return input_size // stride

  def num_patches(self, input_size: int) -> int:
    return self.grid_size(input_size) ** 2


# Every variant's architecture, from the registry (dca_jax/backbones/: one file per family,
# with the timm architecture each matches, its normalisation, interpolation and weights).
VARIANTS = {name: dict(variant.arch) for name, variant in backbones.VARIANTS.items()}


def get_variant(name: str, overrides: Optional[dict] = None) -> ViTConfig:
  """The ViTConfig of registered backbone `name`, with `overrides` (config.backbone_overrides)."""
  kwargs = dict(backbones.get(name).arch)
  kwargs.update(dict(overrides or {}))
  if 'resnet_layers' in kwargs and kwargs['resnet_layers'] is not None:
    kwargs['resnet_layers'] = tuple(kwargs['resnet_layers'])
  try:
    return ViTConfig(**kwargs)
  except TypeError as e:
    raise ValueError(f'bad backbone_overrides for {name}: {e}') from None


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, epsilon):
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  mean = x.mean(axis=-1, keepdims=True)
  centred = x - mean
  rstd = jax.lax.rsqrt(jnp.square(centred).mean(axis=-1, keepdims=True) + epsilon)
  x_hat = centred * rstd
  return x_hat * scale + bias, (x_hat, rstd, scale)


def _layer_norm_bwd(epsilon, res, g):
  del epsilon
  x_hat, rstd, scale = res
  rows = tuple(range(g.ndim - 1))
  g_hat = g * scale
  dx = rstd * (g_hat - g_hat.mean(axis=-1, keepdims=True)
               - x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))
  return dx, (g * x_hat).sum(axis=rows), g.sum(axis=rows)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """`nn.LayerNorm(epsilon, dtype=float32)` (same 'scale'/'bias' parameters and values) with a
  hand-written backward that keeps x_hat and 1/std, where autodiff of nn.LayerNorm keeps four
  [tokens, width] arrays per norm (the step's temporary memory, and fresh pages on CPU)."""
  epsilon: float = LN_EPS

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (width,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (width,), jnp.float32)
    return _layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  activation: str = 'gelu'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init, name='fc1')(x)
    x = ACTIVATIONS[self.activation](x)  # gelu: timm/PyTorch nn.GELU, the exact erf form
    return nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name='fc2')(x)


def attention(q, k, v, *, need_weights: bool = False, impl: str = 'xla'):
  """softmax(q k^T / sqrt(d)) v over [batch, tokens, heads, head_dim] inputs.

  Logits and softmax run in float32 whatever the compute dtype. Returns (out, weights) where
  weights is the head-mean of the float32 attention map, [batch, q, k], when asked for (the
  rollout's input; no gradient flows through it), else None.
  """
  if impl == 'cudnn' and not need_weights and q.dtype in (jnp.bfloat16, jnp.float16):
    # Fused flash attention (GPU; cuDNN takes bf16/fp16 only, fp32 falls through to XLA).
    return fused_attention(q, k, v, implementation='cudnn'), None
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  logits = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  unnormalized = jnp.exp(logits)
  denom = unnormalized.sum(axis=-1, keepdims=True)  # [b, h, q, 1]
  # Normalise the [q, d] output rather than the [q, k] map: one pass fewer over the largest
  # array, forward and backward (PWCA's map is [q, 2k]).
  out = jnp.einsum('bhqk,bkhd->bqhd', unnormalized.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = (out / jnp.swapaxes(denom, 1, 2)).astype(v.dtype)
  head_mean = None
  if need_weights:
    head_mean = jax.lax.stop_gradient(unnormalized / denom).mean(axis=1)
  return out, head_mean


def fused_attention(q, k, v, *, implementation: str = 'cudnn'):
  """`jax.nn.dot_product_attention` with the token axes padded to even lengths.

  JAX trains cuDNN's fused kernel only on even sequence lengths, and ViT's are odd: 785 tokens
  at 448 px (28 x 28 patches + CLS), 129 for Re-ID's 256 x 128, GLCA's 1 + R queries. Padded
  keys are masked out (`key_value_seq_lengths`); padded query rows attend normally and are
  sliced off, so their cotangent is zero. With even lengths nothing is padded.
  """
  batch, num_q, num_kv = q.shape[0], q.shape[1], k.shape[1]
  pad_q, pad_kv = num_q % 2, num_kv % 2
  if not (pad_q or pad_kv):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
  out = jax.nn.dot_product_attention(
      pad(q, pad_q), pad(k, pad_kv), pad(v, pad_kv),
      key_value_seq_lengths=jnp.full((batch,), num_kv, jnp.int32), implementation=implementation)
  return out[:, :num_q]


class Attention(nn.Module):
  """Multi-head attention, fused qkv projection in timm's layout [q heads | k heads | v heads]."""
  width: int
  num_heads: int
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    self.qkv = nn.Dense(3 * self.width, dtype=self.dtype, kernel_init=dense_init)
    self.proj = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init)

  def project_qkv(self, x):
    """[B, N, D] -> q, k, v each [B, N, heads, head_dim]."""
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.width // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def project_out(self, o):
    b, n = o.shape[:2]
    return self.proj(o.reshape(b, n, self.width))


class LayerScale(nn.Module):
  """x * gamma, gamma a learned [D] vector (timm `LayerScale`, init 1e-5 as DINOv2's)."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    gamma = self.param('gamma', nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class EncoderBlock(nn.Module):
  """x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x))), with DCAL's query/key-value variants.

  With `layer_scale` each branch is scaled by its own per-channel gamma (`ls1`, `ls2`) before
  the residual sum, as timm's Block(init_values=...) (DINOv2).

  Plain self-attention is `__call__(x)`. DCAL uses the same weights in two more ways:
  - GLCA: `query_index` [B, Q] picks the query tokens (and the residual rows); keys/values
    stay all N+1 tokens (local query, global key-value).
  - PWCA: `extra_kv` = (k2, v2) from the partner image are appended to this image's keys and
    values, and one softmax runs over all 2N+2 keys.
  Returns (x_out, (k, v), head-mean attention weights or None).
  """
  width: int
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  partner_stop_gradient: bool = False  # PWCA: no gradient into the partner's SA keys/values
  layer_scale: bool = False
  norm_eps: float = LN_EPS
  activation: str = 'gelu'

  def setup(self):
    self.norm1 = LayerNorm(self.norm_eps)
    self.attn = Attention(width=self.width, num_heads=self.num_heads, dtype=self.dtype)
    self.norm2 = LayerNorm(self.norm_eps)
    self.mlp = Mlp(self.mlp_dim, dtype=self.dtype, activation=self.activation)
    self.drop = DropPath(self.drop_path)
    if self.layer_scale:
      self.ls1, self.ls2 = LayerScale(), LayerScale()

  def sa_and_pwca(self, x, x_pw, partner, deterministic: bool, need_weights: bool):
    """DCAL's use of a backbone block: the SA step (with the head-mean attention for the
    rollout when `need_weights`), then, when `x_pw` is given, the PWCA step with keys/values
    [own; partner's SA k/v]. Under remat this is one region, so the partner's gathered k/v are
    recomputed, not saved. Every argument is positional: remat's static ones (4, 5) must be
    passed."""
    x_new, (k, v), head_mean = self(x, deterministic, need_weights)
    if x_pw is not None:
      extra = (partner_rows(k, partner), partner_rows(v, partner))
      if self.partner_stop_gradient:
        extra = jax.lax.stop_gradient(extra)
      x_pw, _, _ = self(x_pw, deterministic, False, None, extra)
    return x_new, x_pw, head_mean

  def __call__(self, x, deterministic: bool = True, need_weights: bool = False,
               query_index=None, extra_kv=None):
    q, k, v = self.attn.project_qkv(self.norm1(x))
    if query_index is not None:
      q = jnp.take_along_axis(q, query_index[:, :, None, None], axis=1)
      x = jnp.take_along_axis(x, query_index[:, :, None], axis=1)
    keys, values = k, v
    if extra_kv is not None:
      keys = jnp.concatenate([k, extra_kv[0].astype(k.dtype)], axis=1)
      values = jnp.concatenate([v, extra_kv[1].astype(v.dtype)], axis=1)
    impl = 'xla' if need_weights else self.attention_impl
    o, head_mean = attention(q, keys, values, need_weights=need_weights, impl=impl)
    branch = self.attn.project_out(o)
    if self.layer_scale:
      branch = self.ls1(branch)
    x = x + self.drop(branch, deterministic).astype(x.dtype)
    branch = self.mlp(self.norm2(x))
    if self.layer_scale:
      branch = self.ls2(branch)
    x = x + self.drop(branch, deterministic).astype(x.dtype)
    return x, (k, v), head_mean


def partner_rows(x, partner):
  """The partner images' rows of x [B, ...]: partner [B] holds batch indices; partner [G, B/G]
  holds indices within each of G contiguous groups (one per device), gathered group by group,
  so a data-parallel step moves no keys/values between devices."""
  if partner.ndim == 1:
    return jnp.take(x, partner, axis=0)
  groups = partner.shape[0]
  grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
  return jax.vmap(lambda rows, index: jnp.take(rows, index, axis=0))(grouped, partner).reshape(
      x.shape)


class Embedding(nn.Module):
  """Image -> [CLS; registers; patch tokens] with the position embedding, [B, 1 + R + N, D]
  float32 (R = num_registers, 0 but for DINOv2 reg4), then `norm_pre` for a pre-norm (CLIP)
  backbone.

  The position table covers CLS and the patches (timm's default, [1, 1 + N, D]: concatenated,
  then added) or, with `no_embed_class`, the patches only ([1, N, D]: added to the patches,
  then CLS and the registers concatenated); the registers never have one (timm)."""
  config: ViTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    vit_config = self.config
    x = images
    if vit_config.resnet_layers is not None:
      from dca_jax.models.resnet import ResNetStem  # pylint: disable=g-import-not-at-top
      x = ResNetStem(layers=tuple(vit_config.resnet_layers), width=vit_config.resnet_width,
                     dtype=self.dtype, name='stem')(x)
    patch = vit_config.patch_size
    x = nn.Conv(vit_config.width, (patch, patch), strides=patch, padding='VALID',
                use_bias=vit_config.patch_bias, dtype=self.dtype, kernel_init=dense_init,
                name='patch_embed')(x)
    batch, rows, cols, width = x.shape  # the patch grid may be non-square (Re-ID: 16 x 8)
    x = x.reshape(batch, rows * cols, width).astype(jnp.float32)
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, width))
    prefix = [jnp.broadcast_to(cls, (batch, 1, width))]
    if vit_config.num_registers:
      reg = self.param('reg_token', nn.initializers.normal(1e-6),
                       (1, vit_config.num_registers, width))
      prefix.append(jnp.broadcast_to(reg, (batch, vit_config.num_registers, width)))
    if vit_config.no_embed_class:
      pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, rows * cols, width))
      x = jnp.concatenate(prefix + [x + pos], axis=1)
    else:
      pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, rows * cols + 1, width))
      x = jnp.concatenate(prefix + [x], axis=1) + pos
    if vit_config.pre_norm:
      x = LayerNorm(vit_config.norm_eps, name='norm_pre')(x)
    return x


def drop_path_rates(rate: float, depth: int):
  """Linearly increasing stochastic depth over the blocks, as in timm/DeiT."""
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


def make_block(config: ViTConfig, *, drop_path: float, dtype, attention_impl='xla',
               remat_policy: Optional[str] = None, name: Optional[str] = None,
               dcal_step: bool = False, partner_stop_gradient: bool = False) -> EncoderBlock:
  """An EncoderBlock, wrapped in `nn.remat` with a named jax.checkpoint_policies policy if asked.

  `dcal_step=True` remats the `sa_and_pwca` method (how DCAL calls backbone blocks) instead
  of `__call__` (plain ViT, GLCA).
  """
  cls = EncoderBlock
  if remat_policy is not None:
    policy = None if remat_policy == 'full' else getattr(jax.checkpoint_policies, remat_policy)
    if dcal_step:  # static: deterministic and need_weights (arguments 4, 5; self is 0)
      cls = nn.remat(EncoderBlock, static_argnums=(4, 5), policy=policy, methods=['sa_and_pwca'])
    else:  # static: deterministic (2) and need_weights (3)
      cls = nn.remat(EncoderBlock, static_argnums=(2, 3), policy=policy)
  return cls(width=config.width, num_heads=config.num_heads, mlp_dim=config.mlp_dim,
             drop_path=drop_path, dtype=dtype, attention_impl=attention_impl,
             partner_stop_gradient=partner_stop_gradient, layer_scale=config.layer_scale,
             norm_eps=config.norm_eps, activation=config.activation, name=name)


class VisionTransformer(nn.Module):
  """The plain classifier (SA only): CLS -> final LN -> head.

  timm's VisionTransformer with the same parameter names: the reference the weight import and
  the timm parity tests check, and the SA-only baseline of the cost tools."""
  config: ViTConfig
  num_classes: int
  stochastic_depth_prob: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    vit_config = self.config
    x = Embedding(vit_config, dtype=self.dtype, name='embed')(images)
    for i, rate in enumerate(drop_path_rates(self.stochastic_depth_prob, vit_config.depth)):
      x, _, _ = make_block(vit_config, drop_path=rate, dtype=self.dtype, name=f'block_{i}')(
          x, not train)
    x = nn.LayerNorm(epsilon=vit_config.norm_eps, dtype=jnp.float32, name='norm')(x)
    return nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=dense_init,
                    name='head')(x[:, 0])
