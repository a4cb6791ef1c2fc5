"""TensorBoard logging: a tiny training's event files read back, and the one-line notices of
optional writers that cannot start."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import tiny_config
from dca_jax import reporting

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


def test_tiny_training_writes_losses_and_accuracies_to_tensorboard(tmp_path):
  from dca_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  # 8 steps per epoch: max_steps=3 logs steps 1, 2, 3 and evaluates once, at the last step.
  train.train_and_evaluate(tiny_config(max_steps=3, log_every_steps=1), workdir)
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
    assert 0.0 <= float(events[tag][0][1]) <= 1.0


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
