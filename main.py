"""dca_jax: DCAL (fine-grained classification and Re-ID) in JAX.

  python main.py --config configs/demo.py --workdir runs/demo              # train (resumes)
  python main.py --workdir runs/demo --mode eval                           # -> eval.json
  python main.py --workdir runs/demo --mode predict --images a.jpg,photos/
  python main.py --workdir runs/demo --mode export                         # -> export/
  python main.py --config configs/cub.py --workdir runs/plan --mode plan --target_config h100.txtpb

Modes (--mode):
  train      train --config into --workdir; run again, it resumes from the last checkpoint
  eval       score a checkpoint on the test split -> WORKDIR/eval.json (--eval_out)
  visualize  attention pictures (FGVC) or ranked galleries (Re-ID) -> WORKDIR/visualize/
  predict    top-5 classes (FGVC) or features (Re-ID) of --images -> predictions.jsonl (--out)
  embed      Re-ID features of --images -> WORKDIR/embeddings.npz (--out)
  search     rank --gallery for each of --images (Re-ID) -> search.jsonl + pictures (--out);
             either may be an .npz of features (both: no model, no --config); --index
  plan       which batch x accumulation x remat fits a GPU or TPU (--target_config)
  export     the checkpoint as StableHLO and ONNX -> WORKDIR/export/ (--format)

The modes after train read the run in --workdir (its config.json when --config is not given).
A mistake in the command or the data is one `error:` line and exit status 1.
"""

import errno
import os
import sys

# TensorFlow (input pipeline only) must not grab GPU memory or print its start-up noise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'All modes: the experiment, configs/*.py[:arg] or a JSON config (a run\'s '
    'config.json); override any knob with --config.KNOB=VALUE. Modes that read a trained '
    '--workdir take its config.json without it; predict, embed, search --exported need none.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'All modes: the run\'s folder (checkpoints, '
                               'metrics and what each mode writes).')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'eval', 'visualize', 'predict', 'embed', 'search', 'plan',
                           'export'],
                          'What to run (one line each above).')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'],
                                'eval, visualize, predict, embed, search, export: the checkpoint '
                                'to restore.')
_FORMAT = flags.DEFINE_string('format', 'stablehlo,onnx',
                              'export: the files to write into WORKDIR/export/ (comma-separated).')
_EXPORTED = flags.DEFINE_string(
    'exported', '', 'predict, embed, search: serve this exported model.onnx / model.stablehlo '
    'instead of the checkpoint (no model is built, no config needed).')
_GALLERY = flags.DEFINE_string('gallery', '', 'search: the folder of images to rank (identity '
                               'folders DIR/<identity>/... name each image\'s identity), or an '
                               '.npz of their features (features [N, D], optionally paths, ids: '
                               'what --mode embed writes).')
_INDEX = flags.DEFINE_enum('index', 'auto', ['auto', 'flat', 'ivf', 'hnsw'],
                           'search: the gallery\'s index, saved in WORKDIR/search_index/ and '
                           'reused: flat (exact), ivf or hnsw (approximate, tuned for recall@10 '
                           '0.99); auto: flat up to 1,000,000 gallery items, ivf above.')
_TOP_K = flags.DEFINE_integer('top_k', 10, 'search: gallery images kept per query.')
_IMAGES = flags.DEFINE_list(
    'images', [], 'predict, embed, search (the queries), visualize: image files, folders (read '
    'recursively) or globs, comma-separated; search: or one .npz of features, as --gallery.')
_OUT = flags.DEFINE_string(
    'out', '', 'predict, embed, search: the file written, in --workdir unless absolute '
    '(default predictions.jsonl, embeddings.npz, search.jsonl; search draws its pictures into '
    'the folder of that name without .jsonl). A run that fails leaves the old file as it was.')
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
_COORDINATOR = flags.DEFINE_string('coordinator_address', '',
                                   'train, eval on several hosts: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0,
                                      'train, eval on several hosts: the number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1,
                                   'train, eval on several hosts: this process\'s index.')
flags.mark_flags_as_required(['workdir'])

ROOT = os.path.dirname(os.path.abspath(__file__))
JSON_CONFIG = os.path.join(ROOT, 'configs', 'from_json.py')
# The modes that read a trained run: without --config they take WORKDIR/config.json.
READS_A_RUN = ('eval', 'visualize', 'predict', 'embed', 'search', 'export')
SERVES_EXPORTED = ('predict', 'embed', 'search')


def features_only(mode: str, images, gallery) -> bool:
  """A search of stored features: --images and --gallery each one .npz (no model is loaded)."""
  images = [e.strip() for e in (images or []) if e.strip()]
  return (mode == 'search' and len(images) == 1 and images[0].lower().endswith('.npz')
          and (gallery or '').strip().lower().endswith('.npz'))


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
    images = (_flag_value(argv, 'images')[0] or '').split(',')
    if (mode not in READS_A_RUN or not workdir or exported
        or features_only(mode, images, _flag_value(argv, 'gallery')[0])):
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
    out = _OUT.value or 'predictions.jsonl'
    if _EXPORTED.value:
      return predict.run_predict_exported(_EXPORTED.value, workdir, _IMAGES.value, out=out)
    return predict.run_predict(config, workdir, _IMAGES.value, which, out=out)
  if mode in ('embed', 'search'):
    from dca_jax import search
    if mode == 'embed':
      return search.run_embed(config, workdir, _IMAGES.value, which, exported=_EXPORTED.value,
                              out=_OUT.value or 'embeddings.npz')
    return search.run_search(config, workdir, _IMAGES.value, _GALLERY.value, which,
                             exported=_EXPORTED.value, top=_TOP_K.value,
                             out=_OUT.value or 'search.jsonl', index=_INDEX.value)
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


def _missing_dirs(path: str) -> list:
  """`path` and those of its parents that do not exist yet, deepest first."""
  missing, path = [], os.path.abspath(path)
  while path and not os.path.exists(path):
    missing.append(path)
    parent = os.path.dirname(path)
    path = '' if parent == path else parent
  return missing


def _remove_if_empty(created: list) -> None:
  """After a failed mode: the folders it created (`_missing_dirs` before it ran) removed when
  they hold no file, so a mistake in the command or the data leaves nothing behind. A folder
  holding any file is kept as it is."""
  if not created or not os.path.isdir(created[0]):
    return
  walk = list(os.walk(created[0], topdown=False))   # deepest folders first
  if any(files for _, _, files in walk):
    return
  try:
    for folder in [root for root, _, _ in walk] + created[1:]:
      os.rmdir(folder)  # only an empty folder: anything written meanwhile stops it
  except OSError:
    pass


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
  if (_CONFIG.value is None and not _EXPORTED.value
      and not features_only(_MODE.value, _IMAGES.value, _GALLERY.value)):
    sys.exit(f'error: --mode {_MODE.value} needs --config (an experiment file, e.g. '
             'configs/cub.py)')
  created = _missing_dirs(_WORKDIR.value)
  try:
    distributed.initialize_multihost(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    run_mode(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except errors.ONE_LINE as e:
    _remove_if_empty(created)
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
