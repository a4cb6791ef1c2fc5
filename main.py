"""dca_jax entry point: flags -> mode. Nothing else lives here.

  python main.py --config configs/cub.py --workdir DIR                 # train (resumes)
  python main.py --config configs/cub.py --workdir DIR --mode eval     # evaluate a checkpoint
  python main.py --config configs/cub.py --workdir DIR --mode export   # -> DIR/export/model.onnx
  python main.py --config configs/demo.py --workdir DIR --config.batch_size=8
  python main.py --config configs/cub.py --workdir DIR --mode plan \
      --target_config .../h100_sxm.txtpb                              # memory plan for a GPU

Each mode checks the config first (dca_jax/checks.py); any error a user can act on is one
`error:` line (dca_jax/errors.py) and exit status 1.
"""

import errno
import os
import sys

# TensorFlow (input pipeline only) must not grab GPU memory or print its start-up noise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config: configs/*.py[:arg], or a JSON config (a run\'s '
    'config.json). Not needed by the modes that read a workdir (its config.json is used) nor by '
    'predict --exported.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and outputs go here.')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'eval', 'visualize', 'predict', 'embed', 'search', 'plan',
                           'export'],
                          'What to run.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'],
                                'Which checkpoint eval/visualize/predict/export restore.')
_FORMAT = flags.DEFINE_string('format', 'stablehlo,onnx',
                              'export: the files to write into WORKDIR/export/ (comma-separated).')
_EXPORTED = flags.DEFINE_string(
    'exported', '', 'predict, embed, search: serve this exported model.onnx / model.stablehlo '
    'instead of the checkpoint (no model is built, no config needed).')
_GALLERY = flags.DEFINE_string('gallery', '', 'search: the folder of images to rank (identity '
                               'folders DIR/<identity>/... name each image\'s identity).')
_TOP_K = flags.DEFINE_integer('top_k', 10, 'search: gallery images kept per query.')
_IMAGES = flags.DEFINE_list(
    'images', [], 'predict/visualize: image files, folders (read recursively) or globs, '
    'comma-separated.')
_EVAL_OUT = flags.DEFINE_string('eval_out', 'eval.json',
                                'eval: the file in --workdir the results are written to.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8,
                                   'visualize: test images to draw without --images.')
_COMPARE = flags.DEFINE_string('compare_workdir', '', 'visualize: a second run drawn side by side.')
_TARGETS = flags.DEFINE_list(
    'target_config', [], 'plan: targets, comma-separated: GPU target spec files (XLA '
    'gpu_target_config .txtpb, e.g. from xla/backends/gpu/target_config/specs/) and/or Cloud TPU '
    'topologies as tpu:<name> (tpu:v5e:2x2; needs jax[tpu]); none = the attached devices.')
_TOPOLOGY = flags.DEFINE_string('topology', '1x1x1',
                                'plan, GPU specs: hosts x 1 x GPUs per host (1x1x8); a TPU '
                                'target names its own topology.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'Multi-host: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-host: this process index.')
flags.mark_flags_as_required(['workdir'])

ROOT = os.path.dirname(os.path.abspath(__file__))
JSON_CONFIG = os.path.join(ROOT, 'configs', 'from_json.py')
# The modes that read a trained run: without --config they take WORKDIR/config.json.
READS_A_RUN = ('eval', 'visualize', 'predict', 'embed', 'search', 'export')
SERVES_EXPORTED = ('predict', 'embed', 'search')


def _flag_value(argv, name: str):
  """The value of --name (as `--name=V` or `--name V`) in argv, and its position(s)."""
  for i, arg in enumerate(argv):
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1], (i, i + 2)
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1], (i, i + 1)
  return None, None


def _json_config(path: str) -> str:
  """The --config value that loads the JSON config at `path` (checked here: one line if bad)."""
  from dca_jax import config_lib, errors  # pylint: disable=g-import-not-at-top
  try:
    config_lib.load_json(path)
  except errors.ConfigError as e:
    sys.exit(f'error: {e}')
  return f'--config={JSON_CONFIG}:{os.path.abspath(path)}'


def config_argv(argv) -> tuple[list, str]:
  """argv with a JSON config (`--config x.json`, or the run's WORKDIR/config.json when a mode
  that reads a run has no --config) turned into the config file that loads it, so that
  `--config.KEY=VALUE` applies on top as for any config; and a line saying which was taken."""
  argv = list(argv)
  config, where = _flag_value(argv, 'config')
  if config is not None and not config.endswith('.json'):
    return argv, ''
  if config is None:
    mode = _flag_value(argv, 'mode')[0] or 'train'
    workdir = _flag_value(argv, 'workdir')[0]
    exported = _flag_value(argv, 'exported')[0]
    if mode not in READS_A_RUN or not workdir or exported:
      return argv, ''
    config = os.path.join(workdir, 'config.json')
    if not os.path.isfile(config):
      sys.exit(f'error: --config is needed: {config} does not exist (train into this --workdir '
               'first, or name the experiment file, e.g. --config configs/cub.py)')
    line = f'config: {config} (the run\'s own; --config.KEY=VALUE overrides apply on top)'
    return argv + [_json_config(config)], line
  argv[where[0]:where[1]] = [_json_config(config)]
  return argv, f'config: {config} (JSON; --config.KEY=VALUE overrides apply on top)'


