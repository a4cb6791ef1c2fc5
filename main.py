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

import dataclasses
import difflib
import errno
import os
import re
import sys
from typing import Callable

# TensorFlow (input pipeline only) must not grab GPU memory or print its start-up noise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from dca_jax import config_files, errors  # noqa: E402  (neither imports jax: see prepare)

_CONFIG = flags.DEFINE_string(
    'config', None, 'All modes: the experiment, configs/*.py[:arg] or a JSON config (a run\'s '
    'config.json); override any knob with --config.KNOB=VALUE. Modes that read a trained '
    '--workdir take its config.json without it; predict, embed, search --exported need none.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'All modes: the run\'s folder (checkpoints, '
                               'metrics and what each mode writes).')
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


def features_only(mode: str, images, gallery) -> bool:
  """A search of stored features: --images and --gallery each one .npz (no model is loaded)."""
  images = [e.strip() for e in (images or []) if e.strip()]
  return (mode == 'search' and len(images) == 1 and images[0].lower().endswith('.npz')
          and (gallery or '').strip().lower().endswith('.npz'))


# The modes: each reads its flags, its module imported only when it runs.
# pylint: disable=g-import-not-at-top
def _train(config, workdir):
  from dca_jax import train
  return train.train_and_evaluate(config, workdir)


def _eval(config, workdir):
  from dca_jax import evaluate
  return evaluate.run_eval(config, workdir, _CHECKPOINT.value, output=_EVAL_OUT.value)


def _visualize(config, workdir):
  from dca_jax import visualize
  return visualize.run_visualize(config, workdir, images=_IMAGES.value,
                                 num_images=_NUM_IMAGES.value, compare_workdir=_COMPARE.value,
                                 which=_CHECKPOINT.value)


def _predict(config, workdir):
  from dca_jax import predict
  out = _OUT.value or 'predictions.jsonl'
  if _EXPORTED.value:
    return predict.run_predict_exported(_EXPORTED.value, workdir, _IMAGES.value, out=out)
  return predict.run_predict(config, workdir, _IMAGES.value, _CHECKPOINT.value, out=out)


def _embed(config, workdir):
  from dca_jax import search
  return search.run_embed(config, workdir, _IMAGES.value, _CHECKPOINT.value,
                          exported=_EXPORTED.value, out=_OUT.value or 'embeddings.npz')


def _search(config, workdir):
  from dca_jax import search
  return search.run_search(config, workdir, _IMAGES.value, _GALLERY.value, _CHECKPOINT.value,
                           exported=_EXPORTED.value, top=_TOP_K.value,
                           out=_OUT.value or 'search.jsonl', index=_INDEX.value)


def _plan(config, workdir):
  from dca_jax import plan
  return plan.run_plan(config, workdir, _TARGETS.value, topology=_TOPOLOGY.value)


def _export(config, workdir):
  from dca_jax import export
  return export.run_export(config, workdir, _FORMAT.value, _CHECKPOINT.value)
# pylint: enable=g-import-not-at-top


@dataclasses.dataclass(frozen=True)
class Mode:
  run: Callable          # (config, workdir)
  reads_a_run: bool = False      # no --config: the run's WORKDIR/config.json
  serves_exported: bool = False  # --exported FILE instead of the checkpoint (no config)


MODES = {
    'train': Mode(_train), 'eval': Mode(_eval, reads_a_run=True),
    'visualize': Mode(_visualize, reads_a_run=True),
    'predict': Mode(_predict, reads_a_run=True, serves_exported=True),
    'embed': Mode(_embed, reads_a_run=True, serves_exported=True),
    'search': Mode(_search, reads_a_run=True, serves_exported=True),
    'plan': Mode(_plan), 'export': Mode(_export, reads_a_run=True),
}
_MODE = flags.DEFINE_enum('mode', 'train', list(MODES), 'What to run (one line each above).')
flags.mark_flags_as_required(['workdir'])


def _check_flags(mode: Mode, args) -> None:
  """ValueError for a flag main.py does not know (--config.KEY overrides are the loader's) or
  --exported given to a mode that serves nothing."""
  for arg in args:
    name = re.match(r'--?([A-Za-z][\w-]*)', arg)
    if name and not re.match(r'--?(no)?config\.', arg):
      close = difflib.get_close_matches(name.group(1), list(flags.FLAGS), n=1)
      hint = f' (did you mean --{close[0]}?)' if close else ' (--help lists the flags)'
      raise ValueError(f'unknown flag --{name.group(1)}{hint}')
  if _EXPORTED.value and not mode.serves_exported:
    served = ' / '.join(name for name, m in MODES.items() if m.serves_exported)
    raise ValueError(f'--exported serves a file in --mode {served}, not --mode {_MODE.value}')


def _config(mode: Mode, overrides):
  """The config the mode runs with, checked and the host tuned for it (None: it needs none)."""
  needed = not (_EXPORTED.value or features_only(_MODE.value, _IMAGES.value, _GALLERY.value))
  config, said = config_files.load(_CONFIG.value, overrides,
                                   run_dir=_WORKDIR.value if needed and mode.reads_a_run else None)
  if config is None and needed:
    raise errors.ConfigError(f'--mode {_MODE.value} needs --config (an experiment file, e.g. '
                             'configs/cub.py)')
  if said:
    print(said, flush=True)
  return config_files.prepare(config)   # before jax loads: see dca_jax/config_files.py


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


def _run(mode: Mode, config) -> None:
  """Runs the mode: a mistake in the data or the run is one line, and leaves no new workdir."""
  from dca_jax import distributed  # pylint: disable=g-import-not-at-top
  created = _missing_dirs(_WORKDIR.value)
  try:
    distributed.initialize_multihost(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    mode.run(config, _WORKDIR.value)
  except errors.ONE_LINE as e:
    _remove_if_empty(created)
    sys.exit(f'error: {e}')
  except OSError as e:  # a full disk outside a checkpoint save (metrics, config.json)
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    sys.exit(f'error: {os.strerror(e.errno).lower()} writing {e.filename or "to --workdir"}; '
             'free space and run the same command to resume from the last checkpoint')


def main(argv):
  """argv: what parse_flags left, the --config.KEY=VALUE overrides."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TF log every step at INFO; -v 0 shows it
  mode = MODES[_MODE.value]
  try:
    _check_flags(mode, argv[1:])
    config = _config(mode, argv[1:])
  except ValueError as e:
    sys.exit(f'error: {e}')
  _one_line_warnings()
  _run(mode, config)


parse_flags = config_files.parse_known_flags   # main.py's flags; the rest: the overrides


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
