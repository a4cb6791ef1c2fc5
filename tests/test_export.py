"""--mode export: a tiny FGVC DCAL (GLCA pooling over its top-R selection, so the exported graph
holds the rollout and the top-k) and a tiny Re-ID DCAL (after_bn, flip, L2 normalisation) are
exported to StableHLO and ONNX; onnxruntime and `jax.export.deserialize` run the files on JPEG
files written here, decoded and resized as eval does, at batch 1 and 5, against the jitted
predict of the restored checkpoint."""

import ast
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, count_build, subprocess_env, tiny_config, tiny_reid_config
from PIL import Image

from dca_jax import checkpoint, data, export, predict, serving, train

pytestmark = pytest.mark.slow

# Probabilities and unit-norm features: float32 rounding differs between XLA and onnxruntime's
# kernels (measured up to ~1e-7 here); 1e-5 leaves room and still fails on any real change.
ATOL = 1e-5
FGVC_OUTPUTS = ('probs', 'sa_probs', 'glca_probs')


def _checkpoint(config, workdir):
  """An initialised model saved as step 0: restored like any trained run (no train step to
  compile; the weights are random, the heads not zero, so the predictions differ per image).
  The BN necks' running statistics are moved off their initial mean 0 / variance 1, where the
  neck is nearly the identity and after_bn could not be told from before_bn."""
  trainer = train.Trainer(config, str(workdir))
  if trainer.state.batch_stats is not None:
    rng = np.random.default_rng(1)

    def moved(path, x):
      if jax.tree_util.keystr(path).endswith("['var']"):
        return x * rng.uniform(0.3, 3.0, x.shape).astype(np.float32)
      return x + rng.normal(0.0, 0.5, x.shape).astype(np.float32)

    trainer.state = trainer.state.replace(
        batch_stats=jax.tree_util.tree_map_with_path(moved, trainer.state.batch_stats))
  trainer.save()
  trainer.checkpointer.close()


def _jpegs(folder, sizes):
  """JPEG files of odd sizes (resized and cropped by the eval transform, not just decoded)."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate(sizes):
    # smooth colour fields with noise: like photos, unlike white noise, they survive JPEG
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + 2 * i)], -1)
    pixels = np.clip(127.5 + 100 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    path = folder / f'img_{i}.jpg'
    Image.fromarray(pixels).save(path, quality=90)
    paths.append(str(path))
  return paths


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Both models checkpointed and exported (FGVC through main.py, Re-ID in process, overlapped),
  the JPEG crops, and each model's jitted predict outputs on them."""
  count_build('test_export.runs')
  root = tmp_path_factory.mktemp('export')
  fgvc = tiny_config(glca_pool='mean')
  reid = tiny_reid_config(data_dir=str(root / 'reid_data'), reid_feature='after_bn',
                          reid_flip_test=True)
  _checkpoint(fgvc, root / 'fgvc')
  _checkpoint(reid, root / 'reid')
  cli = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'main.py'), '--config',
       os.path.join(ROOT, 'tests', 'tiny_config.py'), '--config.glca_pool=mean',
       '--workdir', str(root / 'fgvc'), '--mode', 'export'],
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  export.run_export(reid, str(root / 'reid'))
  paths = _jpegs(root / 'jpegs', [(40, 52), (64, 48), (33, 70), (90, 90), (36, 36)])
  runs = {}
  for name, config, outputs in (('fgvc', fgvc, FGVC_OUTPUTS), ('reid', reid, ('feature',))):
    images = np.stack([data.load_image_for_eval(p, predict.eval_transform(config)) for p in paths])
    predictor = predict.Predictor(config, str(root / name), outputs=outputs)
    runs[name] = {'config': config, 'workdir': str(root / name), 'images': images,
                  'want': predictor(images), 'dir': str(root / name / 'export')}
  stdout, stderr = cli.communicate(timeout=600)
  assert cli.returncode == 0, stderr[-3000:]
  runs['fgvc']['cli'] = stdout
  runs['paths'] = paths
  return runs


