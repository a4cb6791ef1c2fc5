"""What a user sees (issue #47), piece by piece: `--help` written for users, the banner stating
the settings neutrally with a warning only for what is wrong for the hardware, a progress line
of at most 100 columns with lines said between bars, the closing summary, and the search
pictures' names and captions. The same through main.py on trained runs:
tests/test_e2e_first_hour.py and tests/test_e2e_reid_folder.py."""

import io
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import MAIN, subprocess_env, tiny_config, tiny_reid_config

from dca_jax import drawing, evaluators, reporting, search

MODES = ('train', 'eval', 'visualize', 'predict', 'embed', 'search', 'plan', 'export')
READ_BY = {  # flag -> the modes its help must name
    'config': ('All modes',), 'workdir': ('All modes',),
    'checkpoint': ('eval', 'visualize', 'predict', 'embed', 'search', 'export'),
    'images': ('predict', 'embed', 'search', 'visualize'), 'out': ('predict', 'embed', 'search'),
    'exported': ('predict', 'embed', 'search'), 'gallery': ('search',), 'top_k': ('search',),
    'eval_out': ('eval',), 'format': ('export',), 'num_images': ('visualize',),
    'compare_workdir': ('visualize',), 'target_config': ('plan',), 'topology': ('plan',),
    'coordinator_address': ('train', 'eval'), 'num_processes': ('train', 'eval'),
    'process_id': ('train', 'eval'),
}


