"""A new user's first hour, through main.py: train on one's own folder of classes (the count
taken from the data, a truncated JPEG reported once, the banner saying what runs), then eval,
predict and export with the run's own config.json (no --config), a JSON config with overrides
on top, folders and globs as --images, export without the ONNX converter, serving the exported
file without a config, and TFDS without data or network failing in seconds. What the console
shows (issue #47): the banner, lines of at most 100 columns, the closing summary; predict's
--out, a failed predict or a data error leaving nothing behind."""

import json
import os
import re
import time

import pytest
from conftest import ROOT, count_build, run_main, tiny_config

from dca_jax import train

try:
  from tests import layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import layouts  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow
CLASSES = ('cat', 'dog', 'eel')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """Two steps on a folder of 3 classes (4 train images each, one of them truncated, 2 test)
  with num_classes=0, and what main.py printed."""
  count_build('test_e2e_first_hour.run')
  root = tmp_path_factory.mktemp('first_hour')
  data_dir = layouts.write_imagefolder(str(root / 'data'), CLASSES, train=4, test=2)
  truncated = os.path.join(data_dir, 'train', 'dog', '1.jpg')
  layouts.truncate_file(truncated)
  workdir = root / 'run'
  r = run_main(workdir, '--config.dataset=imagefolder', '--config.data_source=folder',
               f'--config.data_dir={data_dir}', '--config.num_classes=0',
               '--config.max_steps=2')
  assert r.returncode == 0, r.stderr[-3000:]
  return {'workdir': str(workdir), 'data': data_dir, 'truncated': truncated, 'train': r,
          'root': root}


def test_training_takes_the_classes_from_the_data_and_says_what_runs(run):
  out = run['train'].stdout
  assert 'this run: 2 steps = ' in out and '(max_steps=2)' in out
  assert '100 epochs' not in out
  with open(os.path.join(run['workdir'], 'config.json')) as f:
    assert json.load(f)['num_classes'] == len(CLASSES)   # recorded for eval, predict, export


def test_the_banner_states_the_settings_without_marking_cpu_choices_as_failures(run):
  out, err = run['train'].stdout, run['train'].stderr
  lines = out.splitlines()
  assert 'Mixed precision training: off (FP32)' in lines and 'Gradient checkpointing: off' in lines
  for line in ('Physical batch size: 4', 'Gradient accumulation steps: 1',
               'Effective batch size: 4', 'Devices: 1 x cpu (1 process)'):
    assert line in lines, line
  assert '✗' not in out + err and 'disabled' not in out
  assert 'warning: fp32' not in err   # FP32 is the right choice on a CPU


def _columns(text: str, root) -> list:
  """The console's lines, each tqdm update (\r) on its own, with the test's folder written as
  a short path: the width of what main.py writes, not of pytest's temporary folders."""
  text = text.replace(str(root), '/data/run')
  return [segment for line in text.split('\n') for segment in line.split('\r') if segment]


def test_every_console_line_of_a_training_fits_100_columns(run):
  """Apart from the one-line warning that names a skipped file (a warning is one line, kept
  whole to be grepped), every line and every bar update."""
  segments = _columns(run['train'].stdout + run['train'].stderr, run['root'])
  wide = [s for s in segments if len(s) > 100]
  assert all(s.startswith('warning: ') and '/data/run/data/' in s for s in wide), wide
  assert len(wide) <= 1
  bars = [s for s in segments if s.startswith('epoch 1/')]
  assert bars and 'loss=' in bars[-1] and 'img/s' in bars[-1] and 'eta=' in bars[-1]
  assert not any('ce_sa' in s or 'w_glca' in s for s in segments)   # metrics.jsonl has them
  with open(os.path.join(run['workdir'], 'metrics.jsonl')) as f:
    assert any('train/ce_sa' in json.loads(line) for line in f)
  evals = [s for s in segments if s.startswith('step 2: test top-1 ')]
  assert len(evals) == 1   # a line of its own, not inside a bar


