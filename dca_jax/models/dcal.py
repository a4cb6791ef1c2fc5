"""DCAL: self-attention (SA) + global-local (GLCA) + pair-wise (PWCA) cross-attention.

The three branches (docs/METHOD.md):
- SA: the L backbone blocks; CLS -> final LN -> `head`.
- GLCA: one block with its own weights (`glca_block`); queries only for CLS + R selected
  patches (by default the top R of the attention rollout over the SA blocks before GLCA),
  keys/values of all N+1 tokens; -> `glca_norm` -> pooling (`glca_pool`) -> `glca_head`.
- PWCA: the last T backbone blocks run a second stream with the SAME weights, whose keys/values
  are [K1; K2], [V1; V2], with K2/V2 the partner's SA keys/values at the same block (no extra
  pass over the partner). Training only; its CLS -> `norm` -> `head`.

Only what reaches an output is computed. An attention row depends only on its own query, so
with `glca_pool='cls'` GLCA's logits do not depend on which patches are selected: the rollout,
the selection and the local query rows are then skipped (GLCA runs its CLS query alone) unless
`with_selection=True` asks for them (the visualize mode draws them).

The rollout's CLS row is a chain of vector-matrix products from the last map backwards,
e0^T·S̄_K·…·S̄_1 (O(K·N²)); the K head-mean maps are kept until the selection is made.
`rollout_impl='running_product'` carries one [B, N+1, N+1] product instead (O(K·N³), one map).
Re-ID (`bnneck=True`): each classifier reads its feature through a bias-free BatchNorm neck.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dca_jax.models import vit

Dtype = Any
BRANCHES = ('sa', 'glca', 'pwca')


# --- attention rollout -----------------------------------------------------------------------
def rollout_matrix(head_mean):
  """S̄ = 0.5·S + 0.5·I, rows re-normalised. head_mean: [B, N+1, N+1] float32."""
  n = head_mean.shape[-1]
  s = 0.5 * head_mean + 0.5 * jnp.eye(n, dtype=head_mean.dtype)
  return s / s.sum(axis=-1, keepdims=True)


def rollout_cls_row(maps, impl: str = 'vector'):
  """CLS row of Ŝ_K = S̄_K·…·S̄_1 for the head-mean maps [S_1, …, S_K] (K >= 1).

  'vector': e0^T·S̄_K is S̄_K's CLS row; multiplying it into S̄_{K-1}, …, S̄_1 is K-1
  vector-matrix products. 'running_product': Ŝ_i = S̄_i·Ŝ_{i-1} as the maps arrive (the
  last step a vector-matrix product), for when K maps do not fit in memory.
  The traced program is the same wherever the caller builds it, so this runs after the blocks.
  """
  if impl == 'vector':
    row = rollout_matrix(maps[-1])[:, 0]
    for head_mean in reversed(maps[:-1]):
      row = jnp.einsum('bj,bjk->bk', row, rollout_matrix(head_mean))
    return row
  product = None  # Ŝ_{K-1}
  for head_mean in maps[:-1]:
    s_bar = rollout_matrix(head_mean)
    product = s_bar if product is None else jnp.einsum('bij,bjk->bik', s_bar, product)
  row = rollout_matrix(maps[-1])[:, 0]
  return row if product is None else jnp.einsum('bj,bjk->bk', row, product)


# Selections ranked by the rollout: the paper's top R, and its inverse (the R lowest, a control
# of whether the ranking carries information: it should do worse than random if it does).
ROLLOUT_SELECTIONS = ('rollout', 'rollout_lowest')


def num_selected(num_patches: int, top_k_ratio: float) -> int:
  """R = round(ratio · N), at least 1 (78 of 784 at 448 px, ratio 0.1)."""
  return max(1, min(num_patches, int(round(top_k_ratio * num_patches))))


def select_tokens(cls_row, top_k_ratio: float, num_prefix_tokens: int = 1):
  """Token indices [B, 1 + R]: CLS (0) then the R patches of highest score.

  `cls_row` scores all tokens [CLS, registers..., patches]; only the patches (after the
  `num_prefix_tokens` = 1 + registers) are selectable: CLS is always a query, and registers
  are not image regions (docs/MODEL.md, "Register tokens")."""
  patches = cls_row[:, num_prefix_tokens:]
  r = num_selected(patches.shape[-1], top_k_ratio)
  _, idx = jax.lax.top_k(patches, r)
  cls = jnp.zeros((patches.shape[0], 1), idx.dtype)
  return jnp.concatenate([cls, idx + num_prefix_tokens], axis=1)


def patch_frame(row_or_index, num_registers: int, *, index: bool):
  """Drops the register tokens from what DCAL outputs: a rollout row over all tokens [B, 1+G+N]
  -> [B, 1+N] (CLS, patches; the registers' columns removed, not renormalised), or token
  indices (CLS 0, patches G+1..G+N) -> the same frame (patches 1..N), what the visualizer and
  the attention evaluator draw on the patch grid. Identity without registers."""
  if not num_registers:
    return row_or_index
  if index:
    return jnp.where(row_or_index > 0, row_or_index - num_registers, row_or_index)
  return jnp.concatenate([row_or_index[:, :1], row_or_index[:, 1 + num_registers:]], axis=1)


def derangement(rng, batch_size: int):
  """A random pairing with no self-pairs: a random cycle through a random permutation.

  partner[order[j]] = order[(j + 1) % B], so each image gets another image of the batch.
  """
  if batch_size < 2:
    raise ValueError('PWCA needs at least 2 images per physical batch to pair them')
  order = jax.random.permutation(rng, batch_size)
  partner = jnp.zeros((batch_size,), jnp.int32)
  return partner.at[order].set(jnp.roll(order, -1).astype(jnp.int32))


def derangement_per_group(rng, batch_size: int, groups: int):
  """Partners drawn within each of `groups` contiguous groups of the batch (one per device):
  [groups, batch_size // groups] indices within the group, or, for one group, `derangement`'s
  [batch_size] (the same draw)."""
  if groups == 1:
    return derangement(rng, batch_size)
  if batch_size % groups or batch_size // groups < 2:
    raise ValueError(f'PWCA partners per device need at least 2 images per device: batch '
                     f'{batch_size} over {groups} devices (or set pwca_partners=global)')
  keys = jax.random.split(rng, groups)
  return jax.vmap(lambda key: derangement(key, batch_size // groups))(keys)


def other_label_partners(rng, labels, groups: int):
  """Like `derangement_per_group`, but each image's partner has another label (Re-ID: a P x K
  batch holds each identity's K images side by side, so a plain derangement within a device's
  share pairs an image with its own identity often — 3 in 7 at 8 images per device — and PWCA's
  distractor would be a positive). Uniform over the group's images of other labels; an image
  whose group holds only its own label gets its derangement partner."""
  size = labels.shape[0] // groups
  if size < 2:
    raise ValueError('PWCA needs at least 2 images per group to pair them')
  grouped = labels.reshape(groups, size)

  def one(key, group_labels):
    score_key, fallback_key = jax.random.split(key)
    other = group_labels[:, None] != group_labels[None, :]
    scores = jnp.where(other, jax.random.uniform(score_key, (size, size)), -1.0)
    fallback = derangement(fallback_key, size)
    return jnp.where(other.any(axis=1), jnp.argmax(scores, axis=1).astype(jnp.int32), fallback)

  partners = jax.vmap(one)(jax.random.split(rng, groups), grouped)
  return partners[0] if groups == 1 else partners


# --- classifier heads --------------------------------------------------------------------------
class BNNeck(nn.Module):
  """BatchNorm1d with a frozen zero bias (the Re-ID "BNNeck"): batch statistics in training,
  running averages (PyTorch's momentum 0.1, unbiased running variance) at inference.

  `update_stats=False` normalises with the batch statistics without touching the running ones
  (PWCA shares SA's neck, but its distractor-mixed features must not shift SA's statistics).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, *, train: bool, update_stats: bool = True):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    mean_var = self.variable('batch_stats', 'mean', jnp.zeros, (features,))
    var_var = self.variable('batch_stats', 'var', jnp.ones, (features,))
    x = x.astype(jnp.float32)
    if train:
      mean, var = x.mean(axis=0), x.var(axis=0)
      if update_stats and not self.is_initializing():
        n = x.shape[0]
        unbiased = var * n / max(n - 1, 1)
        mean_var.value = (1 - self.momentum) * mean_var.value + self.momentum * mean
        var_var.value = (1 - self.momentum) * var_var.value + self.momentum * unbiased
    else:
      mean, var = mean_var.value, var_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale


class Classifier(nn.Module):
  """feature -> [BN neck ->] linear classifier. Returns (logits, the feature the logits read).

  The kernel/bias live directly under the classifier's name (`head/kernel`, as in timm), and
  with the neck the classifier has no bias (it would duplicate the neck's frozen one)."""
  num_classes: int
  bnneck: bool = False
  # std of the kernel's normal init: 0.02 timm (its trunc_normal_ bounds are +-2 absolute, 100
  # std: a plain normal), 0.001 TransReID (normal_). Flax's truncated_normal would cut at 2 std.
  init_std: float = 0.02

  @nn.compact
  def __call__(self, feature, *, train: bool, update_stats: bool = True):
    if self.bnneck:
      feature = BNNeck(name='bnneck')(feature, train=train, update_stats=update_stats)
    feature = feature.astype(jnp.float32)
    kernel = self.param('kernel', nn.initializers.normal(self.init_std),
                        (feature.shape[-1], self.num_classes))
    logits = feature @ kernel
    if not self.bnneck:
      logits = logits + self.param('bias', nn.initializers.zeros, (self.num_classes,))
    return logits, feature


# --- the model ---------------------------------------------------------------------------------
class DCAL(nn.Module):
  """DCAL over a ViT backbone. Call with `partner` (from `derangement`) to run PWCA."""
  config: vit.ViTConfig
  num_classes: int
  num_glca_layers: int = 1
  num_pwca_layers: int = 12
  top_k_ratio: float = 0.1
  glca_input: str = 'parallel'         # parallel: input of SA block L | on_top: its output
  glca_pool: str = 'cls'               # what the GLCA classifier reads: cls | mean | local
  # GLCA's local queries: rollout | random | last_layer | rollout_lowest
  glca_select: str = 'rollout'
  rollout_layers: str = 'before_glca'  # SA blocks the rollout covers: before_glca | all
  rollout_impl: str = 'vector'         # vector | running_product
  loss_weights_init: float = 0.0
  bnneck: bool = False                 # Re-ID: BatchNorm neck before each classifier
  stochastic_depth_prob: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: Optional[str] = None   # None: no remat; 'full' or a jax.checkpoint_policies name
  attention_impl: str = 'xla'
  pwca_partner_stop_gradient: bool = False  # PWCA's partner keys/values carry no gradient
  classifier_init_std: float = 0.02    # std of `head` and `glca_head` kernels at init

  def _check(self):
    depth = self.config.depth
    if self.num_glca_layers not in (0, 1):
      raise ValueError(f'num_glca_layers={self.num_glca_layers}: DCAL uses M = 1 (or 0 to disable)')
    if not 0 <= self.num_pwca_layers <= depth:
      raise ValueError(f'num_pwca_layers={self.num_pwca_layers} must be in [0, {depth}]')

  def rollout_blocks(self) -> range:
    """The SA blocks whose attention the rollout accumulates (0-based).

    GLCA parallel to block L sees the input of block L, so 'before_glca' stops at block L-1
    (the paper's Fig. 1(a)); on top of block L it covers all L."""
    depth = self.config.depth
    if self.rollout_layers == 'before_glca' and self.glca_input == 'parallel':
      return range(depth - 1)
    return range(depth)

  def selection_reaches_outputs(self) -> bool:
    """Whether GLCA's token selection can change any output (logits, features, losses)."""
    return self.num_glca_layers > 0 and self.glca_pool != 'cls'

  def attention_blocks(self, select: bool, draw: bool) -> set:
    """The SA blocks whose head-mean attention is needed: those the selection ranks by (all the
    rollout's, or only its last for 'last_layer'), all the rollout's when drawing, else none."""
    blocks = self.rollout_blocks()
    if draw or (select and self.glca_select in ROLLOUT_SELECTIONS):
      return set(blocks)
    if select and self.glca_select == 'last_layer':
      return set(blocks[-1:])
    return set()

  @nn.compact
  def __call__(self, images, *, train: bool = False, partner=None, with_selection: bool = False):
    """Returns a dict of logits/features. PWCA runs only when `partner` is given.

    with_selection: also compute the rollout ('rollout', [B, N+1]) and GLCA's token indices
    ('glca_index', [B, 1+R]) when they would otherwise be skipped as dead compute. Both are
    in the frame [CLS, patches]: a backbone's register tokens are dropped (`patch_frame`).
    """
    self._check()
    depth = self.config.depth
    rates = vit.drop_path_rates(self.stochastic_depth_prob, depth)
    block_args = dict(dtype=self.dtype, remat_policy=self.remat_policy)
    blocks = [vit.make_block(self.config, drop_path=rate, attention_impl=self.attention_impl,
                             name=f'block_{i}', dcal_step=True,
                             partner_stop_gradient=self.pwca_partner_stop_gradient, **block_args)
              for i, rate in enumerate(rates)]
    # Uncertainty loss weights w_sa, w_glca, w_pwca (Kendall et al.).
    loss_weights = self.param('loss_weights', nn.initializers.constant(self.loss_weights_init),
                              (len(BRANCHES),))
    norm = nn.LayerNorm(epsilon=self.config.norm_eps, dtype=jnp.float32, name='norm')
    head = Classifier(self.num_classes, self.bnneck, self.classifier_init_std, name='head')
    select = self.num_glca_layers > 0 and (self.selection_reaches_outputs() or with_selection)

    x = vit.Embedding(self.config, dtype=self.dtype, name='embed')(images)
    x, x_pw, glca_in, maps = self._backbone(blocks, x, partner, not train,
                                            self.attention_blocks(select, with_selection))
    sa_feature = norm(x[:, 0])  # LN is per token: normalise only the CLS the head reads
    sa_logits, sa_neck = head(sa_feature, train=train)
    out = {'sa_logits': sa_logits, 'sa_feature': sa_feature, 'loss_weights': loss_weights}
    if self.bnneck:
      out['sa_bn_feature'] = sa_neck
    registers = self.config.num_registers
    rollout = None  # the CLS row over all tokens, registers included (they carry attention)
    if with_selection or (select and self.glca_select in ROLLOUT_SELECTIONS):
      rollout = self._rollout(maps, x.shape[0], x.shape[1])
      out['rollout'] = patch_frame(rollout, registers, index=False)
    if self.num_glca_layers:
      glca_block = vit.make_block(self.config, drop_path=rates[-1], name='glca_block',
                                  attention_impl=self.attention_impl, **block_args)
      glca_norm = nn.LayerNorm(epsilon=self.config.norm_eps, dtype=jnp.float32,
                               name='glca_norm')
      glca_head = Classifier(self.num_classes, self.bnneck, self.classifier_init_std,
                             name='glca_head')
      index = None  # token indices GLCA queries: CLS + the selected patches
      if select:
        index = self._select(rollout, maps, x.shape[0], x.shape[1])
        out['glca_index'] = patch_frame(index, registers, index=True)
      out.update(self._glca(glca_block, glca_norm, glca_head,
                            x if self.glca_input == 'on_top' else glca_in, index, train))
    if x_pw is not None:
      pwca_feature = norm(x_pw[:, 0])
      out['pwca_logits'], _ = head(pwca_feature, train=train, update_stats=False)
      out['pwca_feature'] = pwca_feature
    return out

  def _backbone(self, blocks, x, partner, deterministic: bool, attention_blocks: set):
    """The L SA blocks, the PWCA stream through the last T of them when `partner` is given.

    Returns (SA output, PWCA output or None, the input of block L (GLCA's parallel input),
    the head-mean attention maps of `attention_blocks` in order)."""
    run_pwca = partner is not None and self.num_pwca_layers > 0
    pwca_start = len(blocks) - self.num_pwca_layers
    x_pw, glca_in, maps = None, None, []
    for i, block in enumerate(blocks):
      if run_pwca and i == pwca_start:
        x_pw = x  # the PWCA stream starts from the SA hidden state entering block L-T+1
      if i == len(blocks) - 1:
        glca_in = x  # GLCA sits parallel to the last SA block
      # head_mean carries no gradient (vit.attention): none flows through the rollout
      x, x_pw, head_mean = block.sa_and_pwca(x, x_pw, partner, deterministic,
                                               i in attention_blocks)
      if i in attention_blocks:
        maps.append(head_mean)
    return x, x_pw, glca_in, maps

  def _glca(self, block, norm, head, glca_in, index, train: bool) -> dict:
    """GLCA's block on CLS + the selected patches (or CLS alone when only its output is read:
    an attention row depends only on its own query), its LN, pooling and classifier."""
    if not self.selection_reaches_outputs():
      index = jnp.zeros((glca_in.shape[0], 1), jnp.int32)
    tokens, _, _ = block(glca_in, not train, False, index)
    tokens = norm(tokens)  # [B, 1 + R] or [B, 1] tokens
    feature = {'cls': lambda: tokens[:, 0], 'mean': lambda: tokens.mean(axis=1),
               'local': lambda: tokens[:, 1:].mean(axis=1)}[self.glca_pool]()
    logits, neck = head(feature, train=train)
    out = {'glca_feature': feature, 'glca_logits': logits}
    if self.bnneck:
      out['glca_bn_feature'] = neck
    return out

  def _rollout(self, maps, batch: int, num_tokens: int):
    if not maps:  # no SA block before GLCA (L = 1): Ŝ = I, whose CLS row is e0
      return jax.nn.one_hot(jnp.zeros((batch,), jnp.int32), num_tokens)
    return rollout_cls_row(maps, self.rollout_impl)

  def _select(self, rollout_row, maps, batch: int, num_tokens: int):
    """GLCA's query tokens [B, 1 + R] by `glca_select`."""
    if self.glca_select == 'rollout':
      scores = rollout_row
    elif self.glca_select == 'rollout_lowest':  # the control: the R patches ranked last
      scores = -rollout_row
    elif self.glca_select == 'last_layer':
      if not maps:  # no SA block before GLCA: nothing to rank by
        raise ValueError("glca_select='last_layer' needs at least one SA block before GLCA")
      scores = rollout_matrix(maps[-1])[:, 0]
    else:  # 'random': uniform scores -> a uniformly random R-subset per image
      rng = self.make_rng('selection') if self.has_rng('selection') else jax.random.key(0)
      scores = jax.random.uniform(rng, (batch, num_tokens))
    return select_tokens(jax.lax.stop_gradient(scores), self.top_k_ratio,
                         self.config.num_prefix_tokens)


def predict_probs(outputs):
  """FGVC prediction: softmax(SA) + softmax(GLCA) (SA alone when GLCA is off)."""
  probs = jax.nn.softmax(outputs['sa_logits'].astype(jnp.float32), axis=-1)
  if 'glca_logits' in outputs:
    probs = probs + jax.nn.softmax(outputs['glca_logits'].astype(jnp.float32), axis=-1)
  return probs


def reid_feature(outputs, after_bn: bool = False):
  """Re-ID embedding: concat(SA feature, GLCA feature), before or after their BN necks."""
  suffix = '_bn_feature' if after_bn else '_feature'
  parts = [outputs['sa' + suffix]]
  if 'glca' + suffix in outputs:
    parts.append(outputs['glca' + suffix])
  return jnp.concatenate(parts, axis=-1)


def glca_from_last_block(params, depth: int):
  """A copy of `params` whose GLCA block starts as the last SA block (pretrained start)."""
  params = dict(params)
  params['glca_block'] = jax.tree.map(lambda x: x.copy(), params[f'block_{depth - 1}'])
  return params
