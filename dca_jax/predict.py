"""The `predict` mode, and the one path from image files to a model's outputs.

  python main.py --config C --workdir W --mode predict --images a.jpg,b.png
  python main.py --workdir W --mode predict --exported W/export/model.onnx --images a.jpg

Shared by predict, visualize and serving an exported file: the files are read as the eval
stream reads its images (`load_images`: the task's eval transform; a file that cannot be read is
one `error: <file>: <reason>` line and is skipped), then batched through a model — a restored
checkpoint (`Predictor`) or an exported file (`serving.ExportedModel`), both callables
`uint8 [n, H, W, 3] -> {output: numpy}` — and written to W/predictions.jsonl (`--out`). The
file is replaced only by a run that predicted something (`write_atomically`): a failed run
leaves the previous one's file as it was.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
from typing import Sequence

import jax
import ml_collections
import numpy as np

from dca_jax import checks
from dca_jax import data
from dca_jax import inference
from dca_jax import serving
from dca_jax import tasks


# ============================================================================ image files
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def _folder_images(folder: str) -> tuple[list[str], int]:
  """(image files under `folder`, recursively, in sorted order; how many other files)."""
  taken, skipped = [], 0
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in sorted(names):
      if name.lower().endswith(IMAGE_SUFFIXES):
        taken.append(os.path.join(root, name))
      else:
        skipped += 1
  return sorted(taken), skipped


def image_paths(images, say=print) -> list[str]:
  """The image files named by `--images`: files as given (a missing one keeps its place: its
  error line comes when it is read), folders read recursively and globs expanded, each in
  sorted order; `say` gets one line per folder or glob with how many files were taken and
  skipped (not an image name). A glob that matches nothing is a ValueError (one line)."""
  paths = []
  for entry in (str(p).strip() for p in (images or ())):
    if not entry:
      continue
    if os.path.isdir(entry):
      taken, skipped = _folder_images(entry)
      say(f'images: {len(taken)} file(s) from {entry}' +
          (f' ({skipped} skipped: not an image name)' if skipped else ''))
      paths += taken
    elif any(c in entry for c in '*?[') and not os.path.exists(entry):
      matches = sorted(glob.glob(entry, recursive=True))
      if not matches:
        raise ValueError(f'--images {entry}: no file matches this pattern')
      taken = [m for m in matches if os.path.isfile(m) and m.lower().endswith(IMAGE_SUFFIXES)]
      say(f'images: {len(taken)} file(s) match {entry}' +
          (f' ({len(matches) - len(taken)} skipped: not an image file)'
           if len(matches) > len(taken) else ''))
      paths += taken
    else:
      paths.append(entry)
  return paths


def output_path(workdir: str, out: str) -> str:
  """Where a mode's `--out` file goes: in `workdir` unless `out` is an absolute path."""
  return os.path.join(workdir, out)


def write_atomically(path: str, write, suffix: str = '') -> None:
  """`write(temporary path)` then the file renamed to `path`, so that a run that fails half way
  leaves the previous file whole (`suffix`: one the writer needs on the name, e.g. '.npz')."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f'{path}.tmp{os.getpid()}{suffix}'
  try:
    write(temporary)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_jsonl(path: str, records) -> None:
  """One JSON object a line, replacing `path` only once all are written."""
  def write(temporary):
    with open(temporary, 'w') as f:
      for record in records:
        f.write(json.dumps(record) + '\n')
  write_atomically(path, write)


EMBED_OUTPUTS = ('feature', 'rollout', 'glca_index')   # embed and search (their pictures)
RANKING_OUTPUTS = ('rollout', 'glca_index')           # visualize's Re-ID query maps


def mode_outputs(config, mode: str) -> tuple[str, ...]:
  """The `inference.forward_fn` outputs `mode` (predict | embed | visualize) asks of `config`'s
  model; () where the mode refuses the task (embed of a classifier). The modes and the program
  compiler (dca_jax/programs.py) read this one table."""
  task = tasks.get(config.task)
  if mode == 'embed':
    return EMBED_OUTPUTS if 'feature' in task.export_outputs(config) else ()
  if mode == 'visualize' and task.PICTURES == 'rankings':
    return RANKING_OUTPUTS
  return Predictor.OUTPUTS


def eval_transform(config):
  """The task's eval transform bound to `config`: uint8 tensor [h, w, 3] -> the eval crop."""
  task = tasks.get(config.task)
  return lambda image: task.eval_transform(image, config)


