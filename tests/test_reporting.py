"""TensorBoard logging: a tiny training's event files read back, attention images, and the
one-line notices of optional writers that cannot start."""

import io
import json
import os
import sys

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from dca_jax import drawing, reporting

TRAIN_TAGS = ('loss', 'ce_sa', 'ce_glca', 'ce_pwca', 'w_sa', 'w_glca', 'w_pwca', 'lr')
EVAL_TAGS = ('accuracy', 'accuracy_sa', 'accuracy_glca')


def _events(logdir):
  """tag -> [(step, tensor)] of every summary in `logdir` (tf.summary v2 writes tensors)."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={'tensors': 0})  # 0: keep all
  acc.Reload()
  return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
          for tag in acc.Tags()['tensors']}


def _jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # a training run end to end
def test_tiny_training_writes_losses_and_accuracies_to_tensorboard(tmp_path):
  from dca_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  # 8 steps per epoch: max_steps=3 logs steps 1, 2, 3 and evaluates once, at the last step.
  result = train.train_and_evaluate(tiny_config(max_steps=3, log_every_steps=1), workdir)
  events = _events(os.path.join(workdir, 'tensorboard'))
  logged = {(r['step'], k): v for r in _jsonl(workdir) for k, v in r.items()}
  for name in TRAIN_TAGS:
    tag = f'train/{name}'
    assert [s for s, _ in events.get(tag, [])] == [1, 2, 3], tag
    for step, value in events[tag]:
      assert float(value) == pytest.approx(logged[(step, tag)], rel=1e-6), (tag, step)
  for name in EVAL_TAGS:
    tag = f'eval/{name}'
    assert [s for s, _ in events.get(tag, [])] == [3], tag
    assert float(events[tag][0][1]) == pytest.approx(logged[(3, tag)], rel=1e-6)
    # the Evaluator's own figure (not a re-read of the same file), a count of the 20 test images
    assert float(events[tag][0][1]) == pytest.approx(result[name], rel=1e-6)
    assert float(events[tag][0][1]) * 20 == pytest.approx(round(result[name] * 20), abs=1e-4)
  # the attention pictures of the first test images, at the evaluation's step
  assert [s for s, _ in events.get('eval/attention/test_00000', [])] == [3]


def test_attention_images_are_written_and_read_back(tmp_path):
  from dca_jax import train  # pylint: disable=g-import-not-at-top
  from dca_jax.evaluators import attention as attention_lib  # pylint: disable=g-import-not-at-top
  trainer = train.Trainer(tiny_config(), str(tmp_path / 'run'))
  attention = attention_lib.Evaluator(trainer.evals.context, num_images=3)
  pictures = {f'attention/{k}': v for k, v in attention.run(trainer.state.variables)}
  assert sorted(pictures) == ['attention/test_00000', 'attention/test_00001',
                              'attention/test_00002']
  for picture in pictures.values():
    assert picture.dtype == np.uint8 and picture.shape == (32, 64, 3)
  again = dict(attention.run(trainer.state.variables))  # the same images each time
  assert sorted(f'attention/{k}' for k in again) == sorted(pictures)
  writer = reporting.MetricWriter(str(tmp_path / 'run'))
  writer.write_images(5, pictures, prefix='eval/')
  writer.close()
  trainer.checkpointer.close()
  events = _events(writer.tensorboard_dir)
  for tag, picture in pictures.items():
    (step, value), = events[f'eval/{tag}']
    assert step == 5
    width, height, png = value  # tf.summary.image: [width, height, PNG...] strings
    assert (int(width), int(height)) == (64, 32)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert('RGB')), picture)


def test_attention_picture_marks_the_hot_patch_and_the_glca_cells():
  display = np.full((32, 32, 3), 128, np.uint8)
  rollout = np.zeros(1 + 16, np.float32)
  rollout[1 + 5] = 1.0  # patch (row 1, col 1) of the 4x4 grid: pixels 8..15
  picture = drawing.attention_picture(display, rollout, glca_index=np.array([0, 6]))
  np.testing.assert_array_equal(picture[:, :32], display)
  heat = picture[:, 32:].astype(int)
  inside, cold = heat[12, 12], heat[28, 28]
  # the hot cell: 0.35 x the image (128) + 0.65 x jet's dark red (127.5, 0, 0)
  np.testing.assert_allclose(inside, 0.35 * 128 + 0.65 * np.array([127.5, 0, 0]), atol=1)
  np.testing.assert_array_equal(cold, display[28, 28])  # heat 0: the image as it is
  assert (heat[8, 8:16] == 255).all() and (heat[8:16, 15] == 255).all()  # GLCA cell outlined
  assert (heat[7, 8:16] != 255).any()  # ...and only it


def test_missing_tensorboard_is_one_warning_line_and_jsonl_goes_on(tmp_path, monkeypatch, capsys):
  import flax.metrics  # pylint: disable=g-import-not-at-top
  # As on an install without the `tensorboard` package: importing flax's writer fails.
  monkeypatch.delattr(flax.metrics, 'tensorboard', raising=False)
  monkeypatch.setitem(sys.modules, 'flax.metrics.tensorboard', None)  # import -> ImportError
  writer = reporting.MetricWriter(str(tmp_path))
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('warning: TensorBoard logging is off'), err
  assert not writer.tensorboard
  writer.write(1, {'loss': 2.5}, prefix='train/')
  writer.write_images(1, {'attention/x': np.zeros((4, 4, 3), np.uint8)})
  writer.close()
  assert _jsonl(str(tmp_path))[0]['train/loss'] == 2.5
  assert not os.path.exists(tmp_path / 'tensorboard')


def test_tensorboard_starts_silently_when_installed(tmp_path, capsys):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.close()
  assert writer.tensorboard and capsys.readouterr().err == ''


def test_wandb_requested_but_missing_is_one_error_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)
  with pytest.raises(ValueError) as e:
    reporting.MetricWriter(str(tmp_path / 'run'), wandb_project='dcal')
  assert '\n' not in str(e.value) and 'pip install wandb' in str(e.value)
  assert not os.path.exists(tmp_path / 'run')  # nothing written for a run that does not start