def test_the_closing_summary_says_what_was_reached_and_where_the_files_are(run):
  lines = run['train'].stdout.splitlines()
  start = lines.index(next(l for l in lines if l.startswith('Training done: ')))
  summary = lines[start:]
  assert summary[0].startswith('Training done: step 2 of 2, ')
  assert summary[1].startswith('  last eval, step 2: top-1 SA+GLCA ')
  assert summary[2].startswith('  best accuracy: ') and 'at step 2 (--checkpoint best)' in summary[2]
  paths = dict(re.match(r'  (\w+): +(\S+)', line).groups() for line in summary[3:6])
  workdir = os.path.abspath(run['workdir'])
  assert paths == {'checkpoints': os.path.join(workdir, 'checkpoints'),
                   'metrics': os.path.join(workdir, 'metrics.jsonl'),
                   'TensorBoard': os.path.join(workdir, 'tensorboard')}
  assert all(os.path.exists(p) for p in paths.values())
  assert os.path.isdir(os.path.join(paths['checkpoints'], '2'))


def test_a_data_error_leaves_no_workdir_behind(run, tmp_path):
  data_dir = layouts.write_imagefolder(str(tmp_path / 'data'), CLASSES, train=2, test=1)
  for name in os.listdir(os.path.join(data_dir, 'train', 'eel')):   # a class with no image
    os.remove(os.path.join(data_dir, 'train', 'eel', name))
  workdir = tmp_path / 'new' / 'run'
  r = run_main(workdir, '--config.dataset=imagefolder', '--config.data_source=folder',
               f'--config.data_dir={data_dir}', '--config.num_classes=0')
  assert r.returncode == 1
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'eel' in errors[0], r.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'new')   # nor the folders above it this run made
  missing = run_main(tmp_path / 'other', '--config.dataset=imagefolder',
                     '--config.data_source=folder', f'--config.data_dir={tmp_path / "none"}')
  assert missing.returncode == 1 and not os.path.exists(tmp_path / 'other')


def test_a_truncated_jpeg_is_one_warning_line_naming_it(run):
  err = run['train'].stderr
  lines = [line for line in err.splitlines() if run['truncated'] in line]
  assert len(lines) == 1, err[-3000:]
  assert lines[0].startswith('warning: imagefolder: skipped 1 unreadable image(s)')
  assert 'DataWarning' not in err and 'warnings.warn' not in err


def test_num_classes_that_disagree_with_the_data_is_one_line(run, tmp_path):
  config = tiny_config(dataset='imagefolder', data_source='folder', data_dir=run['data'],
                       num_classes=7)
  with pytest.raises(ValueError, match=r'config.num_classes=7 but the imagefolder data has 3 '
                     r'classes: set --config.num_classes=3, or 0') as e:
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert '\n' not in str(e.value)


def test_eval_without_config_takes_the_runs_own(run):
  r = run_main(run['workdir'], mode='eval', config=None)
  assert r.returncode == 0, r.stderr[-3000:]
  config_json = os.path.join(run['workdir'], 'config.json')
  assert r.stdout.splitlines()[0] == (f"config: {config_json} (the run's own; "
                                      '--config.KEY=VALUE overrides apply on top)')
  with open(os.path.join(run['workdir'], 'eval.json')) as f:
    assert json.load(f)['num_images'] == 2 * len(CLASSES)