def _reason(error: Exception, path: str) -> str:
  """The loader's message without the file name (the error line names it first)."""
  msg = str(error)
  for p in {path, os.fspath(path)}:
    msg = msg.replace(f' {p}:', ':').replace(f' {p}', '')
  return msg.strip().rstrip(':') or type(error).__name__


def load_images(paths: Sequence[str], transform) -> tuple[list, list]:
  """([(path, uint8 image)] of the readable files, [(path, reason)] of the others), each image
  as the eval stream makes it. Each failure is printed at once as `error: <file>: <reason>`."""
  ok, failed = [], []
  for path in paths:
    try:
      image = data.load_image_for_eval(path, transform)
    except data.ImageLoadError as e:
      reason = _reason(e, path)
      print(f'error: {path}: {reason}', file=sys.stderr, flush=True)
      failed.append((path, reason))
      continue
    ok.append((path, image))
  return ok, failed


# ============================================================================ a checkpoint
class Predictor:
  """A restored checkpoint and ONE jitted forward, reused for every image and batch (the
  predict and visualize modes). `config`: checked (dca_jax/checks.py)."""

  OUTPUTS = ('probs', 'rollout', 'glca_index')   # predict, and visualize's class pictures

  def __init__(self, config, workdir: str, which: str = 'latest', outputs=None):
    if jax.process_count() > 1:
      raise ValueError('visualize / predict run in a single process (no --num_processes)')
    restored = inference.load_for_inference(config, workdir, which)
    self.config, self.workdir, self.which = restored.config, workdir, which
    self.step = restored.step
    self.variables = restored.variables
    self.has_glca = int(config.num_glca_layers) > 0
    self.batch_size = max(1, int(config.eval_batch_size))
    self._forward = inference.jit_forward(restored.model, config, restored.dtype,
                                          outputs or self.OUTPUTS)

  @functools.cached_property
  def input(self):
    """The run's eval input (built when first asked: class names, test images)."""
    return data.build_input(self.config, with_train=False)

  @property
  def class_names(self) -> list:
    return list(self.input.info.class_names)

  @property
  def label(self) -> str:
    name = os.path.basename(os.path.normpath(self.workdir)) or self.workdir
    return f'{name} ({"SA+GLCA" if self.has_glca else "SA only"})'

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 [n, S, W, 3] -> numpy {'probs' [n, C], 'rollout' [n, 1+N], 'glca_index'?}.

    Batches of min(n, eval_batch_size), the last one padded: one shape, one compilation.
    """
    images = np.asarray(images, np.uint8)
    n = images.shape[0]
    b = min(n, self.batch_size)
    chunks = []
    for start in range(0, n, b):
      chunk = images[start:start + b]
      pad = b - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out = jax.device_get(self._forward(self.variables, chunk))
      chunks.append({k: np.asarray(v)[:b - pad] for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


# ============================================================================ results
def top_k(probs, class_names: Sequence[str], k: int) -> list[tuple[str, float]]:
  """The k most probable (class name, probability), descending."""
  p = np.asarray(probs, np.float64)
  order = np.argsort(-p, kind='stable')[:min(k, p.size)]
  return [(str(class_names[i]), float(p[i])) for i in order]


def format_table(rows: Sequence[dict]) -> str:
  """Readable top-k table of `predictions.jsonl`-style records."""
  lines = []
  width = max([len(c['class']) for r in rows for c in r.get('top5', ())] + [5])
  for r in rows:
    lines.append(r['file'])
    if 'error' in r:
      lines.append(f'    error: {r["error"]}')
    for rank, c in enumerate(r.get('top5', ()), 1):
      lines.append(f'    {rank}. {c["class"]:<{width}}  {100 * c["prob"]:6.2f}%')
  return '\n'.join(lines)


def _record(path: str, out: dict, i: int, class_names) -> dict:
  """One image's line of predictions.jsonl: its top-5 classes (FGVC) or its feature (Re-ID)."""
  if 'probs' in out:
    names = class_names or [str(k) for k in range(out['probs'].shape[-1])]
    return {'file': path, 'top5': [{'class': c, 'prob': p}
                                   for c, p in top_k(out['probs'][i], names, 5)]}
  return {'file': path, 'feature': [float(v) for v in out['feature'][i]]}


