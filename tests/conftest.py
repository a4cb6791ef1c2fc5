"""Shared test set-up: the tiny configs, the data layouts several files read, running main.py in
a subprocess, one-line error checks; quiet TensorFlow, repo root importable; the suite's own
rules (`--reverse` order, each trained module fixture built once per run)."""

import collections
import os
import subprocess
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Many tests (and their main.py subprocesses, which inherit this) compile the same tiny programs:
# jax's persistent compilation cache makes each later compile a disk read.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'dca_jax_test_jit_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# The tests' programs are tiny: compiling them is most of the suite's time. LLVM's optimisation
# costs more than it saves, and XLA:CPU's older element-wise emitter compiles the same fusions in
# about half the time of the newer fusion emitters (docs/BENCHMARKS.md, "Test-suite time").
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
                           ' --xla_cpu_use_fusion_emitters=false').strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402

TINY_CONFIG = os.path.join(ROOT, 'tests', 'tiny_config.py')  # tiny_config() as a config file
MAIN = os.path.join(ROOT, 'main.py')


def tiny_config(**overrides):
  """A DCAL small enough for a 2-core CPU: width 32, 2 blocks, 32 px, patch 8 (16 patches)."""
  from dca_jax import config_lib
  c = config_lib.base_config()
  c.dataset = c.data_source = 'synthetic'
  c.num_classes = 4
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 32, 20, 32
  c.input_size, c.resize_size = 32, 36
  c.backbone = 'deit_tiny'
  c.backbone_overrides.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8))
  c.num_sa_layers, c.num_pwca_layers, c.top_k_ratio = 2, 2, 0.25
  c.batch_size, c.gradient_accumulation_steps, c.eval_batch_size = 4, 1, 8
  c.num_epochs, c.warmup_epochs = 1, 0.0
  c.learning_rate = 0.05
  c.stochastic_depth_prob = 0.0
  c.use_gradient_checkpointing = False
  c.precision = 'fp32'
  c.log_every_steps = 1
  c.shuffle_buffer = 64
  for k, v in overrides.items():
    c[k] = v
  return c


def tiny_reid_config(**overrides):
  """A tiny Re-ID DCAL on the synthetic Re-ID set: 32 x 16 px (4 x 2 patches of 8), P x K = 2 x 4."""
  c = tiny_config(task='reid', dataset='synthetic_reid', num_classes=6, input_size=32, bnneck=True,
                  input_width=16, resize_size=36)
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 48, 60, 32
  c.batch_size, c.num_instances, c.eval_batch_size = 8, 4, 16
  c.crop_padding, c.top_k_ratio = 2, 0.3
  c.optimizer, c.learning_rate, c.lr_reference_batch = 'adamw', 3e-3, 8
  for k, v in overrides.items():
    c[k] = v
  return c


def load_config(name: str, arg=None):
  """configs/<name>.py's get_config(arg), as main.py loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def data_config(**overrides):
  """tiny_config's data knobs for the input tests: 32 px crops of a 40 px resize, batch 4."""
  return tiny_config(**{'resize_size': 40, 'eval_batch_size': 4, 'num_classes': 3,
                        'synthetic_num_train': 48, 'synthetic_num_test': 10,
                        'synthetic_image_size': 48, **overrides})


def folder_config(layout, **overrides):
  """data_config reading a written FGVC layout (tests/layouts.py) from its folder."""
  return data_config(dataset=layout.dataset, data_source='folder', data_dir=layout.data_dir,
                     num_classes=layout.num_classes, **overrides)


def one_line_error(fn, match, error=ValueError) -> str:
  """`fn()` raises `error` matching `match`, in one line; returns the line."""
  with pytest.raises(error, match=match) as e:
    fn()
  assert '\n' not in str(e.value), str(e.value)
  return str(e.value)


