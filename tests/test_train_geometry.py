"""FGVC train geometry on a real photograph: a 448 x 448 crop of the 550 x 550 resize, mirrored
or not, at a random offset, as the paper's recipe says (METHOD.md). The reference resize is
PIL's antialiased bilinear (not the pipeline's TensorFlow resize); a real photo has no symmetry
or repeats that could make a wrong offset or a missing flip look right."""

import numpy as np
import pytest
from PIL import Image

from dca_jax.data import preprocess

RESIZE, CROP = 550, 448
SPAN = RESIZE - CROP + 1  # 103 possible offsets per axis


@pytest.fixture(scope='module')
def photo():
  datasets = pytest.importorskip('sklearn.datasets')
  image = datasets.load_sample_image('china.jpg')  # 427 x 640 x 3, a photo shipped with sklearn
  resized = np.asarray(Image.fromarray(image).resize((RESIZE, RESIZE), Image.BILINEAR), np.float32)
  # every candidate window's pixels on a sparse grid: [8, SPAN (top), 8, SPAN (left), 3]
  shifted = GRID[:, None] + np.arange(SPAN)[None, :]
  return image, resized, resized[shifted][:, :, shifted]


GRID = np.arange(0, CROP, 56)


def locate(crop, reference, windows):
  """(top, left, mirrored, mean |error|, ...) of the best-matching 448 crop of `reference`:
  every offset and both orientations scored on a sparse grid of pixels, the best on all."""
  scores = []
  for mirrored in (False, True):
    view = crop[:, ::-1] if mirrored else crop
    probe = view[np.ix_(GRID, GRID)].astype(np.float32)          # [8, 8, 3]
    error = np.abs(windows - probe[:, None, :, None]).mean(axis=(0, 2, 4))  # [SPAN, SPAN]
    top, left = np.unravel_index(np.argmin(error), error.shape)
    full = np.abs(view.astype(np.float32) - reference[top:top + CROP, left:left + CROP]).mean()
    runner_up = np.partition(error.ravel(), 1)[1]
    scores.append((top, left, mirrored, full, error.min(), runner_up))
  return min(scores, key=lambda s: s[3])


def test_fgvc_train_crop_is_448_of_550_mirrored_or_not(photo):
  tf = pytest.importorskip('tensorflow')
  image, reference, windows = photo
  seen = []
  for seed in range(8):
    key = tf.constant([seed, 7], tf.int64)
    crop = preprocess.train_transform(tf.constant(image), key, resize_size=RESIZE,
                                      input_size=CROP).numpy()
    assert crop.shape == (CROP, CROP, 3) and crop.dtype == np.uint8
    top, left, mirrored, full, best, runner_up = locate(crop, reference, windows)
    # the crop is the resized photo's window, pixel for pixel (PIL vs TF rounding: < 1 level)
    assert full < 1.0, (seed, top, left, mirrored, full)
    assert runner_up > best + 2.0  # one offset fits, not a band of them
    seen.append((top, left, mirrored))
    again = preprocess.train_transform(tf.constant(image), key, resize_size=RESIZE,
                                       input_size=CROP).numpy()
    np.testing.assert_array_equal(again, crop)  # a stateless key: the same crop every epoch
  mirrored = [m for _, _, m in seen]
  assert any(mirrored) and not all(mirrored), seen           # flipped half of the time
  tops, lefts = [top for top, _, _ in seen], [left for _, left, _ in seen]
  assert len(set(tops)) > 4 and len(set(lefts)) > 4, seen   # offsets over the whole span
  assert max(tops + lefts) - min(tops + lefts) > SPAN // 2, seen
