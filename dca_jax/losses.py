"""DCAL's multi-task loss: uncertainty-weighted per-branch losses of the SA, GLCA and PWCA heads.

FGVC: each branch's loss is its cross-entropy. Re-ID adds, per branch, a batch-hard triplet
loss on that branch's feature (the P x K sampler guarantees positives in every micro-batch).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dca_jax.errors import ConfigError
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


# ---------------------------------------------------------------------------- loss terms
# A branch's loss L_b is the sum of the run's terms (`config.loss_terms`, or its task's). A term
# is (outputs, branch, labels, options) -> (loss, metrics); a new one is a function registered
# with `@term(name)` (here, or from any module: a task's own), then named in
# `--config.loss_terms` or its task's LOSS_TERMS.
TERMS: dict[str, Callable] = {}


def term(name: str):
  """Registers the decorated function as loss term `name` (a name is taken once)."""
  def register(fn):
    if name in TERMS:
      raise ConfigError(f'loss term {name!r} exists already: one of {sorted(TERMS)}')
    TERMS[name] = fn
    return fn
  return register


@term('ce')
def _cross_entropy_term(outputs, branch, labels, options):
  loss = cross_entropy(outputs[f'{branch}_logits'], labels, options.get('label_smoothing', 0.0))
  return loss, {f'ce_{branch}': loss}


@term('triplet')
def _triplet_term(outputs, branch, labels, options):
  """Batch-hard triplet on the branch's feature (the P x K sampler guarantees positives)."""
  loss, accuracy = batch_hard_triplet(outputs[f'{branch}_feature'], labels,
                                      options.get('triplet_margin') or 0.0,
                                      options.get('triplet_feature', 'raw'))
  return loss, {f'triplet_{branch}': loss, f'triplet_acc_{branch}': accuracy}


def parse_terms(value) -> tuple[str, ...]:
  """'ce,triplet' (or a sequence) -> ('ce', 'triplet'); ValueError for an unknown term."""
  names = tuple(n.strip() for n in (value.split(',') if isinstance(value, str) else value)
                if n.strip())
  unknown = [n for n in names if n not in TERMS]
  if unknown or not names:
    raise ValueError(f'loss terms {list(names)}: each one of {sorted(TERMS)} (losses.TERMS)')
  return names


def check(config) -> None:
  """`config.loss_terms` names known terms (the one validator asks: dca_jax/checks.py)."""
  if not config.loss_terms:
    return
  try:
    parse_terms(config.loss_terms)
  except ValueError as e:
    raise ConfigError(f'config.loss_terms={config.loss_terms!r}: {e}') from None


def dcal_loss(outputs, labels, weighting: str = 'uncertainty', *, terms=None,
              label_smoothing: float = 0.0, triplet_margin: Optional[float] = None,
              triplet_feature: str = 'raw', **options):
  """L = 0.5 · Σ_b (exp(-w_b)·L_b + w_b) over the branches present (or Σ_b L_b for 'sum').

  L_b = the sum of `terms` on branch b (default: the CE, plus the batch-hard triplet on the
  branch's feature when `triplet_margin` is given, Re-ID), the triplet on `triplet_feature`
  distances (see `batch_hard_triplet`). PWCA's target is the first image's label (the partner is
  noise). Returns (total, metrics) with each term per branch and w_b, since the total itself can
  go negative.
  """
  if terms is None:
    terms = ('ce',) if triplet_margin is None else ('ce', 'triplet')
  terms = parse_terms(terms)
  options.update(label_smoothing=label_smoothing, triplet_margin=triplet_margin,
                 triplet_feature=triplet_feature)
  weights = outputs['loss_weights'].astype(jnp.float32)
  total, metrics = 0.0, {}
  for i, branch in enumerate(BRANCHES):
    if outputs.get(f'{branch}_logits') is None:
      continue
    loss = 0.0
    for name in terms:
      value, term_metrics = TERMS[name](outputs, branch, labels, options)
      loss = loss + value
      metrics.update(term_metrics)
    metrics[f'w_{branch}'] = weights[i]
    if weighting == 'uncertainty':
      total = total + 0.5 * (jnp.exp(-weights[i]) * loss + weights[i])
    elif weighting == 'sum':
      total = total + loss
    else:
      raise ValueError(f'unknown loss weighting {weighting!r}')
  metrics['loss'] = total
  return total, metrics
