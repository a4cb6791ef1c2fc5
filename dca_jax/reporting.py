"""What the user sees: the start banner, metric writers (JSON lines, TensorBoard, wandb) and the
attention pictures TensorBoard shows at each evaluation."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np


def banner(config, *, precision: str, num_params: int, steps_per_epoch: int) -> str:
  """The start banner, in the words of the PyTorch memory guide users know."""
  check = lambda on: '✓' if on else '✗'
  half = precision in ('bf16', 'fp16')
  prec_name = {'fp16': 'FP16, dynamic loss scaling', 'bf16': 'BF16', 'fp32': 'FP32'}[precision]
  remat = config.use_gradient_checkpointing
  lines = [
      f'{check(half)} Mixed precision training {"enabled" if half else "disabled"} ({prec_name})',
      f'{check(remat)} Gradient checkpointing {"enabled (trades compute for memory)" if remat else "disabled"}'
      + (f', policy {config.remat_policy}' if remat else ''),
      f'Model initialized with {num_params / 1e6:.2f}M parameters ({config.backbone}, '
      f'DCAL L={config.num_sa_layers} M={config.num_glca_layers} T={config.num_pwca_layers}, '
      f'R={config.top_k_ratio:g})',
      f'Physical batch size: {config.batch_size}',
      f'Gradient accumulation steps: {config.gradient_accumulation_steps}',
      f'Effective batch size: {config.batch_size * config.gradient_accumulation_steps}',
      f'Devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
      f'({jax.process_count()} process{"es" if jax.process_count() > 1 else ""})',
      f'Input: {config.dataset} ({config.data_source}), {config.input_size}px, '
      f'{steps_per_epoch} steps/epoch, {config.num_epochs} epochs',
  ]
  return '\n'.join(lines)


def device_memory() -> dict:
  """Bytes in use / peak on the first local device, where the backend reports them."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # CPU backends may not implement it.
    stats = {}
  out = {}
  if 'bytes_in_use' in stats:
    out['mem_gb'] = stats['bytes_in_use'] / 1e9
  if 'peak_bytes_in_use' in stats:
    out['peak_mem_gb'] = stats['peak_bytes_in_use'] / 1e9
  return out


class MetricWriter:
  """JSON lines in the workdir + TensorBoard, and wandb when a project is set. Process 0 only.

  TensorBoard event files go to `workdir/tensorboard` through flax's `SummaryWriter`; when it
  cannot start (its `tensorboard`/TensorFlow packages missing) one `warning:` line on stderr says
  so and the JSON lines go on alone. wandb requested but not installed is a user error.
  """

  def __init__(self, workdir: str, config=None, wandb_project: str = ''):
    self.active = jax.process_index() == 0
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._tb = None
    self._wandb = None
    if not self.active:
      return
    wandb = None
    if wandb_project:
      # Checked before any file is opened: a run that cannot log where asked does not start.
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError('config.wandb_project is set but wandb is not installed: '
                         'pip install wandb') from e
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = _tensorboard_writer(self.tensorboard_dir)
    if wandb is not None:
      self._wandb = wandb.init(project=wandb_project, dir=workdir,
                               config=config.to_dict() if config is not None else None)

  @property
  def tensorboard(self) -> bool:
    """Whether event files are being written (on this process)."""
    return self._tb is not None

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    if not self.active:
      return
    scalars = {f'{prefix}{k}': float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.scalar(k, v, int(step))
      self._tb.flush()  # once per call, not per scalar: a live TensorBoard sees each log step
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray], prefix: str = '') -> None:
    """TensorBoard images: tag -> uint8 [H, W, 3] or a stack [K, H, W, 3] (K shown per step)."""
    if not self.active or self._tb is None:
      return
    for tag, image in images.items():
      image = np.asarray(image)
      count = image.shape[0] if image.ndim == 4 else 1
      self._tb.image(f'{prefix}{tag}', image, int(step), max_outputs=count)
    self._tb.flush()

  def close(self) -> None:
    if not self.active:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _tensorboard_writer(logdir: str):
  """flax's TensorBoard `SummaryWriter` on `logdir`, or None after one line saying why not."""
  try:
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    # The JSON lines still hold every metric: warn once, do not stop a training run for this.
    print(f'warning: TensorBoard logging is off ({e}); pip install -r requirements.txt to get '
          f'{logdir}', file=sys.stderr, flush=True)
    return None
  # auto_flush=False: `write` flushes once per log step instead of after every scalar.
  return tensorboard.SummaryWriter(logdir, auto_flush=False)


