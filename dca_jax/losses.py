"""DCAL's multi-task loss: uncertainty-weighted per-branch losses of the SA, GLCA and PWCA heads.

FGVC: each branch's loss is its cross-entropy. Re-ID adds, per branch, a batch-hard triplet
loss on that branch's feature (the P x K sampler guarantees positives in every micro-batch).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dca_jax.models.dcal import BRANCHES


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy in float32; targets (1 - ε)·onehot + ε/C (paper: ε = 0)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  return nll.mean()


def pairwise_euclidean(features):
  """[B, D] -> [B, B] Euclidean distances (the squared distance clamped at 1e-12 before the
  square root, so the zero self-distance has a zero, not an infinite, gradient)."""
  f = features.astype(jnp.float32)
  sq = jnp.sum(f * f, axis=-1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * f @ f.T
  return jnp.sqrt(jnp.maximum(d2, 1e-12))


TRIPLET_FEATURES = ('raw', 'batch_standardized')


def batch_standardize(features, eps: float = 1e-5):
  """[B, D] -> each dimension centred and scaled to unit variance over the batch, then / sqrt(D)
  (so a feature's norm is ~1): distances that shrinking or shifting all features cannot change."""
  f = features.astype(jnp.float32)
  f = f - jnp.mean(f, axis=0, keepdims=True)
  f = f * jax.lax.rsqrt(jnp.mean(f * f, axis=0, keepdims=True) + eps)
  return f / jnp.sqrt(jnp.asarray(f.shape[-1], jnp.float32))


def batch_hard_triplet(features, labels, margin: float = 0.0, feature: str = 'raw'):
  """Batch-hard triplet loss (Hermans et al. 2017): for each anchor its farthest positive and
  nearest negative. margin 0: soft margin log(1 + exp(d_ap - d_an)); > 0: max(0, d_ap - d_an + m).

  feature 'raw' (TransReID): distances of the features as they are. 'batch_standardized':
  of `batch_standardize(features)`. From scratch the raw form has a degenerate minimum: when
  the nearest negative starts closer than the farthest positive (camera beats identity), the
  loss falls fastest by shrinking every distance, and the features collapse onto one point
  in a few dozen steps (d_ap = d_an = 0, loss ln 2; docs/REID.md). Standardised distances
  cannot shrink, so only separating identities lowers the loss.

  Returns (loss, fraction of anchors whose nearest negative is farther than the farthest
  positive). An anchor with no negative in the batch contributes nothing.
  """
  if feature == 'batch_standardized':
    features = batch_standardize(features)
  elif feature != 'raw':
    raise ValueError(f'unknown triplet feature {feature!r} (one of {TRIPLET_FEATURES})')
  dist = pairwise_euclidean(features)
  same = labels[:, None] == labels[None, :]
  d_ap = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)   # self is a positive at distance ~0
  d_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  has_neg = jnp.isfinite(d_an)
  gap = jnp.where(has_neg, d_ap - d_an, 0.0)
  per_anchor = jax.nn.softplus(gap) if margin <= 0 else jax.nn.relu(gap + margin)
  count = jnp.maximum(jnp.sum(has_neg), 1)
  loss = jnp.sum(jnp.where(has_neg, per_anchor, 0.0)) / count
  accuracy = jnp.sum(jnp.where(has_neg, gap < 0, False)) / count
  return loss, accuracy


def dcal_loss(outputs, labels, weighting: str = 'uncertainty', *, label_smoothing: float = 0.0,
              triplet_margin: Optional[float] = None, triplet_feature: str = 'raw'):
  """L = 0.5 · Σ_b (exp(-w_b)·L_b + w_b) over the branches present (or Σ_b L_b for 'sum').

  L_b = CE_b, plus the batch-hard triplet loss on the branch's feature when `triplet_margin`
  is given (Re-ID), on `triplet_feature` distances (see `batch_hard_triplet`). PWCA's target
  is the first image's label (the partner is noise). Returns
  (total, metrics) with each CE_b, triplet_b and w_b, since the total itself can go negative.
  """
  weights = outputs['loss_weights'].astype(jnp.float32)
  total, metrics = 0.0, {}
  for i, branch in enumerate(BRANCHES):
    logits = outputs.get(f'{branch}_logits')
    if logits is None:
      continue
    loss = metrics[f'ce_{branch}'] = cross_entropy(logits, labels, label_smoothing)
    if triplet_margin is not None:
      triplet, triplet_acc = batch_hard_triplet(outputs[f'{branch}_feature'], labels,
                                                triplet_margin, triplet_feature)
      metrics[f'triplet_{branch}'] = triplet
      metrics[f'triplet_acc_{branch}'] = triplet_acc
      loss = loss + triplet
    metrics[f'w_{branch}'] = weights[i]
    if weighting == 'uncertainty':
      total = total + 0.5 * (jnp.exp(-weights[i]) * loss + weights[i])
    elif weighting == 'sum':
      total = total + loss
    else:
      raise ValueError(f'unknown loss weighting {weighting!r}')
  metrics['loss'] = total
  return total, metrics