def subprocess_env(**extra) -> dict:
  """The environment of a main.py / worker subprocess: CPU, quiet, unbuffered, one device."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1',
             **extra)
  env.pop('XLA_FLAGS', None)
  return env


def main_cmd(workdir, *extra, mode='train', config=TINY_CONFIG) -> list:
  """`python main.py --config CONFIG --workdir WORKDIR --mode MODE EXTRA...` (config None:
  no --config)."""
  return ([sys.executable, MAIN] + (['--config', config] if config else [])
          + ['--workdir', str(workdir), '--mode', mode, *extra])


def run_main(workdir, *extra, mode='train', config=TINY_CONFIG, timeout=300, **env):
  """main.py run to its end: the CompletedProcess (text stdout, stderr)."""
  return subprocess.run(main_cmd(workdir, *extra, mode=mode, config=config),
                        env=subprocess_env(**env), capture_output=True, text=True,
                        timeout=timeout)


def train_worker_cmd(tmp_path, name, overrides, **flags):
  """(command, its params.npz) of tests/train_worker.py: a few train steps of
  tiny_config(**overrides) on `--devices` simulated devices, params saved as npz."""
  import json  # pylint: disable=g-import-not-at-top
  out = tmp_path / name / 'params.npz'
  out.parent.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, os.path.join(ROOT, 'tests', 'train_worker.py'), str(out),
         json.dumps(overrides)]
  for k, v in flags.items():
    cmd += [f'--{k}', str(v)]
  return cmd, out


def load_npz(path) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_same_params(a, b, atol=1e-6):
  """Two {name: array} dicts with the same names and values to `atol` (rtol 1e-5)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-5, err_msg=k)


def assert_leaves_equal(a, b):
  """Two pytrees equal leaf for leaf, bit for bit."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='session')
def cub(tmp_path_factory):
  """A tiny CUB-200-2011 in its official layout (real JPEGs): tests/layouts.py."""
  import layouts  # pylint: disable=g-import-not-at-top
  return layouts.write_cub_layout(tmp_path_factory.mktemp('cub'))


@pytest.fixture(scope='session')
def market(tmp_path_factory):
  """A tiny Market-1501 in its official layout (real JPEGs): tests/reid_layouts.py."""
  import reid_layouts  # pylint: disable=g-import-not-at-top
  return reid_layouts.write_market1501(tmp_path_factory.mktemp('market'))


# --- The suite's own rules -------------------------------------------------------------------
# Each test builds what it reads (a module fixture may build shared artefacts; a test never reads
# what only a sibling test wrote): `--reverse` runs every file's tests in the opposite order to
# check it. A module fixture that trains a run calls `count_build(name)`; pytest.ini's
# `--dist loadfile` keeps a file's tests on one worker, so each is built once per run, and the
# run fails if one is built twice (a scheduler that splits a file would double the suite's time
# silently otherwise).

BUILDS_ENV = 'DCA_JAX_TEST_BUILDS'  # the file the fixtures' builds are counted in, one run's


def pytest_addoption(parser):
  parser.addoption('--reverse', action='store_true',
                   help='run the tests in reverse order (each test must build what it reads)')


def pytest_configure(config):
  # The controller (or the only process) names the count file; xdist's workers inherit it.
  if not hasattr(config, 'workerinput'):
    fd, path = tempfile.mkstemp(prefix='dca_jax_test_builds_', suffix='.txt')
    os.close(fd)
    os.environ[BUILDS_ENV] = path


def pytest_collection_modifyitems(config, items):
  if config.getoption('--reverse'):
    items.reverse()


def count_build(name: str) -> None:
  """Records one build of the module fixture `name` for the run's check (pytest_sessionfinish)."""
  path = os.environ.get(BUILDS_ENV)
  if path:
    with open(path, 'a') as f:  # one short append per build: atomic between workers
      f.write(name + '\n')


def builds_twice(path) -> dict:
  """{fixture name: builds} for the fixtures built more than once in a run's count file."""
  with open(path) as f:
    counts = collections.Counter(line.strip() for line in f if line.strip())
  return {name: n for name, n in counts.items() if n > 1}


def pytest_sessionfinish(session, exitstatus):
  path = os.environ.get(BUILDS_ENV)
  if hasattr(session.config, 'workerinput') or not path or not os.path.exists(path):
    return
  twice = builds_twice(path)
  os.remove(path)
  if twice:
    listed = ', '.join(f'{name} x{n}' for name, n in sorted(twice.items()))
    session.config.get_terminal_writer().line(
        f'error: module fixtures built more than once in this run ({listed}): their tests were '
        'split between workers (pytest.ini sets --dist loadfile)', red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
