"""FGVC top-1 of SA+GLCA (the paper's prediction), of SA and of GLCA, over a whole split; with
`flip=True`, of the probabilities averaged over each image and its mirror (test-time
augmentation: `config.test_flip` adds such an entry beside the single-crop one)."""

from __future__ import annotations

import jax.numpy as jnp

from dca_jax import inference


class Evaluator:
  """Yields accuracy (SA+GLCA), accuracy_sa, accuracy_glca (with GLCA) and num_images.

  split: 'test', or 'val' (the held-out part of train, `config.val_split`). Padded images
  count nowhere; each real image once.
  flip: score the mean of the probabilities of each image and its horizontal mirror (SA+GLCA,
  SA and GLCA each averaged; the mirror has its own rollout and GLCA selection)."""

  in_eval_mode = True
  METRICS = ('accuracy', 'accuracy_sa', 'accuracy_glca')

  def __init__(self, context, split: str = 'test', flip: bool = False):
    self.context, self.split = context, split
    if not isinstance(flip, bool):
      raise ValueError(f'flip={flip!r} must be True or False')
    # argmax(logits) = argmax(softmax): the single crop compares logits, the mirrored average
    # needs probabilities
    outputs = ('probs', 'sa_probs', 'glca_probs') if flip else ('probs', 'sa_logits',
                                                                'glca_logits')
    forward = inference.forward_fn(context.model, context.config, context.dtype, outputs)

    def predict(variables, images):
      out = forward(variables, images)
      if flip:  # images [B, H, W, 3]: W is axis 2
        mirrored = forward(variables, images[:, :, ::-1, :])
        out = {name: 0.5 * (value + mirrored[name]) for name, value in out.items()}
      return {'probs': out['probs'], 'sa': out[outputs[1]], 'glca': out.get(outputs[2])}

    def step(variables, batch):
      out = predict(variables, batch['image'])
      mask = batch['mask'].astype(jnp.float32)
      hits = lambda x: jnp.sum((jnp.argmax(x, -1) == batch['label']) * mask)
      sums = {'correct': hits(out['probs']), 'correct_sa': hits(out['sa']),
              'count': jnp.sum(mask)}
      if out['glca'] is not None:
        sums['correct_glca'] = hits(out['glca'])
      return sums

    self._step = context.jit(step)

  def run(self, variables):
    totals = self.context.summed(self._step, variables, split=self.split)
    count = float(totals['count'])
    yield 'accuracy', float(totals['correct'] / count)
    yield 'accuracy_sa', float(totals['correct_sa'] / count)
    if 'correct_glca' in totals:
      yield 'accuracy_glca', float(totals['correct_glca'] / count)
    yield 'num_images', int(count)