# ------------------------------------------------------------------------- --help
@pytest.fixture(scope='module')
def help_text():
  r = subprocess.run([sys.executable, MAIN, '--help'], env=subprocess_env(), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode in (0, 1) and not r.stderr, r.stderr[-3000:]   # absl's --help exits 1
  return r.stdout


def _flag_help(text: str) -> dict:
  """flag -> its help paragraph (absl: `  --name: help` then indented continuation lines)."""
  found, name = {}, None
  for line in text.splitlines():
    m = re.match(r'  --(\w+): (.*)', line)
    if m:
      name = m.group(1)
      found[name] = m.group(2)
    elif name and line.startswith('    '):
      found[name] += ' ' + line.strip()
    else:
      name = None
  return found


def test_help_opens_for_users_with_each_mode_in_one_line(help_text):
  head = help_text.split('flags:')[0]
  assert 'Nothing else lives here' not in help_text and 'dca_jax/checks.py' not in head
  for mode in MODES:
    lines = [line for line in head.splitlines() if line.startswith(f'  {mode} ')]
    assert len(lines) == 1, (mode, head)
  for line in head.splitlines():
    assert '          --' not in line and len(line) <= 100, line   # no wide gap, no long line


def test_help_names_the_modes_that_read_each_flag(help_text):
  helps = _flag_help(help_text)
  for flag, modes in READ_BY.items():
    assert flag in helps, flag
    for mode in modes:
      assert mode in helps[flag], (flag, mode, helps[flag])


# ------------------------------------------------------------------------- the banner
def _banner(config, precision='fp32') -> str:
  return reporting.banner(config, precision=precision, num_params=1_000_000, steps_per_epoch=8,
                          selection=evaluators.selection_warning(config))


def test_the_banner_states_the_settings_neutrally():
  text = _banner(tiny_config(batch_size=4, gradient_accumulation_steps=3))
  lines = text.splitlines()
  assert lines[:2] == ['Mixed precision training: off (FP32)', 'Gradient checkpointing: off']
  assert '✗' not in text and '✓' not in text and 'disabled' not in text
  for line in ('Physical batch size: 4', 'Gradient accumulation steps: 3',
               'Effective batch size: 12', 'Model initialized with 1.00M parameters'):
    assert any(l.startswith(line) for l in lines), line
  assert all(len(line) <= reporting.WIDTH for line in lines), lines   # the selection wrapped
  on = _banner(tiny_config(use_gradient_checkpointing=True, remat_policy='full'), 'bf16')
  assert on.splitlines()[:2] == [
      'Mixed precision training: BF16',
      'Gradient checkpointing: on, policy full (trades compute for memory)']
  assert 'FP16, dynamic loss scaling' in _banner(tiny_config(), 'fp16')


def test_the_reid_protocol_has_its_own_banner_line():
  text = reporting.banner(tiny_reid_config(), precision='fp32', num_params=10, steps_per_epoch=2,
                          protocol='no-camera')
  assert 'Re-ID protocol: no-camera' in text.splitlines()


def _device(platform, kind='x', capability=None):
  device = types.SimpleNamespace(platform=platform, device_kind=kind)
  if capability is not None:
    device.compute_capability = capability
  return device


@pytest.mark.parametrize('device,precision,warned', [
    (_device('cpu', 'cpu'), 'fp32', False),              # the right choice on a CPU
    (_device('gpu', 'NVIDIA H100', '9.0'), 'fp32', True),
    (_device('gpu', 'NVIDIA H100', '9.0'), 'bf16', False),
    (_device('gpu', 'Tesla V100', '7.0'), 'fp32', False),  # no fast BF16 there
    (_device('tpu', 'TPU v5 lite'), 'fp32', True),
])
def test_fp32_is_warned_only_where_bf16_is_fast(device, precision, warned):
  lines = reporting.hardware_warnings(tiny_config(), precision, device)
  assert len(lines) == int(warned), lines
  if warned:
    assert lines[0].startswith('warning: fp32 on ') and 'precision=bf16' in lines[0]
    assert '\n' not in lines[0] and len(lines[0]) <= reporting.WIDTH


def test_remat_off_is_warned_only_where_the_plan_says_it_does_not_fit():
  cpu = _device('cpu', 'cpu')
  off, on = tiny_config(), tiny_config(use_gradient_checkpointing=True)
  assert reporting.hardware_warnings(off, 'fp32', cpu) == []            # no plan: nothing said
  assert reporting.hardware_warnings(off, 'fp32', cpu, fits=True) == []
  assert reporting.hardware_warnings(on, 'fp32', cpu, fits=False) == []
  (line,) = reporting.hardware_warnings(off, 'fp32', cpu, fits=False)
  assert 'use_gradient_checkpointing=true' in line and '\n' not in line


# ------------------------------------------------------------------------- progress, summary
def test_the_progress_line_fits_100_columns_and_lines_go_between_bars(monkeypatch):
  """A wide terminal, a long run, every metric of a step: each bar update is at most 100
  columns and shows loss, images/s and ETA only; a line said mid-run is a whole line."""
  stream = io.StringIO()
  monkeypatch.setattr(sys, 'stdout', stream)
  monkeypatch.setattr(sys, 'stderr', stream)   # tqdm's bar and print() in one stream, in order
  monkeypatch.setenv('COLUMNS', '250')
  config = tiny_config(num_epochs=300, batch_size=4)
  progress = reporting.EpochProgress(config, steps_per_epoch=2500)
  metrics = {'loss': 12.3456, 'ce_sa': 1.1, 'ce_glca': 1.2, 'ce_pwca': 1.3, 'w_sa': 0.1,
             'w_glca': 0.2, 'w_pwca': 0.3, 'lr': 1e-4, 'peak_mem_gb': 71.2, 'images_per_sec': 3.5}
  for step in range(1, 2502):
    progress.step(step)
    progress.show(metrics)
    if step == 2500:
      progress.bar.refresh()
      progress.write('step 2500: test top-1 SA+GLCA 0.2500, SA 0.2500, GLCA 0.2500')
  progress.bar.refresh()
  progress.close()
  segments = [s for line in stream.getvalue().split('\n') for s in line.split('\r') if s]
  bars = [s for s in segments if s.startswith('epoch ')]
  assert bars and all(len(s) <= reporting.WIDTH for s in segments), max(segments, key=len)
  assert 'loss=12.3' in bars[-1] and 'img/s' in bars[-1] and 'eta=' in bars[-1]
  assert not any(k in stream.getvalue() for k in ('ce_sa', 'w_glca', 'lr=', 'peak_mem'))
  said = [line for line in stream.getvalue().split('\n') if 'step 2500: test' in line]
  assert said == ['step 2500: test top-1 SA+GLCA 0.2500, SA 0.2500, GLCA 0.2500']
  assert any(s.startswith('epoch 2/300') for s in bars)   # the next epoch: a bar of its own


def test_the_eta_is_the_whole_runs():
  progress = reporting.EpochProgress(tiny_config(num_epochs=10, batch_size=4), 100,
                                     enabled=False)
  progress.step(100)
  progress.bar = types.SimpleNamespace(set_postfix=lambda shown, refresh: seen.update(shown))
  seen = {}
  progress.show({'loss': 1.0, 'images_per_sec': 4.0})   # 900 steps x 4 images at 4 images/s
  assert seen == {'loss': '1', 'eta': '0:15:00'}
  assert reporting.duration(2 * 86400 + 3661) == '2d 1:01:01'


def test_the_closing_summary_says_what_was_reached_and_where():
  text = reporting.closing_summary(
      steps_done=8, total_steps=8, seconds=75, last='last eval, step 8: top-1 0.5000',
      best='best accuracy: 0.5000 at step 8 (--checkpoint best)',
      paths={'checkpoints': '/r/checkpoints', 'metrics': '/r/metrics.jsonl',
             'TensorBoard': '/r/tensorboard'})
  assert text.splitlines() == [
      'Training done: step 8 of 8, 0:01:15 this run',
      '  last eval, step 8: top-1 0.5000',
      '  best accuracy: 0.5000 at step 8 (--checkpoint best)',
      '  checkpoints: /r/checkpoints',
      '  metrics:     /r/metrics.jsonl',
      '  TensorBoard: /r/tensorboard']
  stopped = reporting.closing_summary(steps_done=3, total_steps=8, seconds=1, last='', best='',
                                      paths={}, stopped=True)
  assert stopped == 'Training stopped (SIGTERM): step 3 of 8, 0:00:01 this run'


def test_best_evaluation_reads_the_score_logged_at_the_best_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 4, "eval/accuracy": 0.5}\n{"step": 8, "train/loss": 1}\n'
                  '{"step": 8, "eval/accuracy": 0.75}\n{"step": 9, "eval/acc')   # cut by a kill
  assert reporting.best_evaluation(str(path), 'accuracy', 8) == 0.75
  assert reporting.best_evaluation(str(path), 'accuracy', None) is None
  assert reporting.best_evaluation(str(tmp_path / 'none'), 'accuracy', 4) is None


