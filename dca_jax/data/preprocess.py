"""Image decoding, augmentation and normalisation (TensorFlow graph ops + numpy helpers).

FGVC train: decode -> resize to `resize_size` (square) -> random crop `input_size` x
            `input_width` (square when unset) -> random flip.
Train resizes use `train_interpolation` (bilinear FGVC, bicubic Re-ID as TransReID's
T.Resize(interpolation=3)); eval resizes are bilinear (TransReID's test T.Resize default).
FGVC eval:  decode -> `center_crop`: resize `resize_size` + centre crop; `resize`: resize
            straight to `input_size` x `input_width`.
Re-ID train: decode -> resize to `input_size` x `input_width` -> flip -> pad `crop_padding` +
             random crop -> normalise -> random erasing. Re-ID eval: resize, normalise.
Randomness is stateless: every example gets its own seed, folded from (config.seed, epoch,
example id), so a stream is reproducible and resumable without global TF random state.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dca_jax import backbones, config_lib
from dca_jax.data._tf import tensorflow
from dca_jax.data.errors import DataError, ImageLoadError

IMAGENET_MEAN, IMAGENET_STD = backbones.MEAN_STD['imagenet']
NORMALIZATIONS = tuple(n for n in config_lib.CHOICES['normalization'] if n != 'auto')
# Formats tf.io.decode_image reads; the folder pre-scan skips anything else.
TF_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP')


def normalization_name(config_or_name: Any) -> str:
  """A normalisation's name, or a config's (`config.normalization`; 'auto': its backbone's)."""
  name = (config_or_name if isinstance(config_or_name, str)
          else config_lib.resolve_normalization(config_or_name))
  if name not in NORMALIZATIONS:
    raise DataError(f'unknown normalization {name!r}; expected one of {NORMALIZATIONS}')
  return name


def mean_std(name: str):
  """(mean, std) float32 [3] of a mean/std normalisation (imagenet, clip; pixels in [0, 1])."""
  mean, std = backbones.MEAN_STD[name]
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


# ----------------------------------------------------------------------------- numpy helpers
def normalize(image: np.ndarray, config_or_name: Any = 'imagenet') -> np.ndarray:
  """uint8 (or float in [0, 255]) RGB [..., 3] -> float32 as the model sees it.

  `config_or_name` is a config (its `normalization` is used) or 'imagenet' | 'inception'.
  """
  name = normalization_name(config_or_name)
  pixels = np.asarray(image, np.float32) / 255.0
  if name != 'inception':
    mean, std = mean_std(name)
    return ((pixels - mean) / std).astype(np.float32)
  return (pixels * 2.0 - 1.0).astype(np.float32)


def denormalize(image: np.ndarray, config_or_name: Any = 'imagenet') -> np.ndarray:
  """Inverse of `normalize`: float32 [..., 3] -> uint8 RGB in [0, 255] (rounded, clipped)."""
  name = normalization_name(config_or_name)
  pixels = np.asarray(image, np.float32)
  if name != 'inception':
    mean, std = mean_std(name)
    pixels = pixels * std + mean
  else:
    pixels = (pixels + 1.0) / 2.0
  return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def device_normalize(images, config_or_name: Any, dtype=None):
  """uint8 (or [0, 255] float) images -> normalised `dtype` inside a jitted step (jax.numpy):
  the same numbers as `normalize`, computed on the accelerator."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  name = normalization_name(config_or_name)
  pixels = jnp.asarray(images).astype(jnp.float32)
  if name != 'inception':
    mean, std = mean_std(name)
    pixels = pixels * (1.0 / (255.0 * std)) - mean / std
  else:
    pixels = pixels * (2.0 / 255.0) - 1.0
  return pixels.astype(dtype or jnp.float32)


# ----------------------------------------------------------------------------- TF graph ops
def to_uint8(image):
  """float [0, 255] -> uint8, rounded and clipped (what the streams hand to the device)."""
  tf = tensorflow()
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)



def tf_normalize(image, name: str):
  """float32 [0, 255] -> normalised float32 (TF version of `normalize`)."""
  tf = tensorflow()
  pixels = tf.cast(image, tf.float32)
  if name != 'inception':  # (pixels / 255 - mean) / std as one multiply-add.
    mean, std = mean_std(name)
    return (pixels * tf.constant(1.0 / (255.0 * std), tf.float32) +
            tf.constant(-mean / std, tf.float32))
  return pixels * (2.0 / 255.0) - 1.0


def decode(encoded, crop_bottom: int = 0):
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3] (grayscale and RGBA become RGB)."""
  tf = tensorflow()
  image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  if crop_bottom:
    image = image[:-crop_bottom]  # FGVC-Aircraft: 20-px copyright banner at the bottom.
  return image


INTERPOLATIONS = config_lib.CHOICES['train_interpolation']


def _resize(image, size, width=None, method: str = 'bilinear'):
  """float32 resize to (size, width or size), antialiased only when shrinking (bicubic: Keys'
  a = -0.5 kernel, as PIL's; it overshoots [0, 255] a little, which to_uint8 clips)."""
  tf = tensorflow()
  if method not in INTERPOLATIONS:
    raise DataError(f'unknown interpolation {method!r}; expected one of {INTERPOLATIONS}')
  height, width = int(size), int(width or size)
  # Antialiasing only matters when shrinking; plain bilinear is much cheaper when enlarging
  # (550 px from ~500 px originals) and gives the same result there.
  shrink = tf.logical_or(tf.shape(image)[0] > height, tf.shape(image)[1] > width)
  image = tf.cast(image, tf.float32)
  resized = tf.cond(
      shrink,
      lambda: tf.image.resize(image, (height, width), method, antialias=True),
      lambda: tf.image.resize(image, (height, width), method, antialias=False))
  return tf.reshape(resized, (height, width, 3))


def train_transform(image, key, *, resize_size: int, input_size: int, input_width=None,
                    interpolation: str = 'bilinear'):
  """uint8 [h, w, 3] -> uint8 [input_size, input_width or input_size, 3]; `key` is an
  int32/int64 [2] seed. The crop is taken from the square `resize_size` image."""
  tf = tensorflow()
  keys = tf.random.experimental.stateless_split(key, 2)
  image = _resize(image, resize_size, method=interpolation)
  image = tf.image.stateless_random_crop(image, (input_size, input_width or input_size, 3),
                                         seed=keys[0])
  image = tf.image.stateless_random_flip_left_right(image, seed=keys[1])
  return to_uint8(image)


def eval_crop(image, *, resize_size: int, input_size: int, test_crop: str, input_width=None):
  """uint8 [h, w, 3] -> float32 [input_size, input_width or input_size, 3] in [0, 255]."""
  width = int(input_width or input_size)
  if test_crop == 'center_crop':
    image = _resize(image, resize_size)
    top, left = (resize_size - input_size) // 2, (resize_size - width) // 2
    return image[top:top + input_size, left:left + width, :]
  if test_crop == 'resize':
    return _resize(image, input_size, width)
  raise DataError(f'unknown test_crop {test_crop!r}; expected center_crop | resize')


def eval_transform(image, *, resize_size: int, input_size: int, test_crop: str,
                   input_width=None):
  """uint8 [h, w, 3] -> the uint8 eval crop [input_size, input_width or input_size, 3]."""
  return to_uint8(eval_crop(image, resize_size=resize_size, input_size=input_size,
                            test_crop=test_crop, input_width=input_width))


# ----------------------------------------------------------------------------- Re-ID
# Random erasing (Zhong et al. 2017) as timm's RandomErasing, which TransReID uses: erased area
# uniform in [2 %, `max_area`] of the image (timm's default 1/3; Zhong et al.'s code 0.4), aspect
# ratio h/w log-uniform in [0.3, 1/0.3]; up to ERASE_ATTEMPTS draws, the first rectangle that
# fits is used.
ERASE_MIN_AREA = 0.02
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10
ERASE_FILLS = config_lib.CHOICES['random_erasing_fill']


def random_erase(image, key, probability: float, fill: str = 'random',
                 normalization: str = 'imagenet', max_area: float = 1 / 3):
  """Erases one random rectangle of a float32 [h, w, 3] image in [0, 255] with `probability`.

  fill='random': per-pixel values that are N(0, 1) once normalised (TransReID's timm
  RandomErasing(mode='pixel')), clipped to [0, 255] since images travel as uint8; 'mean': the
  normalisation's mean colour (0 once normalised).
  """
  tf = tensorflow()
  if fill not in ERASE_FILLS:
    raise DataError(f'unknown random_erasing_fill {fill!r}; expected one of {ERASE_FILLS}')
  height, width = int(image.shape[0]), int(image.shape[1])
  keys = tf.random.experimental.stateless_split(key, 6)

  def uniform(seed, shape, low, high):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)

  erase = uniform(keys[0], [], 0.0, 1.0) < probability
  if not ERASE_MIN_AREA < max_area <= 1:
    raise DataError(f'random erasing max_area={max_area} must be in ({ERASE_MIN_AREA}, 1]')
  area = uniform(keys[1], [ERASE_ATTEMPTS], ERASE_MIN_AREA, max_area) * float(height * width)
  aspect = tf.exp(uniform(keys[2], [ERASE_ATTEMPTS], float(np.log(ERASE_ASPECT[0])),
                          float(np.log(ERASE_ASPECT[1]))))
  erase_height = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  erase_width = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = ((erase_height < height) & (erase_width < width) & (erase_height > 0) &
          (erase_width > 0))
  first = tf.argmax(tf.cast(fits, tf.int32))  # Index of the first fitting draw (0 if none).
  erase_height, erase_width = erase_height[first], erase_width[first]
  corner = uniform(keys[3], [2], 0.0, 1.0)
  top = tf.cast(corner[0] * tf.cast(height - erase_height + 1, tf.float32), tf.int32)
  left = tf.cast(corner[1] * tf.cast(width - erase_width + 1, tf.float32), tf.int32)
  rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
  inside = ((rows >= top) & (rows < top + erase_height) & (cols >= left) &
            (cols < left + erase_width))
  inside = inside & erase & tf.reduce_any(fits)
  if normalization != 'inception':
    mean, std = mean_std(normalization)
  else:  # inception: x / 127.5 - 1
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)
  if fill == 'random':
    normal = tf.random.stateless_normal([height, width, 3], seed=keys[4], dtype=tf.float32)
    value = tf.clip_by_value(255.0 * (mean + std * normal), 0.0, 255.0)
  else:
    value = tf.broadcast_to(tf.constant(255.0 * mean, tf.float32), [height, width, 3])
  return tf.where(inside[:, :, None], value, tf.cast(image, tf.float32))


