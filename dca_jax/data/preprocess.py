"""Image decoding, augmentation and normalisation (TensorFlow graph ops + numpy helpers).

Train: decode -> resize to `resize_size` (square) -> random crop `input_size` -> random flip.
Eval:  decode -> `center_crop`: resize `resize_size` + centre crop `input_size`;
                 `resize`: resize straight to `input_size`.
Randomness is stateless: every example gets its own seed, folded from (config.seed, epoch,
example id), so a stream is reproducible and resumable without global TF random state.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dca_jax import config_lib
from dca_jax.data._tf import tf
from dca_jax.data.errors import DataError, ImageLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ('imagenet', 'inception')
# Formats tf.io.decode_image reads; the folder pre-scan skips anything else.
TF_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP')


def _normalization_name(config_or_name: Any) -> str:
  name = config_or_name if isinstance(config_or_name, str) else config_or_name.get(
      'normalization', 'imagenet')
  if name == 'auto' and not isinstance(config_or_name, str):
    name = config_lib.resolve_normalization(config_or_name)
  if name not in NORMALIZATIONS:
    raise DataError(f'unknown normalization {name!r}; expected one of {NORMALIZATIONS}')
  return name


# ----------------------------------------------------------------------------- numpy helpers
def normalize(image: np.ndarray, config_or_name: Any = 'imagenet') -> np.ndarray:
  """uint8 (or float in [0, 255]) RGB [..., 3] -> float32 as the model sees it.

  `config_or_name` is a config (its `normalization` is used) or 'imagenet' | 'inception'.
  """
  name = _normalization_name(config_or_name)
  x = np.asarray(image, np.float32) / 255.0
  if name == 'imagenet':
    return ((x - np.asarray(IMAGENET_MEAN, np.float32)) /
            np.asarray(IMAGENET_STD, np.float32)).astype(np.float32)
  return (x * 2.0 - 1.0).astype(np.float32)


def denormalize(image: np.ndarray, config_or_name: Any = 'imagenet') -> np.ndarray:
  """Inverse of `normalize`: float32 [..., 3] -> uint8 RGB in [0, 255] (rounded, clipped)."""
  name = _normalization_name(config_or_name)
  x = np.asarray(image, np.float32)
  if name == 'imagenet':
    x = x * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
  else:
    x = (x + 1.0) / 2.0
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- TF graph ops
def tf_normalize(image, name: str):
  """float32 [0, 255] -> normalised float32 (TF version of `normalize`)."""
  t = tf()
  x = t.cast(image, t.float32)
  if name == 'imagenet':  # (x / 255 - mean) / std as one multiply-add.
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return x * t.constant(1.0 / (255.0 * std), t.float32) + t.constant(-mean / std, t.float32)
  return x * (2.0 / 255.0) - 1.0


def decode(encoded, crop_bottom: int = 0):
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3] (grayscale and RGBA become RGB)."""
  t = tf()
  image = t.io.decode_image(encoded, channels=3, dtype=t.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  if crop_bottom:
    image = image[:-crop_bottom]  # FGVC-Aircraft: 20-px copyright banner at the bottom.
  return image


def _resize(image, size: int):
  t = tf()
  # Antialiasing only matters when shrinking; plain bilinear is much cheaper when enlarging
  # (550 px from ~500 px originals) and gives the same result there.
  shrink = t.logical_or(t.shape(image)[0] > size, t.shape(image)[1] > size)
  image = t.cast(image, t.float32)
  out = t.cond(shrink,
               lambda: t.image.resize(image, (size, size), 'bilinear', antialias=True),
               lambda: t.image.resize(image, (size, size), 'bilinear', antialias=False))
  return t.reshape(out, (size, size, 3))


def train_transform(image, key, *, resize_size: int, input_size: int, normalization: str):
  """uint8 [h, w, 3] -> normalised float32 [S, S, 3]; `key` is an int32/int64 [2] seed."""
  t = tf()
  keys = t.random.experimental.stateless_split(key, 2)
  image = _resize(image, resize_size)
  image = t.image.stateless_random_crop(image, (input_size, input_size, 3), seed=keys[0])
  image = t.image.stateless_random_flip_left_right(image, seed=keys[1])
  return tf_normalize(image, normalization)


def eval_crop(image, *, resize_size: int, input_size: int, test_crop: str):
  """uint8 [h, w, 3] -> float32 [S, S, 3] in [0, 255] (not yet normalised)."""
  if test_crop == 'center_crop':
    image = _resize(image, resize_size)
    off = (resize_size - input_size) // 2
    return image[off:off + input_size, off:off + input_size, :]
  if test_crop == 'resize':
    return _resize(image, input_size)
  raise DataError(f'unknown test_crop {test_crop!r}; expected center_crop | resize')


def eval_transform(image, *, resize_size: int, input_size: int, test_crop: str,
                   normalization: str):
  return tf_normalize(eval_crop(image, resize_size=resize_size, input_size=input_size,
                                test_crop=test_crop), normalization)


def example_key(base_seed: int, epoch, example_id):
  """Per-example stateless seed [2] from (config.seed, epoch, example id)."""
  t = tf()
  key = t.constant([int(base_seed) & 0x7FFFFFFF, 0x5EED], t.int64)
  key = t.random.experimental.stateless_fold_in(key, t.cast(epoch, t.int64))
  return t.random.experimental.stateless_fold_in(key, t.cast(example_id, t.int64))


# ----------------------------------------------------------------------------- single file
def _read_rgb_for_eval(path: str) -> np.ndarray:
  """Reads any image file into uint8 [h, w, 3] the way the pipeline would where it can."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ImageLoadError(f'image file not found: {path}')
  try:
    with Image.open(path) as im:
      fmt, mode = im.format, im.mode
      has_alpha = mode in ('RGBA', 'LA', 'PA') or (mode == 'P' and 'transparency' in im.info)
      if fmt in TF_FORMATS and not has_alpha:
        im.load()  # Raises on truncated / corrupt data, so TF below gets a readable file.
        pil_rgb = None
      else:
        # Alpha: composite on white (what a viewer shows); other formats: PIL decodes.
        im = im.convert('RGBA')
        background = Image.new('RGBA', im.size, (255, 255, 255, 255))
        pil_rgb = np.asarray(Image.alpha_composite(background, im).convert('RGB'))
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageLoadError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
  if pil_rgb is not None:
    return pil_rgb
  t = tf()
  try:
    return decode(t.io.read_file(path)).numpy()  # Same decoder as the dataset pipeline.
  except (t.errors.OpError, ValueError) as e:
    raise ImageLoadError(f'cannot decode image {path}: {e}') from None


def load_image_for_eval(path: str, config) -> tuple[np.ndarray, np.ndarray]:
  """One image file -> (float32 [S, S, 3] normalised as eval, uint8 [S, S, 3] same crop).

  Accepts any size, RGB / grayscale / palette / RGBA (alpha composited on white), JPEG, PNG
  and whatever else PIL reads. Raises ImageLoadError naming the file when it is missing or
  unreadable.
  """
  path = os.fspath(path)
  rgb = _read_rgb_for_eval(path)
  crop = eval_crop(tf().convert_to_tensor(rgb), resize_size=int(config.resize_size),
                   input_size=int(config.input_size),
                   test_crop=config.get('test_crop', 'center_crop'))
  image = tf_normalize(crop, _normalization_name(config)).numpy()  # Exactly the eval op.
  display = np.clip(np.round(crop.numpy()), 0, 255).astype(np.uint8)
  return image.astype(np.float32), display
