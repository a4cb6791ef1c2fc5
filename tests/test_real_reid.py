"""tools/real_reid.py: a Re-ID set of real handwriting (sklearn's bundled digits) written in
the official Market-1501 layout and read back by the project's Market-1501 reader."""

import json
import os

import numpy as np
import pytest

pytest.importorskip('sklearn')

from dca_jax import checks
from dca_jax.data import (
  fgvc_readers,
  reid_sources,  # noqa: E402
)
from tools import real_reid  # noqa: E402

SMALL = real_reid.Params(num_train_ids=20, images_per_train_id=5, num_test_ids=10,
                         gallery_per_test_id=3, num_distractors=6)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('digits_reid'))
  real_reid.write(out, SMALL, train_eval=True)
  return out


def test_market1501_reader_reads_what_was_planned(written):
  dataset = reid_sources.read_reid('market1501', written, True)
  assert dataset.num_train_ids == 20 and len(dataset.train) == 100
  assert len(dataset.query) == 10 and len(dataset.gallery) == 10 * 3 + 6
  assert (dataset.gallery.pids == 0).sum() == 6          # distractors, gallery only
  assert set(dataset.query.pids) <= set(dataset.gallery.pids)
  assert not set(dataset.train_pids) & set(dataset.query.pids)  # unseen test identities
  for pid in dataset.query.pids:                          # query camera not in its gallery
    q_cam = dataset.query.camids[dataset.query.pids == pid]
    assert q_cam[0] not in dataset.gallery.camids[dataset.gallery.pids == pid]
  meta = json.load(open(os.path.join(written, real_reid.MARKER)))
  train_numbers, test_numbers = meta['numbers']['train'], meta['numbers']['test']
  assert not set(train_numbers.values()) & set(test_numbers.values())


def test_train_ids_copy_holds_the_training_identities(written):
  dataset = reid_sources.read_reid('market1501', os.path.join(written, 'train_ids'), False)
  assert len(dataset.query) == 20 and len(dataset.query) + len(dataset.gallery) == 100
  assert set(dataset.query.pids) == set(dataset.gallery.pids)


def test_views_are_real_scans_of_the_numbers_digits():
  scans, labels = real_reid.load_scans()
  assert scans.shape == (1797, 8, 8) and set(labels) == set(range(10))
  camera = real_reid.cameras(0)[0]
  rng = np.random.default_rng(0)
  image = real_reid.render(rng, camera, [scans[0], scans[1], scans[2]], 64, 32)
  assert image.shape == (64, 32, 3) and image.dtype == np.uint8


def test_raw_pixels_do_not_find_the_identities(written):
  mean_ap, _ = real_reid.pixel_baseline(written)
  assert mean_ap < 0.5  # cameras dominate the pixels (full-size set: 0.63 %)


def test_bad_sizes_are_one_error_line(tmp_path):
  with pytest.raises(ValueError, match='identities'):
    real_reid.write(str(tmp_path), real_reid.Params(num_train_ids=900, num_test_ids=200))


def test_pretraining_set_is_an_imagefolder_of_train_half_scans_and_other_cameras(tmp_path):
  params = real_reid.PretrainParams(train_per_class=2, test_per_class=1)
  root = real_reid.write_pretrain(str(tmp_path), params)
  dataset = fgvc_readers.read_folder('imagefolder', root)
  assert dataset.class_names == [str(d) for d in range(10)]
  assert len(dataset.train.paths) == 20 and len(dataset.test.paths) == 10
  reid_cameras = real_reid.cameras(0)
  pretrain_cameras = [c for s in real_reid.PRETRAIN_CAMERA_SEEDS for c in real_reid.cameras(s)]
  assert not any(np.allclose(a.wall, b.wall) for a in reid_cameras for b in pretrain_cameras)


def _command_config(workdir):
  """The main.py run of docs/REID.md that writes runs/<workdir>, as main.py reads it: its config
  file with the command's --config.KEY=VALUE overrides (the shell's quotes removed)."""
  import re  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  from dca_jax import config_files  # pylint: disable=g-import-not-at-top
  text = open(os.path.join(ROOT, 'docs', 'REID.md')).read()
  spec, command = re.search(rf'python main.py --config (\S+) --workdir runs/{workdir} '
                            r'((?:.*\\\n)*.*)', text).groups()   # the lines the backslashes join
  overrides = [o.replace("'", '') for o in re.findall(r'--config\.\S+', command)]
  return checks.checked(config_files.load(os.path.join(ROOT, spec), overrides)[0])


def test_the_real_image_commands_validate():
  """The docs' main.py runs on the digits: the pretraining (an imagefolder classifier of the
  demo's backbone on a conv stem, SA only), the `fixed` recipe (the demo's model on the
  Re-ID set), the same from that pretraining, and the `imagenet` check (DeiT-T with its
  ImageNet weights at 128 x 64: 8 x 4 patches) are complete configs of what they say."""
  from dca_jax import config_lib, hub  # pylint: disable=g-import-not-at-top
  from dca_jax.models import vit  # pylint: disable=g-import-not-at-top
  pre = _command_config('digits_pretrain')
  assert (pre.task, pre.dataset, pre.num_glca_layers, pre.num_pwca_layers) == (
      'fgvc', 'imagefolder', 0, 0)
  assert (pre.input_size, pre.optimizer, pre.learning_rate) == (64, 'adamw', 1e-3)
  fixed = _command_config('digits_fixed')
  assert (fixed.task, fixed.dataset, fixed.data_source, fixed.num_classes) == (
      'reid', 'market1501', 'folder', 300)
  assert (fixed.data_dir, fixed.triplet_feature, fixed.num_epochs) == (
      'runs/digits_reid', 'batch_standardized', 120)
  stem = {'resnet_layers': [1], 'resnet_width': 32, 'patch_size': 2}   # the conv stem
  assert config_lib.backbone_overrides(pre) == {**config_lib.backbone_overrides(fixed), **stem}
  pretrained = _command_config('digits_pretrained')
  assert pretrained.pretrained_model == 'runs/digits_pretrain'
  assert config_lib.backbone_overrides(pretrained) == config_lib.backbone_overrides(pre)
  imagenet = _command_config('digits_imagenet')
  assert hub.parse(imagenet.pretrained_model).known.backbone == 'deit_tiny'
  variant = vit.get_variant(imagenet.backbone, config_lib.backbone_overrides(imagenet))
  assert (variant.depth, variant.grid_size(128), variant.grid_size(64)) == (12, 8, 4)
  assert (imagenet.data_dir, imagenet.num_classes) == ('runs/digits_reid', 300)
  assert imagenet.random_erasing == 0 and imagenet.optimizer == 'sgd'
