"""The `visualize` mode: attention-rollout maps, GLCA selections, Re-ID rankings.

  python main.py --config C --workdir W --mode visualize [--num_images 8] [--images a.jpg,b.png]
                 [--compare_workdir W_SA_ONLY] [--checkpoint best]

What is drawn is the task's `PICTURES`. 'classes' (FGVC): one PNG per image into W/visualize/:
the input crop, the SA attention-rollout heat map over it (exactly the CLS row the model uses to
choose GLCA's local queries, drawn per patch cell), the top-R cells GLCA selected outlined, and
the top-3 prediction against the truth; with --compare_workdir a second run (e.g. an SA-only
baseline) is drawn beside it. 'rankings' (Re-ID): per query, its rollout and its ranked gallery.
Images are read and predicted through the predict mode's path (predict.py). See
docs/VISUALIZE.md.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from dca_jax import checkpoint as ckpt_lib
from dca_jax import checks
from dca_jax import config_lib
from dca_jax import data
from dca_jax import evaluators
from dca_jax import inference
from dca_jax import tasks
from dca_jax.drawing import (attention_picture, cell_boxes, overlay, ranking_picture,
                             rollout_heatmap, selected_cells, token_grid)
from dca_jax.evaluators import retrieval
from dca_jax import predict
from dca_jax.predict import Predictor, eval_transform, image_paths, load_images, top_k
from dca_jax.reid import metrics

# Figure geometry in pixels (fixed, so a figure's pixel size is known: `figure_size_px`).
DPI = 100
PANEL_PX = 360      # each square image panel
MARGIN_PX = 12      # left/right/between panels
TITLE_PX = 46       # above the panels
TEXT_PX = 84        # below the panels: top-3 predictions


def figure_size_px(num_panels: int) -> tuple[int, int]:
  """(width, height) in pixels of a figure with `num_panels` square image panels."""
  return (num_panels * PANEL_PX + (num_panels + 1) * MARGIN_PX, TITLE_PX + PANEL_PX + TEXT_PX)


# ============================================================================ visualize
def _model_config(config, workdir: str):
  """`config` with the model/preprocessing knobs of the run in `workdir`: its config.json,
  then the model description stored in its latest checkpoint (authoritative for the shapes)."""
  c = ml_collections.ConfigDict(config.to_dict())
  saved = {}
  path = os.path.join(workdir, 'config.json')
  if os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
  if os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    ck = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
      step = ck.latest_step()
      meta = ck.read_meta(step) if step is not None else {}
    except Exception:  # pylint: disable=broad-except  (a damaged step: named when restored)
      meta = {}
    finally:
      ck.close()
    saved.update({k: v for k, v in meta.items() if k in c})
    if 'precision_loss_scale' in meta and meta['precision_loss_scale'] != (
        saved.get('precision', c.precision) == 'fp16'):
      saved['precision'] = 'fp16' if meta['precision_loss_scale'] else 'auto'
  for key in (config_lib.MODEL_SHAPE_KEYS + config_lib.MODEL_BEHAVIOUR_KEYS
              + ('resize_size', 'test_crop', 'normalization', 'precision', 'attention_impl')):
    if key in saved:
      value = saved[key]
      if key == 'backbone_overrides':
        value = ml_collections.ConfigDict(value or {})
      c[key] = value
  return c


def _same_preprocessing(a, b) -> bool:
  """Whether two configs crop images alike (each model normalises the uint8 crop itself)."""
  keys = ('input_size', 'input_width', 'resize_size', 'test_crop')
  return all(a.get(k) == b.get(k) for k in keys)


def _test_examples(predictor: Predictor, num_images: int, indices=None) -> list[dict]:
  """The first `num_images` test images (or those with the given `indices`), in split order."""
  want = None if indices is None else set(indices)
  found = {}
  for batch in predictor.input.eval_iter(with_index=True):
    for image, label, mask, index in zip(batch['image'], batch['label'], batch['mask'],
                                         batch['index']):
      if not mask or (want is not None and int(index) not in want):
        continue
      found[int(index)] = {
          'name': f'test_{int(index):05d}', 'title': f'test image #{int(index)}',
          'image': image, 'display': image,
          'truth': predictor.class_names[int(label)]}
      if len(found) == (num_images if want is None else len(want)):
        break
    else:
      continue
    break
  return [found[i] for i in (sorted(found) if indices is None else indices) if i in found]


def pick_correct_and_wrong(correct: Sequence[bool], num_images: int) -> list[int]:
  """Positions of up to `num_images` examples, alternating correct and wrong predictions in
  split order (half each where both exist, the rest from whichever has more), sorted."""
  right = [i for i, c in enumerate(correct) if c]
  wrong = [i for i, c in enumerate(correct) if not c]
  take_wrong = min(len(wrong), max(num_images - len(right), num_images // 2))
  return sorted(right[:num_images - take_wrong] + wrong[:take_wrong])


def _mixed_test_examples(predictor: Predictor, num_images: int) -> list[dict]:
  """`num_images` test images with correct and wrong predictions of `predictor`, labelled,
  chosen among the first max(64, 8·num_images) test images."""
  pool = _test_examples(predictor, max(64, 8 * num_images))
  if not pool:
    return []
  probs = predictor(np.stack([e['image'] for e in pool]))['probs']
  correct = [predictor.class_names[int(np.argmax(p))] == e['truth'] for p, e in zip(probs, pool)]
  chosen = pick_correct_and_wrong(correct, num_images)
  for i in chosen:
    pool[i]['title'] += ': correct' if correct[i] else ': wrong'
  return [pool[i] for i in chosen]


def _file_examples(paths, config) -> tuple[list[dict], list]:
  loaded, failed = load_images(paths, eval_transform(config))
  names, examples = set(), []
  for path, image in loaded:
    stem = os.path.splitext(os.path.basename(path))[0] or 'image'
    name, k = stem, 1
    while name in names:
      name, k = f'{stem}_{k}', k + 1
    names.add(name)
    examples.append({'name': name, 'title': os.path.basename(path), 'path': path,
                     'image': image, 'display': image, 'truth': None})
  return examples, failed


def _draw_map(ax, display, out: dict, i: int, *, class_names, truth):
  """Heat map over the image + GLCA boxes of image i on `ax`; the top-3 prediction below it."""
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  image_hw = display.shape[:2]
  grid = token_grid(out['rollout'].shape[-1] - 1, image_hw)
  ax.imshow(overlay(display, rollout_heatmap(out['rollout'][i], grid, image_hw)))
  if 'glca_index' in out:
    cells = selected_cells(out['glca_index'][i], grid)
    for x0, y0, w, h in cell_boxes(cells, grid, image_hw):
      ax.add_patch(patches.Rectangle((x0, y0), w, h, fill=False, edgecolor='white',
                                     linewidth=1.4))
    what = f'rollout + GLCA top-{len(cells)} of {grid[0] * grid[1]} patches'
  else:
    what = 'attention rollout (no GLCA)'
  lines = []
  for rank, (name, p) in enumerate(top_k(out['probs'][i], class_names, 3), 1):
    mark = '' if truth is None else ('  \u2713' if name == truth else '  \u2717')
    lines.append(f'{rank}. {name}  {p:.2f}{mark}')
  return what, '\n'.join(lines)


def _save_figure(path: str, example: dict, models: Sequence[tuple]) -> None:
  """One figure: the input, then one heat-map panel per (predictor, outputs, example, i)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = 1 + len(models)
  w_px, h_px = figure_size_px(n)
  fig = plt.figure(figsize=(w_px / DPI, h_px / DPI), dpi=DPI)
  try:
    bottom = TEXT_PX / h_px
    height = PANEL_PX / h_px
    width = PANEL_PX / w_px

    def axes(k):
      ax = fig.add_axes([(MARGIN_PX + k * (PANEL_PX + MARGIN_PX)) / w_px, bottom, width, height])
      ax.set_xticks([])
      ax.set_yticks([])
      return ax

    truth = example['truth']
    ax = axes(0)
    ax.imshow(example['display'])
    ax.set_title(f'{example["title"]}\ntruth: {truth if truth is not None else "unknown"}',
                 fontsize=9)
    for k, (predictor, out, ex, i) in enumerate(models, 1):
      ax = axes(k)
      what, text = _draw_map(ax, ex['display'], out, i, class_names=predictor.class_names,
                             truth=truth)
      ax.set_title(f'{predictor.label}\n{what}', fontsize=9)
      fig.text((MARGIN_PX + k * (PANEL_PX + MARGIN_PX)) / w_px, (TEXT_PX - 6) / h_px, text,
               ha='left', va='top', fontsize=9, family='DejaVu Sans')
    fig.savefig(path, dpi=DPI)
  finally:
    plt.close(fig)