def test_a_json_config_with_overrides_predicts_a_folder_and_a_glob(run):
  config_json = os.path.join(run['workdir'], 'config.json')
  test_dir = os.path.join(run['data'], 'test')
  pattern = os.path.join(test_dir, '*', '1.jpg')
  r = run_main(run['workdir'], '--config.eval_batch_size=2', f'--images={test_dir},{pattern}',
               mode='predict', config=config_json)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'config: {config_json} (JSON;' in r.stdout
  assert f'images: {2 * len(CLASSES)} file(s) from {test_dir}' in r.stdout
  assert f'images: {len(CLASSES)} file(s) match {pattern}' in r.stdout
  with open(os.path.join(run['workdir'], 'predictions.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  want = sorted(os.path.join(test_dir, c, f'{i}.jpg') for c in CLASSES for i in range(2))
  want += sorted(os.path.join(test_dir, c, '1.jpg') for c in CLASSES)
  assert [row['file'] for row in rows] == want
  assert all(row['top5'][0]['class'] in CLASSES for row in rows)


def test_predict_writes_out_and_a_failed_predict_leaves_it_whole(run, tmp_path):
  test_dir = os.path.join(run['data'], 'test')
  out = tmp_path / 'mine' / 'predictions.jsonl'   # absolute: taken as it is
  good = run_main(run['workdir'], f'--images={test_dir}', f'--out={out}', mode='predict',
                  config=None)
  assert good.returncode == 0, good.stderr[-3000:]
  assert f'-> {out}' in good.stdout
  kept = out.read_text()
  assert len(kept.splitlines()) == 2 * len(CLASSES)
  failed = run_main(run['workdir'], f'--images={tmp_path / "missing.jpg"}', f'--out={out}',
                    mode='predict', config=None)
  assert failed.returncode == 1 and 'nothing written' in failed.stderr
  assert 'image(s) predicted' not in failed.stdout
  assert out.read_text() == kept and os.listdir(out.parent) == ['predictions.jsonl']
  pattern = str(tmp_path / 'none' / '*.jpg')
  nothing = run_main(run['workdir'], f'--images={pattern}', '--out=never.jsonl', mode='predict',
                     config=None)
  errors = [line for line in nothing.stderr.splitlines() if line.startswith('error:')]
  assert nothing.returncode == 1 and errors == [
      f'error: --images {pattern}: no file matches this pattern'], nothing.stderr[-3000:]
  assert '0 of' not in nothing.stdout
  assert not os.path.exists(os.path.join(run['workdir'], 'never.jsonl'))


def test_export_without_the_converter_writes_stablehlo_and_serves_without_a_config(run, tmp_path):
  """The ONNX converter hidden (a jax2onnx that cannot be imported first on the path): the
  default formats write StableHLO and say in one line what ONNX needs; ONNX alone is the
  error; the StableHLO file then predicts with no --config."""
  shadow = tmp_path / 'shadow' / 'jax2onnx'
  shadow.mkdir(parents=True)
  (shadow / '__init__.py').write_text(
      "raise ModuleNotFoundError(\"No module named 'jax2onnx'\", name='jax2onnx')\n")
  hide = {'PYTHONPATH': str(tmp_path / 'shadow')}
  r = run_main(run['workdir'], mode='export', config=None, **hide)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'export: ONNX skipped: --format onnx needs the jax2onnx converter' in r.stdout
  export_dir = os.path.join(run['workdir'], 'export')
  assert os.path.isfile(os.path.join(export_dir, 'model.stablehlo'))
  assert not os.path.exists(os.path.join(export_dir, 'model.onnx'))
  only_onnx = run_main(run['workdir'], '--format=onnx', mode='export', config=None, **hide)
  assert only_onnx.returncode == 1
  errors = [line for line in only_onnx.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'jax2onnx converter' in errors[0], only_onnx.stderr[-3000:]
  served = run_main(tmp_path / 'serve', f'--exported={export_dir}/model.stablehlo',
                    f'--images={os.path.join(run["data"], "test")}', mode='predict',
                    config=None)
  assert served.returncode == 0, served.stderr[-3000:]
  assert f'{2 * len(CLASSES)} of {2 * len(CLASSES)} image(s) predicted' in served.stdout


def test_tfds_without_data_or_network_fails_in_seconds(tmp_path):
  start = time.monotonic()
  r = run_main(tmp_path / 'cub', f'--config.data_dir={tmp_path / "empty"}',
               config=os.path.join(ROOT, 'configs', 'cub.py'), DCA_JAX_OFFLINE='1')
  elapsed = time.monotonic() - start
  assert r.returncode == 1
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert 'TFDS dataset caltech_birds2011 is not prepared under' in errors[0]
  assert 'no network to download it' in errors[0] and 'data_source=folder' in errors[0]
  assert elapsed < 90, elapsed  # TFDS alone retried its download for minutes
