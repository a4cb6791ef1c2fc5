"""The suite's own rules, on the pytest and pytest-xdist that are installed: a file's tests share
one worker (pytest.ini's `--dist loadfile`), a module fixture counted with `count_build` is built
once per run and the run fails when one is built twice, and `--reverse` reverses the order."""

import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT

SUITE = '''
import os
import pytest
from conftest import count_build


@pytest.fixture(scope='{scope}')
def trained():
  count_build('{name}')
  return os.environ.get('PYTEST_XDIST_WORKER', 'main')


def test_a(trained):
  print('ORDER a', trained)


def test_b(trained):
  print('ORDER b', trained)


def test_c(trained):
  print('ORDER c', trained)


def test_d(trained):
  print('ORDER d', trained)
'''


def _run(tmp_path, *args, **files):
  """pytest -n 2 over the test files `files` beside copies of the project's pytest.ini and
  conftest.py, as .ci/run runs it: (return code, output)."""
  for name in ('pytest.ini', os.path.join('tests', 'conftest.py')):
    shutil.copy(os.path.join(ROOT, name), tmp_path / os.path.basename(name))
  for name, text in files.items():
    (tmp_path / f'{name}.py').write_text(text)
  env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTEST_', 'DCA_JAX_TEST'))}
  r = subprocess.run([sys.executable, '-m', 'pytest', '-n', '2', '-v', '-s', '-p', 'no:cacheprovider',
                      *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  return r.returncode, r.stdout + r.stderr


def test_a_files_tests_share_one_worker_and_its_fixture_is_built_once(tmp_path):
  code, out = _run(tmp_path, test_one=SUITE.format(scope='module', name='one'),
                   test_two=SUITE.format(scope='module', name='two'))
  assert code == 0, out
  assert '8 passed' in out and 'built more than once' not in out
  workers = {}  # '[gw0] [ 12%] PASSED test_one.py::test_a' -> {test_one.py: {gw0}}
  for line in out.splitlines():
    if line.startswith('[gw') and 'PASSED' in line:
      workers.setdefault(line.split()[-1].split('::')[0], set()).add(line.split()[0])
  assert {f: len(w) for f, w in workers.items()} == {'test_one.py': 1, 'test_two.py': 1}, out


def test_a_fixture_built_twice_fails_the_run(tmp_path):
  # a function-scoped fixture stands for a module fixture whose tests were split between workers
  code, out = _run(tmp_path, test_one=SUITE.format(scope='function', name='twice'))
  assert code == 1, out
  assert '4 passed' in out
  assert 'error: module fixtures built more than once in this run (twice x4)' in out


def test_reverse_runs_each_files_tests_last_to_first(tmp_path):
  code, out = _run(tmp_path, '--reverse', '-n', '0',
                   test_one=SUITE.format(scope='module', name='one'))
  assert code == 0, out
  assert re.findall(r'ORDER (\w)', out) == ['d', 'c', 'b', 'a'], out