def _runtimes(run):
  """{format: ExportedModel} of a run's export directory (one session each for the module)."""
  if 'runtimes' not in run:
    run['runtimes'] = {fmt: serving.ExportedModel(os.path.join(run['dir'], serving.FILES[fmt]))
                       for fmt in export.FORMATS}
  return run['runtimes']


@pytest.mark.parametrize('batch', [1, 5])
def test_fgvc_files_reproduce_the_jax_prediction(runs, batch):
  run = runs['fgvc']
  images, want = run['images'][:batch], {k: v[:batch] for k, v in run['want'].items()}
  for fmt, model in _runtimes(run).items():
    got = model(images)
    assert sorted(got) == sorted(FGVC_OUTPUTS), fmt
    for key in FGVC_OUTPUTS:
      assert got[key].shape == want[key].shape == (batch, 4), (fmt, key)
      np.testing.assert_allclose(got[key], want[key], rtol=0, atol=ATOL, err_msg=f'{fmt} {key}')
      np.testing.assert_array_equal(got[key].argmax(-1), want[key].argmax(-1), f'{fmt} {key}')
  # the images are told apart (a constant output would pass the comparisons above)
  if batch > 1:
    assert len(set(want['probs'].argmax(-1).tolist())) > 1 or np.ptp(want['probs'], 0).max() > 1e-3


@pytest.mark.parametrize('batch', [1, 5])
def test_reid_files_reproduce_the_evaluated_feature(runs, batch):
  run = runs['reid']
  images, want = run['images'][:batch], run['want']['feature'][:batch]
  for fmt, model in _runtimes(run).items():
    got = model(images)['feature']
    assert got.shape == want.shape == (batch, 64), fmt
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=fmt)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # reid_normalize
    if batch > 1:  # the same nearest neighbour for every image (retrieval's top-1)
      dist = lambda f: ((f[:, None] - f[None]) ** 2).sum(-1) + np.eye(len(f)) * 1e9  # noqa: E731
      np.testing.assert_array_equal(dist(got).argmin(1), dist(want).argmin(1), fmt)


def test_reid_export_averages_the_mirror_image(runs):
  """reid_flip_test reached the exported graph: its feature of a mirrored image is the same."""
  run = runs['reid']
  for fmt, model in _runtimes(run).items():
    got, mirrored = model(run['images'])['feature'], model(run['images'][:, :, ::-1])['feature']
    np.testing.assert_allclose(mirrored, got, rtol=0, atol=ATOL, err_msg=fmt)
  assert np.abs(run['want']['feature'][0] - run['want']['feature'][1]).max() > 1e-2


def test_preprocessing_json_describes_the_program(runs):
  with open(os.path.join(runs['fgvc']['dir'], serving.PREPROCESSING)) as f:
    fgvc = json.load(f)
  with open(os.path.join(runs['reid']['dir'], serving.PREPROCESSING)) as f:
    reid = json.load(f)
  assert fgvc['task'] == 'fgvc' and reid['task'] == 'reid'
  assert fgvc['input'] == {'name': 'images', 'shape': ['batch', 32, 32, 3], 'dtype': 'uint8',
                           'layout': 'NHWC', 'channels': 'RGB'}
  assert reid['input']['shape'] == ['batch', 32, 16, 3]
  assert fgvc['normalization']['mean'] == [0.485, 0.456, 0.406]
  assert fgvc['eval_transform'] == {'input_size': 32, 'input_width': 32, 'resize_size': 36,
                                    'test_crop': 'center_crop'}
  assert 'centre crop 32 x 32 (top 2, left 2)' in fgvc['host_preprocessing']
  assert sorted(fgvc['outputs']) == sorted(FGVC_OUTPUTS) and list(reid['outputs']) == ['feature']
  assert reid['outputs']['feature']['shape'] == ['batch', 64]
  assert fgvc['class_names'] == [f'class_{i:02d}' for i in range(4)]
  assert fgvc['step'] == reid['step'] == 0 and fgvc['checkpoint'] == 'latest'
  assert fgvc['files']['onnx']['opset'] == export.ONNX_OPSET
  assert fgvc['files']['stablehlo']['platforms'] == ['cpu', 'cuda', 'tpu']
  for meta, run in ((fgvc, runs['fgvc']), (reid, runs['reid'])):
    for fmt in export.FORMATS:
      assert meta['files'][fmt]['bytes'] == os.path.getsize(
          os.path.join(run['dir'], serving.FILES[fmt]))
      assert meta['check'][fmt]['max_abs_difference'] < ATOL, (meta['task'], fmt)
  assert 'onnx' in runs['fgvc']['cli'] and 'preprocessing ->' in runs['fgvc']['cli']


