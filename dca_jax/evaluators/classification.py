"""FGVC top-1 of SA+GLCA (the paper's prediction), of SA and of GLCA, over a whole split."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dca_jax import inference


class Evaluator:
  """Yields accuracy (SA+GLCA), accuracy_sa, accuracy_glca (with GLCA) and num_images.

  split: 'test', or 'val' (the held-out part of train, `config.val_split`). Padded images
  count nowhere; each real image once."""

  in_eval_mode = True
  METRICS = ('accuracy', 'accuracy_sa', 'accuracy_glca')

  def __init__(self, context, split: str = 'test'):
    self.context, self.split = context, split
    forward = inference.forward_fn(context.model, context.config, context.dtype,
                                   ('probs', 'sa_logits', 'glca_logits'))

    def step(variables, batch):
      out = forward(variables, batch['image'])
      mask = batch['mask'].astype(jnp.float32)
      hits = lambda x: jnp.sum((jnp.argmax(x, -1) == batch['label']) * mask)
      sums = {'correct': hits(out['probs']), 'correct_sa': hits(out['sa_logits']),
              'count': jnp.sum(mask)}
      if 'glca_logits' in out:
        sums['correct_glca'] = hits(out['glca_logits'])
      return sums

    self._step = context.jit(step)

  def run(self, variables):
    totals = None
    for batch in self.context.batches(split=self.split):
      sums = self._step(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    yield 'accuracy', float(totals['correct'] / count)
    yield 'accuracy_sa', float(totals['correct_sa'] / count)
    if 'correct_glca' in totals:
      yield 'accuracy_glca', float(totals['correct_glca'] / count)
    yield 'num_images', int(count)