def reid_train_transform(image, key, *, height: int, width: int, padding: int,
                         erasing: float, normalization: str, erasing_fill: str = 'random',
                         erasing_max_area: float = 1 / 3, interpolation: str = 'bicubic'):
  """Re-ID train: resize (height, width) -> flip -> zero-pad `padding` + random crop (height,
  width) -> random erasing (`normalization` sets its fill). uint8 [h, w, 3] -> uint8
  [height, width, 3]."""
  tf = tensorflow()
  keys = tf.random.experimental.stateless_split(key, 3)
  image = _resize(image, height, width, method=interpolation)
  image = tf.image.stateless_random_flip_left_right(image, seed=keys[0])
  if padding > 0:
    image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])  # Black, as T.Pad.
    image = tf.image.stateless_random_crop(image, (height, width, 3), seed=keys[1])
  if erasing > 0:
    image = random_erase(image, keys[2], erasing, erasing_fill, normalization, erasing_max_area)
  return to_uint8(image)


def reid_eval_transform(image, *, height: int, width: int):
  """Re-ID eval: resize. uint8 [h, w, 3] -> uint8 [height, width, 3]."""
  return to_uint8(_resize(image, height, width))


def example_key(base_seed: int, epoch, example_id):
  """Per-example stateless seed [2] from (config.seed, epoch, example id)."""
  tf = tensorflow()
  key = tf.constant([int(base_seed) & 0x7FFFFFFF, 0x5EED], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(example_id, tf.int64))


