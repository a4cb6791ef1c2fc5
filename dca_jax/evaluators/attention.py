"""Attention pictures of a few fixed eval images, for TensorBoard at each evaluation."""

from __future__ import annotations

import jax
import numpy as np

from dca_jax import distributed
from dca_jax import drawing
from dca_jax import inference


class Evaluator:
  """The first `num_images` images of process 0's first eval batch of `split` (default: the
  task's first eval split), drawn with `drawing.attention_picture` under the current params, so
  TensorBoard shows the rollout sharpening on the same images over training. Run it on EVERY
  process (the forward is one sharded program); it yields ('test_NNNNN', uint8 [S, 2S, 3]) on
  process 0 and nothing elsewhere."""

  in_eval_mode = False  # pictures, not numbers: the visualize mode draws for a checkpoint
  METRICS = ()

  def __init__(self, context, num_images: int = 4, split=None):
    self.context, self.num_images, self.split = context, int(num_images), split
    self._batch = None
    forward = inference.forward_fn(context.model, context.config, context.dtype,
                                   ('rollout', 'glca_index'))

    def step(variables, batch):
      return {**forward(variables, batch['image']), 'index': batch['index']}

    self._forward = context.jit(step)

  def _first_batch(self):
    """This host's first eval batch (read once; the split is fixed) and process 0's picks."""
    split = {} if self.split is None else {'split': self.split}
    batch = next(iter(self.context.input.eval_iter(with_index=True, **split)))
    keep = np.flatnonzero(batch['mask'])[:self.num_images]
    # Matched by index after the forward, whatever row order the global batch has.
    self._displays = {int(batch['index'][i]): batch['image'][i] for i in keep}
    self._batch = {'image': batch['image'],
                   'index': np.where(batch['mask'], batch['index'], -1).astype(np.int32)}

  def run(self, variables):
    if self.num_images <= 0:
      return
    if self._batch is None:
      self._first_batch()
    out = jax.device_get(self._forward(
        variables, distributed.global_batch(self._batch, self.context.batch_sharding)))
    if jax.process_index() != 0:
      return
    row = {int(i): r for r, i in enumerate(out['index']) if int(i) >= 0}
    for index, display in self._displays.items():
      r = row[index]
      glca = out['glca_index'][r] if 'glca_index' in out else None
      yield f'test_{index:05d}', drawing.attention_picture(display, out['rollout'][r], glca)