# ============================================================================ attention images
def attention_picture(display, rollout_row, glca_index=None) -> np.ndarray:
  """The test crop beside its attention map: uint8 [S, 2S, 3].

  The map is drawn as `--mode visualize` draws it (docs/VISUALIZE.md), without the text: the
  crop in grey under the SA attention-rollout heat map (jet, one block per patch cell), and the
  patches GLCA selected (`glca_index`, CLS first) outlined in white.
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  from dca_jax import visualize  # pylint: disable=g-import-not-at-top  (imports train: cycle)
  display = np.asarray(display, np.uint8)
  size = display.shape[0]
  grid = visualize.token_grid(np.asarray(rollout_row).size - 1)
  heat = visualize.rollout_heatmap(rollout_row, grid, size)
  grey = display.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
  colour = colormaps['jet'](heat)[..., :3].astype(np.float32) * 255.0
  blend = 0.55 * grey[..., None] + 0.45 * colour  # the alpha `visualize` draws the map with
  if glca_index is not None:
    for x0, y0, w, h in visualize.cell_boxes(visualize.selected_cells(glca_index, grid), grid,
                                             size):
      c0, r0 = int(round(x0 + 0.5)), int(round(y0 + 0.5))  # boxes are in imshow coordinates
      c1, r1 = c0 + int(round(w)) - 1, r0 + int(round(h)) - 1
      blend[r0:r1 + 1, [c0, c1]] = 255.0
      blend[[r0, r1], c0:c1 + 1] = 255.0
  picture = np.clip(np.round(blend), 0, 255).astype(np.uint8)
  return np.concatenate([display, picture], axis=1)


class AttentionImages:
  """The attention pictures of a few fixed test images, for TensorBoard at each evaluation.

  The first `num_images` test images of process 0 (its first eval batch) are drawn with
  `attention_picture` under the current params, so TensorBoard shows the rollout sharpening on
  the same images over training. Call it on EVERY process (the forward is one sharded program,
  like the eval step); it returns {'attention/test_NNNNN': uint8 [S, 2S, 3]} on process 0 and
  {} elsewhere, ready for `MetricWriter.write_images`.
  """

  def __init__(self, trainer, num_images: int = 4):
    from dca_jax import distributed  # pylint: disable=g-import-not-at-top
    self._trainer = trainer
    self.num_images = int(num_images)
    self._batch = None
    model, dtype = trainer.model, trainer.dtype

    def forward(variables, batch):
      out = model.apply(variables, batch['image'].astype(dtype), train=False,
                        with_selection=True)
      res = {'rollout': out['rollout'], 'index': batch['index']}
      if 'glca_index' in out:
        res['glca_index'] = out['glca_index']
      return res

    self._forward = jax.jit(forward, in_shardings=(trainer.shardings.variables,
                                                   trainer.batch_sharding),
                            out_shardings=distributed.replicated(trainer.mesh))

  def _first_batch(self):
    """This host's first eval batch (read once; the test split is fixed) and process 0's picks."""
    from dca_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: heavy import)
    batch = next(iter(self._trainer.input.eval_iter(with_index=True)))
    keep = np.flatnonzero(batch['mask'])[:self.num_images]
    # Matched by test index after the forward, whatever row order the global batch has.
    self._displays = {int(batch['index'][i]): data.denormalize(batch['image'][i],
                                                               self._trainer.config)
                      for i in keep}
    self._batch = {'image': batch['image'],
                   'index': np.where(batch['mask'], batch['index'], -1).astype(np.int32)}

  def __call__(self, variables) -> dict[str, np.ndarray]:
    """variables: the train state's `variables` (params, and the necks' statistics if any)."""
    if self.num_images <= 0:
      return {}
    from dca_jax import distributed  # pylint: disable=g-import-not-at-top
    if self._batch is None:
      self._first_batch()
    out = jax.device_get(self._forward(
        variables, distributed.global_batch(self._batch, self._trainer.batch_sharding)))
    if jax.process_index() != 0:
      return {}
    row = {int(i): r for r, i in enumerate(out['index']) if int(i) >= 0}
    pictures = {}
    for index, display in self._displays.items():
      r = row[index]
      glca = out['glca_index'][r] if 'glca_index' in out else None
      pictures[f'attention/test_{index:05d}'] = attention_picture(display, out['rollout'][r],
                                                                  glca)
    return pictures