def test_predict_from_the_exported_files_prints_the_checkpoint_top5(runs, tmp_path, capsys):
  run = runs['fgvc']
  want = run['want']['probs']
  paths = runs['paths'][:3] + [str(tmp_path / 'missing.jpg')]
  for fmt in export.FORMATS:
    rows = predict.run_predict_exported(os.path.join(run['dir'], serving.FILES[fmt]),
                                       str(tmp_path / fmt), paths)
    assert rows[3] == {'file': paths[3], 'error': 'image file not found'}
    for row, probs in zip(rows[:3], want):
      assert row['top5'][0]['class'] == f'class_{int(probs.argmax()):02d}', fmt
      assert row['top5'][0]['prob'] == pytest.approx(float(probs.max()), abs=ATOL)
    assert os.path.isfile(tmp_path / fmt / 'predictions.jsonl')
  assert 'onnxruntime' in capsys.readouterr().out
  rows = predict.run_predict_exported(os.path.join(runs['reid']['dir'], 'model.stablehlo'),
                                     str(tmp_path / 'reid'), paths[:2])
  np.testing.assert_allclose([r['feature'] for r in rows], runs['reid']['want']['feature'][:2],
                             atol=ATOL)


def test_bad_input_is_one_line(runs, tmp_path, monkeypatch):
  run = runs['fgvc']
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in .*train into'):
    export.run_export(run['config'], str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match="unknown export format 'tflite'; --format takes stablehlo"):
    export.run_export(run['config'], run['workdir'], 'onnx,tflite')
  with pytest.raises(ValueError, match='expected a .onnx or .stablehlo file'):
    serving.ExportedModel(os.path.join(run['dir'], serving.PREPROCESSING))
  with pytest.raises(ValueError, match='no such file'):
    serving.ExportedModel(str(tmp_path / 'model.onnx'))
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)   # import fails as when not installed
  with pytest.raises(ValueError, match='needs the jax2onnx converter .* --no-deps jax2onnx') as e:
    export.run_export(run['config'], run['workdir'], 'onnx')
  assert '\n' not in str(e.value)
  monkeypatch.setitem(sys.modules, 'onnxruntime', None)
  with pytest.raises(ValueError, match='needs onnxruntime'):
    serving.ExportedModel(os.path.join(run['dir'], 'model.onnx'))


def test_the_docs_serving_snippet_runs_on_onnxruntime_alone(runs, tmp_path, monkeypatch, capsys):
  """docs/EXPORT.md's serve.py, run as written, on a PNG of the resize size (36 x 36): only the
  centre crop applies and PNG decodes alike everywhere, so it must give predict's numbers (a
  JPEG would not: TensorFlow decodes with libjpeg's fast IDCT, Pillow with the accurate one)."""
  import runpy  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'docs', 'EXPORT.md')) as f:
    code = f.read().split('```python serve.py\n', 1)[1].split('```', 1)[0]
  script = tmp_path / 'serve.py'
  script.write_text(code)
  path = str(tmp_path / 'square.png')
  Image.open(runs['paths'][4]).save(path)
  assert Image.open(path).size == (36, 36)
  crop = data.load_image_for_eval(path, predict.eval_transform(runs['fgvc']['config']))[None]
  probs = _runtimes(runs['fgvc'])['onnx'](crop)['probs'][0]  # = the checkpoint's (tests above)
  monkeypatch.setattr(sys, 'argv', [str(script), runs['fgvc']['dir'], path])
  runpy.run_path(str(script), run_name='__main__')
  printed = capsys.readouterr().out.strip().splitlines()[-1]
  top5 = ast.literal_eval(printed[len(path):].strip())  # a list of (class, probability)
  assert top5[0][0] == f'class_{int(probs.argmax()):02d}'
  assert [p for _, p in top5] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-4)