def run_mode(mode: str, config, workdir: str):
  """Runs `mode` (each mode module imported only when it runs)."""
  # pylint: disable=g-import-not-at-top
  which = _CHECKPOINT.value
  if mode == 'train':
    from dca_jax import train
    return train.train_and_evaluate(config, workdir)
  if mode == 'eval':
    from dca_jax import evaluate
    return evaluate.run_eval(config, workdir, which, output=_EVAL_OUT.value)
  if mode == 'predict':
    from dca_jax import predict
    if _EXPORTED.value:
      return predict.run_predict_exported(_EXPORTED.value, workdir, _IMAGES.value)
    return predict.run_predict(config, workdir, _IMAGES.value, which)
  if mode in ('embed', 'search'):
    from dca_jax import search
    if mode == 'embed':
      return search.run_embed(config, workdir, _IMAGES.value, which, exported=_EXPORTED.value)
    return search.run_search(config, workdir, _IMAGES.value, _GALLERY.value, which,
                             exported=_EXPORTED.value, top=_TOP_K.value)
  if mode == 'visualize':
    from dca_jax import visualize
    return visualize.run_visualize(config, workdir, images=_IMAGES.value,
                                   num_images=_NUM_IMAGES.value, compare_workdir=_COMPARE.value,
                                   which=which)
  if mode == 'export':
    from dca_jax import export
    return export.run_export(config, workdir, _FORMAT.value, which)
  from dca_jax import plan
  return plan.run_plan(config, workdir, _TARGETS.value, topology=_TOPOLOGY.value)


def _one_line_warnings() -> None:
  """dca_jax's data warnings (skipped images, naming each file) as one `warning:` line each,
  not Python's two lines with a source line; every other warning as Python shows it."""
  import warnings  # pylint: disable=g-import-not-at-top
  from dca_jax import errors  # pylint: disable=g-import-not-at-top
  default = warnings.showwarning

  def show(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, errors.DataWarning):
      print(f'warning: {message}', file=file or sys.stderr, flush=True)
    else:
      default(message, category, filename, lineno, file, line)
  warnings.showwarning = show


def _keep_freed_memory(config):
  """CPU hosts: glibc keeps the memory XLA frees each step; one arena for large steps."""
  from dca_jax import config_lib, host_malloc  # pylint: disable=g-import-not-at-top
  try:
    large = config is not None and host_malloc.one_arena_pays(
        config_lib.activation_elements(config))
  except (KeyError, AttributeError, TypeError):   # a config the checks will reject
    large = False
  host_malloc.retain_freed_memory(one_arena=large)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TF log every step at INFO; -v 0 shows it
  _keep_freed_memory(_CONFIG.value)   # before jax loads: see dca_jax/host_malloc.py
  from dca_jax import distributed, errors  # pylint: disable=g-import-not-at-top
  _one_line_warnings()
  if _EXPORTED.value and _MODE.value not in SERVES_EXPORTED:
    sys.exit(f'error: --exported serves a file in --mode {" / ".join(SERVES_EXPORTED)}, not '
             f'--mode {_MODE.value}')
  if _CONFIG.value is None and not _EXPORTED.value:
    sys.exit(f'error: --mode {_MODE.value} needs --config (an experiment file, e.g. '
             'configs/cub.py)')
  try:
    distributed.initialize_multihost(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    run_mode(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except errors.ONE_LINE as e:
    sys.exit(f'error: {e}')
  except OSError as e:  # a full disk outside a checkpoint save (metrics, config.json)
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    sys.exit(f'error: {os.strerror(e.errno).lower()} writing {e.filename or "to --workdir"}; '
             'free space and run the same command to resume from the last checkpoint')


def parse_flags(argv):
  """absl's parser, with a wrong --config.KEY turned into one clear line instead of a traceback;
  a JSON config loaded through configs/from_json.py (`config_argv`)."""
  argv, line = config_argv(argv)
  try:
    parsed = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --help for usage.')
    sys.exit(f'error: {e}\nPass --help for usage.')
  except (AttributeError, KeyError) as e:  # ml_collections: a key the config does not have
    raw = str(e.args[0] if e.args else e).replace('\\n', '\n')
    parts = [p.strip(' \'"\\') for p in raw.split('\n') if p.strip(' \'"\\')]
    hint = f'. {parts[1]}' if len(parts) > 1 else ''
    sys.exit(f"error: unknown config key '{parts[0] if parts else raw}'{hint} "
             '(every key is listed in dca_jax/config_lib.py)')
  except (TypeError, ValueError) as e:
    sys.exit(f'error: bad config override: {" ".join(str(e).split())}')
  if line:
    print(line, flush=True)
  return parsed


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
