"""DCAL's multi-task loss: uncertainty-weighted cross-entropies of the SA, GLCA and PWCA heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dca_jax.models.dcal import BRANCHES


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy in float32 (no label smoothing, as in the paper)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1).mean()


def dcal_loss(outputs, labels, weighting: str = 'uncertainty'):
  """L = 0.5 · Σ_b (exp(-w_b)·CE_b + w_b) over the branches present (or Σ_b CE_b for 'sum').

  PWCA's target is the first image's label (the partner is noise). Returns (total, metrics)
  with each CE_b and each w_b, since the total itself can go negative.
  """
  weights = outputs['loss_weights'].astype(jnp.float32)
  total, metrics = 0.0, {}
  for i, branch in enumerate(BRANCHES):
    logits = outputs.get(f'{branch}_logits')
    if logits is None:
      continue
    ce = cross_entropy(logits, labels)
    metrics[f'ce_{branch}'] = ce
    metrics[f'w_{branch}'] = weights[i]
    if weighting == 'uncertainty':
      total = total + 0.5 * (jnp.exp(-weights[i]) * ce + weights[i])
    elif weighting == 'sum':
      total = total + ce
    else:
      raise ValueError(f'unknown loss weighting {weighting!r}')
  metrics['loss'] = total
  return total, metrics