# ----------------------------------------------------------------------------- single file
def _read_rgb_for_eval(path: str) -> np.ndarray:
  """Reads any image file into uint8 [h, w, 3] the way the pipeline would where it can."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ImageLoadError(f'image file not found: {path}')
  try:
    with Image.open(path) as image:
      mode = image.mode
      has_alpha = mode in ('RGBA', 'LA', 'PA') or (mode == 'P' and 'transparency' in image.info)
      if image.format in TF_FORMATS and not has_alpha:
        image.load()  # Raises on truncated / corrupt data, so TF below gets a readable file.
        pil_rgb = None
      else:
        # Alpha: composite on white (what a viewer shows); other formats: PIL decodes.
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        pil_rgb = np.asarray(Image.alpha_composite(background, rgba).convert('RGB'))
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageLoadError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
  if pil_rgb is not None:
    return pil_rgb
  tf = tensorflow()
  try:
    return decode(tf.io.read_file(path)).numpy()  # Same decoder as the dataset pipeline.
  except (tf.errors.OpError, ValueError) as e:
    raise ImageLoadError(f'cannot decode image {path}: {e}') from None


def load_image_for_eval(path: str, transform) -> np.ndarray:
  """One image file -> its uint8 eval crop [S, W, 3], exactly what the eval stream yields.

  `transform`: the eval stream's, uint8 tensor [h, w, 3] -> uint8 tensor [S, W, 3] (the task's
  `eval_transform` bound to a config: FGVC applies `config.test_crop`, Re-ID resizes to (S, W)).

  Accepts any size, RGB / grayscale / palette / RGBA (alpha composited on white), JPEG, PNG
  and whatever else PIL reads. Raises ImageLoadError naming the file when it is missing or
  unreadable.
  """
  path = os.fspath(path)
  rgb = _read_rgb_for_eval(path)
  return transform(tensorflow().convert_to_tensor(rgb)).numpy()
