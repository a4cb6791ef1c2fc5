"""A bad value of each kind of knob, through main.py as a process: exit status 1, one `error:`
line naming the knob on stderr, no traceback, no workdir left behind. Every case fails before a
model is built (the config is checked first: dca_jax/config_files.py `prepare`), so the cases
run side by side in a few seconds."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

DEMO = os.path.join('configs', 'demo.py')
BAD_JSON = {'backbone': 'vit_huge', 'batch_size': 8}   # a run's config.json, edited by hand
WRONG_TYPE_JSON = {'batch_size': 'four'}

CASES = {   # name -> (main.py arguments after --workdir, what the error line must contain)
    'backbone': (['--config.backbone=vit_huge'], "config.backbone='vit_huge' is not one of"),
    'dataset': (['--config.dataset=cubb'], "config.dataset='cubb' is not a fgvc dataset"),
    'loss_terms': (['--config.loss_terms=ce,focal'], "config.loss_terms='ce,focal'"),
    'precision': (['--config.precision=fp8'], "config.precision='fp8' is not one of"),
    'remat_policy': (['--config.remat_policy=every_second'],
                     "config.remat_policy='every_second' is not 'full' or a policy"),
    'negative_size': (['--config.input_size=-32'], 'config.input_size=-32 is out of its range'),
    'unknown_key': (['--config.batchsize=8'], "unknown config key 'batchsize'"),
    'bad_override_value': (['--config.batch_size=x'], 'flag --config.batch_size=x: invalid'),
    'unknown_choice_from_a_file': ([], "config.backbone='bogus' is not one of"),
    'json_bad_value': ([], "config.backbone='vit_huge' is not one of"),
    'json_wrong_type': ([], "config.batch_size='four' in the JSON config is not of type int"),
}
CONFIGS = {'unknown_choice_from_a_file': 'configs/cub.py:bogus',
           'json_bad_value': 'bad.json', 'json_wrong_type': 'wrong_type.json'}


@pytest.fixture(scope='module')
def failed(tmp_path_factory):
  """Every case's main.py run (all started at once) -> (CompletedProcess-like, its workdir)."""
  root = tmp_path_factory.mktemp('main_errors')
  (root / 'bad.json').write_text(json.dumps(BAD_JSON))
  (root / 'wrong_type.json').write_text(json.dumps(WRONG_TYPE_JSON))
  running = {}
  for name, (extra, _) in CASES.items():
    config = CONFIGS.get(name, DEMO)
    config = str(root / config) if config.endswith('.json') else config
    workdir = root / name / 'run'   # neither it nor its parent exists yet
    cmd = [sys.executable, 'main.py', '--config', config, '--workdir', str(workdir), *extra]
    running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE), workdir)
  results = {}
  for name, (process, workdir) in running.items():
    out, err = process.communicate(timeout=120)
    results[name] = (process.returncode, out, err, workdir)
  return results


@pytest.mark.parametrize('name', list(CASES))
def test_a_bad_knob_is_one_error_line_and_leaves_nothing(failed, name):
  code, out, err, workdir = failed[name]
  assert code == 1, (code, err[-3000:])
  assert 'Traceback' not in err and 'Traceback' not in out, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err[-3000:]
  assert CASES[name][1] in lines[0], lines[0]
  assert not os.path.exists(workdir.parent), os.listdir(workdir.parent)


def test_a_json_config_says_it_was_taken(failed):
  """The `config:` line of a JSON config comes before the error its values make."""
  _, out, _, _ = failed['json_bad_value']
  assert out.splitlines()[0].startswith('config: ') and '(JSON; --config.KEY=VALUE' in out
