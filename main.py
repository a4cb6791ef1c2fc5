"""dca_jax entry point: flags -> mode. Nothing else lives here.

  python main.py --config configs/cub.py --workdir DIR                 # train (resumes)
  python main.py --config configs/cub.py --workdir DIR --mode eval     # evaluate a checkpoint
  python main.py --config configs/cub.py --workdir DIR --mode export   # -> DIR/export/model.onnx
  python main.py --config configs/demo.py --workdir DIR --config.batch_size=8
  python main.py --config configs/cub.py --workdir DIR --mode plan \
      --target_config .../h100_sxm.txtpb                              # memory plan for a GPU
"""

import errno
import os
import sys

# TensorFlow (input pipeline only) must not grab GPU memory or print its start-up noise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Logged through absl's C++ logging while TensorFlow's libraries load, below any level that
# TF_CPP_MIN_LOG_LEVEL governs (each of the two libraries that carry a copy of absl prints both).
# oneDNN itself stays on: these lines are only dropped, never its numerics changed.
_STARTUP_NOISE = ('All log messages before absl::InitializeLog() is called',
                  'oneDNN custom operations are on')


def _import_tensorflow_quietly():
  """Imports TensorFlow with the file descriptor 2 captured, then passes on every line but the
  start-up noise above (a warning or an error of the import still reaches the user)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not any(noise in line for noise in _STARTUP_NOISE):
          sys.stderr.write(line)
      sys.stderr.flush()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and outputs go here.')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'eval', 'visualize', 'predict', 'plan', 'export'],
                          'What to run.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'],
                                'Which checkpoint eval/visualize/predict/export restore.')
_FORMAT = flags.DEFINE_string('format', 'stablehlo,onnx',
                              'export: the files to write into WORKDIR/export/ (comma-separated).')
_EXPORTED = flags.DEFINE_string(
    'exported', '', 'predict: serve this exported model.onnx / model.stablehlo instead of the '
    'checkpoint (no model is built).')
_IMAGES = flags.DEFINE_list('images', [], 'Image files for predict/visualize.')
_EVAL_OUT = flags.DEFINE_string('eval_out', 'eval.json',
                                'eval: the file in --workdir the results are written to.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8,
                                   'visualize: test images to draw without --images.')
_COMPARE = flags.DEFINE_string('compare_workdir', '', 'visualize: a second run drawn side by side.')
_TARGETS = flags.DEFINE_list(
    'target_config', [], 'plan: GPU target spec files (XLA gpu_target_config .txtpb, e.g. from '
    'xla/backends/gpu/target_config/specs/); none = plan for the attached devices.')
_TOPOLOGY = flags.DEFINE_string('topology', '1x1x1',
                                'plan: deviceless topology, hosts x 1 x GPUs per host (1x1x8).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'Multi-host: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-host: this process index.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TF log every step at INFO; -v 0 shows it
  from dca_jax import config_lib, distributed  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except ValueError as e:
    sys.exit(f'error: {e}')
  if _EXPORTED.value and _MODE.value != 'predict':
    sys.exit(f'error: --exported serves a file in --mode predict, not --mode {_MODE.value}')
  distributed.initialize_multihost(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _MODE.value != 'plan':
    _import_tensorflow_quietly()  # the input pipeline's; before anything else imports it
  from dca_jax import checkpoint, lock  # pylint: disable=g-import-not-at-top
  # Each is one line: bad config/input, checkpoint damaged/of another model/save failed (full
  # disk), another training in the workdir, a diverged run (train.NonFiniteError).
  user_errors = (ValueError, checkpoint.CheckpointError, FileNotFoundError, lock.LockError)
  try:
    if _MODE.value == 'train':
      from dca_jax import train  # pylint: disable=g-import-not-at-top
      if config.auto_batch:
        from dca_jax import plan  # pylint: disable=g-import-not-at-top
        config = plan.apply_auto_batch(config)
      try:
        train.train_and_evaluate(config, _WORKDIR.value)
      except train.NonFiniteError as e:
        sys.exit(f'error: {e}')
    elif _MODE.value == 'plan':
      from dca_jax import plan  # pylint: disable=g-import-not-at-top
      plan.run_plan(config, _WORKDIR.value, _TARGETS.value, topology=_TOPOLOGY.value)
    elif _MODE.value == 'export':
      from dca_jax import export  # pylint: disable=g-import-not-at-top
      export.run_export(config, _WORKDIR.value, _FORMAT.value, _CHECKPOINT.value)
    elif _MODE.value == 'predict' and _EXPORTED.value:
      from dca_jax import export  # pylint: disable=g-import-not-at-top
      export.run_predict_exported(_EXPORTED.value, _WORKDIR.value, _IMAGES.value)
    elif _MODE.value == 'eval':
      from dca_jax import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.run_eval(config, _WORKDIR.value, _CHECKPOINT.value, output=_EVAL_OUT.value)
    else:
      from dca_jax import visualize  # pylint: disable=g-import-not-at-top
      if _MODE.value == 'predict':
        visualize.run_predict(config, _WORKDIR.value, _IMAGES.value, _CHECKPOINT.value)
      else:
        visualize.run_visualize(config, _WORKDIR.value, images=_IMAGES.value,
                                num_images=_NUM_IMAGES.value, compare_workdir=_COMPARE.value,
                                which=_CHECKPOINT.value)
  except user_errors as e:
    sys.exit(f'error: {e}')
  except OSError as e:  # a full disk outside a checkpoint save (metrics, config.json)
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    sys.exit(f'error: {os.strerror(e.errno).lower()} writing {e.filename or "to --workdir"}; '
             'free space and run the same command to resume from the last checkpoint')


def parse_flags(argv):
  """absl's parser, with a wrong --config.KEY turned into one clear line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --help for usage.')
  except (AttributeError, KeyError) as e:  # ml_collections: a key the config does not have
    raw = str(e.args[0] if e.args else e).replace('\\n', '\n')
    parts = [p.strip(' \'"\\') for p in raw.split('\n') if p.strip(' \'"\\')]
    hint = f'. {parts[1]}' if len(parts) > 1 else ''
    sys.exit(f"error: unknown config key '{parts[0] if parts else raw}'{hint} "
             '(every key is listed in dca_jax/config_lib.py)')
  except (TypeError, ValueError) as e:
    sys.exit(f'error: bad config override: {" ".join(str(e).split())}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
