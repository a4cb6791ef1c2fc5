"""visualize / predict: the heat map is GLCA's rollout, figures, top-5 tables, odd image files."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, count_build, subprocess_env, tiny_config
from PIL import Image

from dca_jax import predict, train, visualize
from dca_jax.models import dcal



def _predict_cli(workdir, *images):
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--config',
         os.path.join(ROOT, 'tests', 'tiny_config.py'), '--workdir', str(workdir),
         '--mode', 'predict', '--images=' + ','.join(images)]
  return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A trained tiny DCAL (2 steps), an SA-only baseline checkpoint, a few odd image files, and
  one `main.py --mode predict` subprocess (on a copy of the run) started early to overlap."""
  count_build('test_visualize.runs')
  root = tmp_path_factory.mktemp('vis')
  dcal_dir, sa_dir, files = root / 'dcal', root / 'sa_only', root / 'files'
  files.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (37, 45), dtype=np.uint8), 'L').save(files / 'gray.png')
  Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), 'RGBA').save(
      files / 'rgba.png')
  Image.fromarray(rng.integers(0, 256, (43, 61, 3), dtype=np.uint8), 'RGB').save(
      files / 'odd.jpg', quality=90)
  (files / 'not_an_image.png').write_bytes(b'this is text, not a PNG')
  train.train_and_evaluate(tiny_config(max_steps=2, save_every_steps=2), str(dcal_dir))
  cli_dir = root / 'cli'
  shutil.copytree(dcal_dir, cli_dir)
  cli_images = (str(files / 'missing.jpg'), str(files / 'odd.jpg'))
  cli = _predict_cli(cli_dir, *cli_images)
  # SA-only baseline (num_glca_layers=0, num_pwca_layers=0): an initialised checkpoint is
  # enough to draw (no training steps to compile). No config.json: visualize must take the
  # model from the checkpoint's own description.
  sa_config = tiny_config(num_glca_layers=0, num_pwca_layers=0)
  trainer = train.Trainer(sa_config, str(sa_dir))
  trainer.save()
  trainer.checkpointer.close()
  # Restoring + compiling a Predictor is the slow part: build each run's once for the module.
  cache, real = {}, visualize.Predictor

  def cached(config, workdir, which='latest'):
    key = (os.path.abspath(workdir), which)
    if key not in cache:
      cache[key] = real(config, workdir, which)
    return cache[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(visualize, 'Predictor', cached)
    yield {'dcal': str(dcal_dir), 'sa': str(sa_dir), 'files': files, 'cli': cli,
           'cli_images': cli_images}
  if cli.poll() is None:
    cli.kill()
    cli.wait()


# --- the pure functions --------------------------------------------------------------------------
def test_rollout_heatmap_blocks_normalised_and_upsampled():
  row = np.array([9.0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # CLS (dropped) then a 3x3 grid
  heat = visualize.rollout_heatmap(row, (3, 3), (7, 7))  # 7 px: cells of 3, 2, 2 px
  assert heat.shape == (7, 7) and heat.dtype == np.float32
  assert heat.min() == 0.0 and heat.max() == 1.0
  cells = (np.arange(1, 10).reshape(3, 3) - 1) / 8.0
  idx = np.minimum(np.arange(7) * 3 // 7, 2)
  np.testing.assert_allclose(heat, cells[idx[:, None], idx[None, :]], atol=1e-7)
  assert visualize.rollout_heatmap(np.ones(5), (2, 2), (4, 4)).max() == 0.0  # constant: no NaN
  assert visualize.selected_cells([0, 1, 6, 9], (3, 3)) == [(0, 0), (1, 2), (2, 2)]
  boxes = visualize.cell_boxes([(0, 0), (2, 2)], (3, 3), (7, 7))
  assert boxes[0][:2] == (-0.5, -0.5) and boxes[1][0] + boxes[1][2] == 6.5  # cover the image
  with pytest.raises(ValueError):
    visualize.rollout_heatmap(np.ones(9), (3, 3), (6, 6))


@pytest.mark.slow
def test_heatmap_is_the_rollout_glca_selects_from(runs):
  config = tiny_config()
  predictor = visualize.Predictor(config, runs['dcal'])
  examples = visualize._test_examples(predictor, 6)  # pylint: disable=protected-access
  out = predictor(np.stack([e['image'] for e in examples]))
  size, n = config.input_size, out['rollout'].shape[-1] - 1
  grid = visualize.token_grid(n)
  assert grid == (4, 4)
  r = dcal.num_selected(n, config.top_k_ratio)
  assert out['glca_index'].shape == (len(examples), 1 + r)
  cell_px = size // grid[0]
  for i in range(len(examples)):
    heat = visualize.rollout_heatmap(out['rollout'][i], grid, (size, size))
    assert heat.shape == (size, size) and heat.min() == 0.0 and heat.max() == 1.0
    # Upsampled by whole cells: each patch's block is constant.
    blocks = heat.reshape(grid[0], cell_px, grid[1], cell_px)
    assert np.all(blocks == blocks[:, :1, :, :1])
    cell_values = blocks[:, 0, :, 0]
    chosen = visualize.selected_cells(out['glca_index'][i], grid)
    assert len(set(chosen)) == r
    mask = np.zeros(grid, bool)
    mask[tuple(np.array(chosen).T)] = True
    # The outlined cells are exactly the R hottest cells of the drawn heat map.
    assert cell_values[mask].min() >= cell_values[~mask].max()
    hottest = np.argsort(-cell_values.reshape(-1), kind='stable')[:r]
    assert set(map(tuple, np.stack(np.unravel_index(hottest, grid), 1))) == set(chosen)
  # Probabilities: (softmax(SA) + softmax(GLCA)) / 2.
  np.testing.assert_allclose(out['probs'].sum(-1), 1.0, atol=1e-5)


def test_non_square_grid_heatmap_and_boxes():
  """A 256 x 128 person crop with patch 16: a 16 x 8 grid, row-major, boxes on the cells."""
  assert visualize.token_grid(128, (256, 128)) == (16, 8)
  assert visualize.token_grid(784, (448, 448)) == (28, 28)
  with pytest.raises(ValueError, match='grid'):
    visualize.token_grid(12, (256, 128))
  row = np.zeros(1 + 128)
  row[1 + 3 * 8 + 5] = 1.0                  # cell (3, 5)
  heat = visualize.rollout_heatmap(row, (16, 8), (256, 128))
  assert heat.shape == (256, 128)
  ys, xs = np.nonzero(heat)
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (48, 63, 80, 95)
  assert visualize.selected_cells(np.array([0, 1 + 3 * 8 + 5]), (16, 8)) == [(3, 5)]
  assert visualize.cell_boxes([(3, 5)], (16, 8), (256, 128)) == [(79.5, 47.5, 16.0, 16.0)]


def test_overlay_keeps_cold_pixels_and_colours_hot_ones():
  display = np.full((4, 4, 3), 100, np.uint8)
  heat = np.zeros((4, 4), np.float32)
  heat[0, 0] = 1.0
  out = visualize.overlay(display, heat)
  np.testing.assert_array_equal(out[1:, :], display[1:, :])   # heat 0: the image unchanged
  # heat 1: 0.35 x the image + 0.65 x jet's dark red (128, 0, 0)
  np.testing.assert_allclose(out[0, 0], 0.35 * 100 + 0.65 * np.array([127.5, 0, 0]), atol=1)


@pytest.mark.parametrize('correct,n,want', [
    ([True, False, True, True, False, True], 4, [0, 1, 2, 4]),
    ([True] * 5, 3, [0, 1, 2]),
    ([False, False, True], 2, [0, 2]),
    ([False] * 3, 2, [0, 1]),
])
def test_pick_correct_and_wrong_mixes_both(correct, n, want):
  assert visualize.pick_correct_and_wrong(correct, n) == want


# --- figures ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_visualize_writes_figures_and_side_by_side_comparison(runs):
  config = tiny_config()
  written = visualize.run_visualize(config, runs['dcal'], num_images=2)
  # One correct and one wrong prediction of the run, labelled, when the test split has both.
  predictor = visualize.Predictor(config, runs['dcal'])
  chosen = visualize._mixed_test_examples(predictor, 2)  # pylint: disable=protected-access
  probs = predictor(np.stack([e['image'] for e in chosen]))['probs']
  hits = [predictor.class_names[int(np.argmax(p))] == e['truth'] for p, e in zip(probs, chosen)]
  assert sorted(hits) == [False, True]
  for e, hit in zip(chosen, hits):
    assert e['title'].endswith(': correct' if hit else ': wrong')
  assert [os.path.basename(p) for p in written] == [f'{e["name"]}.png' for e in chosen]
  for p in written:
    with Image.open(p) as im:
      assert im.size == visualize.figure_size_px(2)  # input | rollout + GLCA boxes
  compared = visualize.run_visualize(config, runs['dcal'], num_images=2, compare_workdir=runs['sa'])
  assert len(compared) == 2
  for p in compared:
    with Image.open(p) as im:
      assert im.size == visualize.figure_size_px(3)  # input | DCAL | SA-only, side by side
      assert im.size[0] > visualize.figure_size_px(2)[0]
  files = runs['files']
  from_files = visualize.run_visualize(
      config, runs['dcal'], images=[str(files / 'odd.jpg'), str(files / 'missing.png')])
  assert [os.path.basename(p) for p in from_files] == ['odd.png']
  with pytest.raises(FileNotFoundError):
    visualize.run_visualize(config, runs['dcal'], compare_workdir=str(files / 'nope'))


# --- predict -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_top5_on_grayscale_rgba_and_odd_jpeg(runs, capsys):
  config = tiny_config()
  files = runs['files']
  paths = [str(files / n) for n in ('gray.png', 'rgba.png', 'odd.jpg', 'not_an_image.png')]
  rows = predict.run_predict(config, runs['dcal'], paths)
  captured = capsys.readouterr()
  assert f'error: {paths[3]}: cannot read image' in captured.err
  from dca_jax import data
  names = data.build_input(config).info.class_names
  with open(os.path.join(runs['dcal'], 'predictions.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert lines == rows and [r['file'] for r in lines] == paths
  for r in lines[:3]:
    probs = [c['prob'] for c in r['top5']]
    assert len(probs) == min(5, len(names))
    assert all(c['class'] in names for c in r['top5'])
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6 and min(probs) >= 0
    assert r['file'] in captured.out and r['top5'][0]['class'] in captured.out
  assert 'error' in lines[3] and 'top5' not in lines[3]
  with pytest.raises(ValueError, match='none of the 1'):
    predict.run_predict(config, runs['dcal'], [str(files / 'missing.png')])
  with pytest.raises(ValueError, match='--images'):
    predict.run_predict(config, runs['dcal'], [])


@pytest.mark.slow
def test_predict_cli_missing_file_is_one_line_and_others_run(runs):
  missing, good = runs['cli_images']
  out, err = runs['cli'].communicate(timeout=300)
  assert runs['cli'].returncode == 0, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert errors == [f'error: {missing}: image file not found'], err[-3000:]
  assert 'Traceback' not in err
  assert good in out and '1 of 2 image(s) predicted' in out
