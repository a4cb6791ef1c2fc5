"""DCAL: self-attention (SA) + global-local (GLCA) + pair-wise (PWCA) cross-attention.

The three branches (METHOD.md):
- SA: the L backbone blocks; CLS -> final LN -> `head`.
- GLCA: one block with its own weights (`glca_block`); queries only for CLS + the top-R
  patches of the attention rollout, keys/values of all N+1 tokens; -> `glca_norm` -> `glca_head`.
- PWCA: the last T backbone blocks run a second stream with the SAME weights, whose keys/values
  are [K1; K2], [V1; V2], with K2/V2 the partner's SA keys/values at the same block (no extra
  pass over the partner). Training only; its CLS -> `norm` -> `head`.
The rollout is carried as a running product (one [B, N+1, N+1] float32 map), never L maps.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dca_jax import config_lib
from dca_jax.models import vit

Dtype = Any
BRANCHES = ('sa', 'glca', 'pwca')


# --- attention rollout -----------------------------------------------------------------------
def rollout_matrix(head_mean):
  """S̄ = 0.5·S + 0.5·I, rows re-normalised. head_mean: [B, N+1, N+1] float32."""
  n = head_mean.shape[-1]
  s = 0.5 * head_mean + 0.5 * jnp.eye(n, dtype=head_mean.dtype)
  return s / s.sum(axis=-1, keepdims=True)


def rollout_update(acc, head_mean):
  """Ŝ_i = S̄_i · Ŝ_{i-1}, with Ŝ_0 = I (acc None)."""
  s = rollout_matrix(head_mean)
  return s if acc is None else jnp.einsum('bij,bjk->bik', s, acc)


def rollout_cls_row(acc, head_mean):
  """CLS row of S̄_L · Ŝ_{L-1}: a vector-matrix product, the last full product is never formed."""
  s_cls = rollout_matrix(head_mean)[:, 0]
  return s_cls if acc is None else jnp.einsum('bj,bjk->bk', s_cls, acc)


def num_selected(num_patches: int, top_k_ratio: float) -> int:
  """R = round(ratio · N), at least 1 (78 of 784 at 448 px, ratio 0.1)."""
  return max(1, min(num_patches, int(round(top_k_ratio * num_patches))))


def select_tokens(cls_row, top_k_ratio: float):
  """Token indices [B, 1 + R]: CLS (0) then the R patches of highest rollout (CLS column dropped)."""
  patches = cls_row[:, 1:]
  r = num_selected(patches.shape[-1], top_k_ratio)
  _, idx = jax.lax.top_k(patches, r)
  cls = jnp.zeros((patches.shape[0], 1), idx.dtype)
  return jnp.concatenate([cls, idx + 1], axis=1)


def derangement(rng, batch_size: int):
  """A random pairing with no self-pairs: a random cycle through a random permutation.

  partner[order[j]] = order[(j + 1) % B], so each image gets another image of the batch.
  """
  if batch_size < 2:
    raise ValueError('PWCA needs at least 2 images per physical batch to pair them')
  order = jax.random.permutation(rng, batch_size)
  partner = jnp.zeros((batch_size,), jnp.int32)
  return partner.at[order].set(jnp.roll(order, -1).astype(jnp.int32))


# --- the model ---------------------------------------------------------------------------------
class DCAL(nn.Module):
  """DCAL over a ViT backbone. Call with `partner` (from `derangement`) to run PWCA."""
  config: vit.ViTConfig
  num_classes: int
  num_glca_layers: int = 1
  num_pwca_layers: int = 12
  top_k_ratio: float = 0.1
  glca_input: str = 'parallel'
  glca_pool: str = 'cls'               # cls | mean: what the GLCA classifier reads
  stochastic_depth_prob: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: Optional[str] = None   # None: no remat; 'full' or a jax.checkpoint_policies name
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, images, *, train: bool = False, partner=None):
    """Returns a dict of logits/features. PWCA runs only when `partner` is given."""
    cfg = self.config
    if self.num_glca_layers not in (0, 1):
      raise ValueError(f'num_glca_layers={self.num_glca_layers}: DCAL uses M = 1 (or 0 to disable)')
    if not 0 <= self.num_pwca_layers <= cfg.depth:
      raise ValueError(f'num_pwca_layers={self.num_pwca_layers} must be in [0, {cfg.depth}]')
    deterministic = not train
    rates = vit.drop_path_rates(self.stochastic_depth_prob, cfg.depth)
    kw = dict(dtype=self.dtype, remat_policy=self.remat_policy)
    # Uncertainty loss weights w_sa, w_glca, w_pwca (Kendall et al.), initialised to 0.
    loss_weights = self.param('loss_weights', nn.initializers.zeros, (len(BRANCHES),))
    norm = nn.LayerNorm(epsilon=vit.LN_EPS, dtype=jnp.float32, name='norm')
    head = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=vit.dense_init, name='head')

    x = vit.Embedding(cfg, dtype=self.dtype, name='embed')(images)
    pwca_start = cfg.depth - self.num_pwca_layers
    run_pwca = partner is not None and self.num_pwca_layers > 0
    x_pw, acc, glca_in, cls_row = None, None, None, None
    for i, rate in enumerate(rates):
      block = vit.make_block(cfg, drop_path=rate, attention_impl=self.attention_impl,
                             name=f'block_{i}', dcal_step=True, **kw)
      if run_pwca and i == pwca_start:
        x_pw = x  # the PWCA stream starts from the SA hidden state entering block L-T+1
      if i == cfg.depth - 1:
        glca_in = x  # GLCA sits parallel to the last SA block
      # head_mean carries no gradient (vit.attention): none flows through the rollout
      x, x_pw, head_mean = block.sa_pwca(x, x_pw, partner, deterministic)
      if i < cfg.depth - 1:
        acc = rollout_update(acc, head_mean)
      else:
        cls_row = rollout_cls_row(acc, head_mean)

    sa_feature = norm(x[:, 0])  # LN is per token: normalise only the CLS the head reads
    out = {'sa_logits': head(sa_feature), 'sa_feature': sa_feature,
           'rollout': cls_row, 'loss_weights': loss_weights}
    if self.num_glca_layers:
      if self.glca_input == 'on_top':
        glca_in = x
      index = select_tokens(cls_row, self.top_k_ratio)
      g, _, _ = vit.make_block(cfg, drop_path=rates[-1], name='glca_block', **kw)(
          glca_in, deterministic, False, index)
      g = nn.LayerNorm(epsilon=vit.LN_EPS, dtype=jnp.float32, name='glca_norm')(
          g[:, :1] if self.glca_pool == 'cls' else g)
      # 'cls' (METHOD.md): with M = 1 the CLS row attends to all keys whatever else was
      # selected, so the selection then only matters through `mean` (CLS + the R local outputs).
      glca_feature = g[:, 0] if self.glca_pool == 'cls' else g.mean(axis=1)
      out.update(glca_feature=glca_feature, glca_index=index,
                 glca_logits=nn.Dense(self.num_classes, dtype=jnp.float32,
                                      kernel_init=vit.dense_init, name='glca_head')(glca_feature))
    if run_pwca:
      out['pwca_logits'] = head(norm(x_pw[:, 0]))
    return out


def predict_probs(outputs):
  """FGVC prediction: softmax(SA) + softmax(GLCA) (SA alone when GLCA is off)."""
  p = jax.nn.softmax(outputs['sa_logits'].astype(jnp.float32), axis=-1)
  if 'glca_logits' in outputs:
    p = p + jax.nn.softmax(outputs['glca_logits'].astype(jnp.float32), axis=-1)
  return p


def reid_feature(outputs):
  """Re-ID embedding: concat(SA CLS, GLCA CLS)."""
  parts = [outputs['sa_feature']] + ([outputs['glca_feature']] if 'glca_feature' in outputs else [])
  return jnp.concatenate(parts, axis=-1)


def build_model(config, *, dtype=jnp.float32) -> DCAL:
  """DCAL from a config_lib config."""
  vcfg = vit.get_variant(config.backbone, config_lib.backbone_overrides(config))
  vcfg.grid_size(config.input_size)  # input_size must be a multiple of the backbone stride
  if config.num_sa_layers != vcfg.depth:
    raise ValueError(f'num_sa_layers={config.num_sa_layers} but backbone {config.backbone} has '
                     f'{vcfg.depth} blocks; set backbone_overrides.depth to change L')
  remat = None
  if config.use_gradient_checkpointing:
    remat = config.remat_policy
  return DCAL(config=vcfg, num_classes=config.num_classes,
              num_glca_layers=config.num_glca_layers, num_pwca_layers=config.num_pwca_layers,
              top_k_ratio=config.top_k_ratio, glca_input=config.glca_input,
              glca_pool=config.glca_pool,
              stochastic_depth_prob=config.stochastic_depth_prob, dtype=dtype,
              remat_policy=remat, attention_impl=config.attention_impl)
