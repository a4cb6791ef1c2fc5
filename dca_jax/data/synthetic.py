"""A generated fine-grained dataset (`data_source='synthetic'`): no files, deterministic.

Every image is a cluttered background (smooth colour blobs + pixel noise + distractor squares)
with ONE small class-defining detail: a square "ring" of palette colour A around a "core" of
palette colour B (about 1/8 of the image side). The class is the ordered colour pair (A, B).
The distractors come from the same family but never define a class: uniform squares of one
palette colour, and rings of a palette colour around a grey core. So the colour histogram of
the whole image is not enough: a model must find the one ring whose core is a palette colour
and read both colours, i.e. attend to a small local region, which is what GLCA is for.

The detail is symmetric (survives the horizontal flip) and kept away from the borders by
`margin` (>= 20 % of the side, more than the 550 -> 448 train crop can remove).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

DEFAULT_CLASSES = 10  # generated when config.num_classes is 0 ("from the data")


@dataclasses.dataclass
class SyntheticData:
  class_names: list[str]
  train_images: np.ndarray  # uint8 [n, s, s, 3]
  train_labels: np.ndarray  # int32 [n]
  test_images: np.ndarray
  test_labels: np.ndarray
  palette: np.ndarray       # uint8 [k, 3]
  class_pairs: np.ndarray   # int [num_classes, 2]: (ring colour, core colour) palette ids


def palette_for(num_classes: int) -> np.ndarray:
  """k saturated colours with distinct hues, k(k-1) >= num_classes ordered pairs, k >= 5."""
  size = 5
  while size * (size - 1) < num_classes:
    size += 1
  colours = [colorsys.hsv_to_rgb(i / size, 1.0, 1.0 if i % 2 == 0 or size <= 6 else 0.75)
             for i in range(size)]
  return np.round(np.asarray(colours) * 255).astype(np.uint8)


def class_pairs_for(num_classes: int, palette_size: int, seed: int) -> np.ndarray:
  """(ring colour, core colour) palette ids of each class: distinct ordered pairs, seeded."""
  pairs = [(ring, core) for ring in range(palette_size) for core in range(palette_size)
           if ring != core]
  order = np.random.default_rng([seed, 101]).permutation(len(pairs))
  return np.asarray([pairs[i] for i in order[:num_classes]], np.int64)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = rng.integers(40, 216, size=(4, 4, 3), dtype=np.uint8)  # Muted blob colours.
  blobs = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32)
  noise = rng.normal(0.0, 14.0, size=(size, size, 3))
  return blobs + noise


def _draw(image: np.ndarray, y: int, x: int, side: int, core: int, ring_rgb,
          core_rgb) -> None:
  """A `side` square of `ring_rgb` at (y, x) with a centred `core` square of `core_rgb`."""
  image[y:y + side, x:x + side] = ring_rgb
  inset = (side - core) // 2
  image[y + inset:y + inset + core, x + inset:x + inset + core] = core_rgb


def render(rng: np.random.Generator, label: int, size: int, palette: np.ndarray,
           class_pairs: np.ndarray, num_distractors: int = 3,
           detail_size: float = 0.125) -> np.ndarray:
  side = max(4, int(round(size * detail_size)))
  core = max(2, side // 2)
  image = _background(rng, size)
  for _ in range(num_distractors):
    y, x = rng.integers(0, size - side + 1, size=2)
    colour = palette[rng.integers(len(palette))]
    if rng.random() < 0.5:  # Uniform palette square.
      _draw(image, y, x, side, core, colour, colour)
    else:                   # Palette ring around a grey core.
      grey = rng.integers(70, 190)
      _draw(image, y, x, side, core, colour, (grey, grey, grey))
  margin = int(math.ceil(0.2 * size))
  highest = max(margin, size - margin - side)
  y, x = rng.integers(margin, highest + 1, size=2)
  ring_colour, core_colour = class_pairs[label]
  _draw(image, y, x, side, core, palette[ring_colour], palette[core_colour])
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_split(num: int, num_classes: int, size: int, seed: int, split_id: int,
               palette: np.ndarray, class_pairs: np.ndarray, num_distractors: int = 3,
               detail_size: float = 0.125):
  rng = np.random.default_rng([seed, 7, split_id])
  labels = rng.permutation(np.arange(num) % num_classes).astype(np.int32)  # Balanced.
  if not num:
    return np.zeros((0, size, size, 3), np.uint8), labels
  images = np.stack([render(rng, int(label), size, palette, class_pairs, num_distractors,
                            detail_size) for label in labels])
  return images, labels


def generate(num_classes: int, num_train: int, num_test: int, image_size: int,
             seed: int, num_distractors: int = 3, detail_size: float = 0.125) -> SyntheticData:
  """The set; `num_distractors` look-alike squares per image, the class detail `detail_size` x
  the image side (the ablations' harder variant: more distractors, a smaller detail)."""
  palette = palette_for(num_classes)
  pairs = class_pairs_for(num_classes, len(palette), seed)
  width = max(2, len(str(num_classes - 1)))
  names = [f'class_{i:0{width}d}' for i in range(num_classes)]
  style = dict(num_distractors=num_distractors, detail_size=detail_size)
  train_images, train_labels = make_split(num_train, num_classes, image_size, seed, 0, palette,
                                          pairs, **style)
  test_images, test_labels = make_split(num_test, num_classes, image_size, seed, 1, palette,
                                        pairs, **style)
  return SyntheticData(names, train_images, train_labels, test_images, test_labels, palette,
                       pairs)