def _split_images(input_data, config, split: str, wanted) -> dict:
  """{index: displayable uint8 image} of the wanted positions of a Re-ID split."""
  wanted, found = set(int(i) for i in wanted), {}
  for batch in input_data.eval_iter(split=split):
    for image, index, mask in zip(batch['image'], batch['index'], batch['mask']):
      if mask and int(index) in wanted:
        found[int(index)] = image
    if len(found) == len(wanted):
      break
  return found


def _draw_rankings(config, workdir: str, *, num_images: int = 8, top: int = 10,
                   which: str = 'latest') -> list[str]:
  """Per query: its rollout heat map and the top-`top` gallery images of the retrieval, framed
  green (same identity) or red; same-identity same-camera images are left out as in the
  evaluation. Queries whose rank-1 is right and wrong are both drawn, labelled.
  Writes WORKDIR/visualize/query_NNNNN.png; returns the paths."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  restored = inference.load_for_inference(config, workdir, which)
  input_data = data.build_input(config, with_train=False)
  evaluator = retrieval.Evaluator(evaluators.Context(
      config, restored.model, input_data, restored.mesh, restored.variables_sharding,
      restored.dtype))
  query = evaluator.features(restored.variables, 'query')
  gallery = evaluator.features(restored.variables, 'gallery')
  dist = metrics.distance_matrix(query['feature'], gallery['feature'])
  order, matches = metrics.ranked_gallery(dist, query['pid'], gallery['pid'], query['camid'],
                                          gallery['camid'], top)
  chosen = pick_correct_and_wrong(list(matches[:, 0]), num_images)
  queries = _split_images(input_data, config, 'query', query['index'][chosen])
  galleries = _split_images(input_data, config, 'gallery', gallery['index'][order[chosen]].ravel())
  images = np.stack([queries[int(query['index'][q])] for q in chosen])
  forward = inference.jit_forward(restored.model, config, restored.dtype,
                                  predict.mode_outputs(config, 'visualize'))
  out = jax.device_get(forward(restored.variables, images))
  out_dir = os.path.join(workdir, 'visualize')
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for row, q in enumerate(chosen):
    display = queries[int(query['index'][q])]
    glca = out['glca_index'][row] if 'glca_index' in out else None
    query_map = attention_picture(display, out['rollout'][row], glca)[:, display.shape[1]:]
    gallery_images = [galleries[int(gallery['index'][g])] for g in order[q]]
    picture = ranking_picture(display, query_map, gallery_images, matches[q])
    canvas = Image.new('RGB', (picture.shape[1], picture.shape[0] + 28), 'white')
    canvas.paste(Image.fromarray(picture), (0, 28))
    verdict = 'rank-1 correct' if matches[q, 0] else 'rank-1 wrong'
    ImageDraw.Draw(canvas).text(
        (4, 6), f'query #{int(query["index"][q])} (id {int(query["pid"][q])}, camera '
        f'{int(query["camid"][q])}): {verdict}; attention rollout + GLCA cells; top-{top} '
        f'gallery (green: same id)', fill=(0, 0, 0))
    path = os.path.join(out_dir, f'query_{int(query["index"][q]):05d}.png')
    canvas.save(path)
    written.append(path)
  print(f'visualize ({which} checkpoint, step {restored.step}): {len(written)} ranking(s) -> '
        f'{out_dir}', flush=True)
  return written


def _examples_per_model(predictors, config, paths, num_images: int) -> list[list[dict]]:
  """The examples each predictor draws: the files, or test images with correct and wrong
  predictions of the first; each model sees them preprocessed its own way (the same crop when
  the configs agree)."""
  per_model: list[list[dict]] = []
  if paths:
    examples, _ = _file_examples(paths, config)
    if not examples:
      raise ValueError(f'none of the {len(paths)} image file(s) could be read')
    per_model.append(examples)
    for predictor in predictors[1:]:
      if _same_preprocessing(config, predictor.config):
        per_model.append(examples)
      else:
        per_model.append(_file_examples([e['path'] for e in examples], predictor.config)[0])
    return per_model
  examples = _mixed_test_examples(predictors[0], num_images)
  if not examples:
    raise ValueError('the test split is empty: nothing to visualize')
  per_model.append(examples)
  indices = [int(e['name'].split('_')[1]) for e in examples]
  for predictor in predictors[1:]:
    per_model.append(examples if _same_preprocessing(config, predictor.config)
                     else _test_examples(predictor, len(indices), indices))
  return per_model


def run_visualize(config, workdir: str, *, images=(), num_images: int = 8,
                  compare_workdir: str = '', which: str = 'latest') -> list[str]:
  """Writes workdir/visualize/<name>.png per image; returns the paths written.

  Without `images`, `num_images` test images (truth known) with correct and wrong predictions
  of this run, labelled (`pick_correct_and_wrong`); with `images`, those
  files (truth unknown; unreadable ones are reported and skipped). `compare_workdir`: a second
  run (e.g. the SA-only baseline) drawn beside this one, restored with the model knobs of its
  own config.json.
  """
  config = checks.checked(config)
  paths = image_paths(images)
  if not paths and num_images <= 0:
    raise ValueError(f'--num_images={num_images}: draw at least one test image')
  if tasks.get(config.task).PICTURES == 'rankings':
    if paths or compare_workdir:
      raise ValueError('Re-ID visualize draws query rankings: --images and --compare_workdir '
                       'are for FGVC runs')
    return _draw_rankings(config, workdir, num_images=num_images, which=which)
  return _draw_classes(config, workdir, images=paths, num_images=num_images,
                       compare_workdir=compare_workdir, which=which)


def _draw_classes(config, workdir: str, *, images=(), num_images: int = 8,
                  compare_workdir: str = '', which: str = 'latest') -> list[str]:
  """FGVC figures (see `run_visualize`)."""
  paths = list(images)
  compare_workdir = (compare_workdir or '').strip()
  if compare_workdir and not os.path.isdir(compare_workdir):
    raise FileNotFoundError(f'--compare_workdir {compare_workdir}: no such directory')
  predictors = [Predictor(config, workdir, which)]
  if compare_workdir:
    predictors.append(Predictor(_model_config(config, compare_workdir), compare_workdir, which))

  per_model = _examples_per_model(predictors, config, paths, num_images)
  outputs = [predictor(np.stack([e['image'] for e in examples]))
             for predictor, examples in zip(predictors, per_model)]
  out_dir = os.path.join(workdir, 'visualize')
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for i, example in enumerate(per_model[0]):
    models = [(predictor, out, examples[i], i)
              for predictor, out, examples in zip(predictors, outputs, per_model)]
    path = os.path.join(out_dir, f'{example["name"]}.png')
    _save_figure(path, example, models)
    written.append(path)
  other = (f'; compared with {compare_workdir} step {predictors[1].step}'
           if compare_workdir else '')
  print(f'visualize ({which} checkpoint, step {predictors[0].step}{other}): '
        f'{len(written)} figure(s) -> {out_dir}', flush=True)
  return written