def predict_files(model, paths: Sequence[str], transform, class_names, out_path: str,
                  heading: str) -> list[dict]:
  """`model` (images -> outputs) on the image files: the table printed, the records written to
  `out_path` (unreadable files: an `error` record). Raises ValueError when no file is given or
  none is readable; then nothing is written (each unreadable file's line was said)."""
  if not paths:
    raise ValueError('--mode predict needs image files: --images a.jpg,b.png')
  loaded, failed = load_images(paths, transform)
  if not loaded:
    raise ValueError(f'none of the {len(paths)} image file(s) could be read: nothing written '
                     f'to {out_path}')
  results = {path: {'file': path, 'error': reason} for path, reason in failed}
  out = model(np.stack([image for _, image in loaded]))
  for i, (path, _) in enumerate(loaded):
    results[path] = _record(path, out, i, class_names)
  rows = [results[p] for p in paths]
  write_jsonl(out_path, rows)
  print(heading)
  if not any('feature' in r for r in rows):
    print(format_table(rows))
  else:
    for r in rows:
      print(f'{r["file"]}: ' + (f'error: {r["error"]}' if 'error' in r else
                                f'feature of dimension {len(r["feature"])}'))
  print(f'{len(loaded)} of {len(paths)} image(s) predicted -> {out_path}', flush=True)
  return rows


# ============================================================================ the mode
def run_predict(config, workdir: str, images, which: str = 'latest',
                out: str = 'predictions.jsonl') -> list[dict]:
  """Top-5 classes per image file of the restored checkpoint: printed as a table and written
  to WORKDIR/`out` (`output_path`)."""
  config = checks.checked(config)
  paths = image_paths(images)
  if not paths:
    raise ValueError('--mode predict needs image files: --images a.jpg,b.png')
  predictor = Predictor(config, workdir, which)
  heading = (f'top-5 predictions ({which} checkpoint, step {predictor.step}, '
             f'{"SA+GLCA" if predictor.has_glca else "SA"}):')
  return predict_files(predictor, paths, eval_transform(config), predictor.class_names,
                       output_path(workdir, out), heading)


def exported_transform(meta: dict):
  """The eval transform recorded in an export's preprocessing.json."""
  config = ml_collections.ConfigDict(dict(meta['eval_transform'], task=meta['task']))
  return eval_transform(config)


def run_predict_exported(exported: str, workdir: str, images,
                         out: str = 'predictions.jsonl') -> list[dict]:
  """`--mode predict --exported FILE`: the exported file serves the images (no dca_jax model is
  built); decoding and resizing follow preprocessing.json, as the eval stream does.

  FGVC: top-5 classes per image; Re-ID: the retrieval feature. Printed and written to
  WORKDIR/`out` (unreadable files: one error line each, as --mode predict)."""
  paths = image_paths(images)
  if not paths:
    raise ValueError('--mode predict needs image files: --images a.jpg,b.png')
  meta = serving.read_preprocessing(exported)
  model = serving.ExportedModel(exported)
  heading = f'{model.runtime} on {exported} (step {meta.get("step")}):'
  return predict_files(model, paths, exported_transform(meta), meta.get('class_names'),
                       output_path(workdir, out), heading)