# ------------------------------------------------------------------------- search pictures
def test_search_pictures_are_named_after_their_queries():
  paths = ['q/a/0.jpg', 'q/b/0.jpg', 'q/c/0_2.jpg', 'q/0.png', 'q/.jpg']
  assert search.picture_names(paths) == ['0.png', '0_2.png', '0_2_2.png', '0_3.png',
                                         '.jpg.png']
  assert search.pictures_folder('/w/search.jsonl') == '/w/search'
  assert search.pictures_folder('/w/found') == '/w/found_pictures'


def test_search_captions_name_the_query_and_each_rank_distance_identity():
  record = {'query': '/q/Ada/0.jpg', 'identity': 'Ada',
            'results': [{'path': 'g/1.jpg', 'distance': 0.1234, 'identity': 'Ada'},
                        {'path': 'g/2.jpg', 'distance': 1.5}]}
  assert search._captions(record) == ('0.jpg (id Ada)', [['#1 d=0.123', 'id Ada'],  # pylint: disable=protected-access
                                                         ['#2 d=1.500']])


def test_a_captioned_ranking_has_its_text_below_the_row():
  query = np.full((32, 16, 3), 100, np.uint8)
  plain = drawing.ranking_picture(query, query, [query, query], [True, False])
  text = drawing.ranking_picture(query, query, [query, query], [True, False],
                                 query_caption='0.jpg (id Ada)',
                                 captions=[['#1 d=0.123', 'id Ada'], ['#2 d=1.500', 'id Cy']])
  h = drawing.RANK_PANEL_HEIGHT
  assert plain.shape[0] == h and text.shape[1] == plain.shape[1]
  assert text.shape[0] == h + 2 * drawing.CAPTION_LINE + 6
  np.testing.assert_array_equal(text[:h], plain)   # the row itself is unchanged
  band = text[h:]
  first = 2 * (h // 2) + 2 + drawing.RANK_GAP       # x of the first gallery image
  assert (band[:, :first] < 100).any()               # the query's name
  assert (band[:, first:] < 100).any()               # the ranks and distances
