"""Attention pictures in numpy: rollout heat maps, GLCA cells, Re-ID ranking rows.

Pure functions of arrays (matplotlib only for its 'jet' colour map, PIL only to write captions):
the visualize mode's figures, the attention evaluator's TensorBoard images and the Re-ID
rankings all draw with them.
"""

from __future__ import annotations

import numpy as np


def token_grid(num_patches: int, image_hw=None) -> tuple[int, int]:
  """(rows, columns) of the patch grid holding `num_patches` tokens (CLS excluded), with the
  aspect of the image (height, width); square when `image_hw` is not given."""
  height, width = image_hw if image_hw is not None else (1, 1)
  for rows in range(1, int(num_patches) + 1):
    if num_patches % rows == 0 and rows * width == (num_patches // rows) * height:
      return rows, num_patches // rows
  raise ValueError(f'{num_patches} patch tokens do not form a grid of aspect {height}:{width}')


def _cell_index(size: int, cells: int) -> np.ndarray:
  """For each of `size` pixels, the patch row/column it lies in (nearest-cell upsampling)."""
  return np.minimum((np.arange(size) * cells) // size, cells - 1)


def rollout_heatmap(rollout_row, grid_hw, image_hw) -> np.ndarray:
  """Rollout CLS row [1 + rows·columns] -> float32 [H, W] in [0, 1], one block per patch.

  The CLS column is dropped, the patch part reshaped row-major to the token grid, min-max
  normalised (a constant map gives zeros), and upsampled by nearest cell, so every pixel of a
  patch carries that patch's rollout value and the hottest blocks are GLCA's selected tokens.
  """
  rows, cols = grid_hw
  row = np.asarray(rollout_row, np.float64).reshape(-1)
  if row.size != 1 + rows * cols:
    raise ValueError(f'rollout row has {row.size} entries, expected 1 + {rows}x{cols}')
  cells = row[1:].reshape(rows, cols)
  lo, hi = cells.min(), cells.max()
  cells = (cells - lo) / (hi - lo) if hi > lo else np.zeros_like(cells)
  return cells[_cell_index(image_hw[0], rows)[:, None],
               _cell_index(image_hw[1], cols)[None, :]].astype(np.float32)


def overlay(display, heat, strength: float = 0.65) -> np.ndarray:
  """The colour image with the heat map blended over it: uint8 [H, W, 3].

  Each pixel mixes in the 'jet' colour of its heat with weight strength x heat, so cold patches
  show the image as it is and the hottest are mostly red (the image stays readable under it)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  image = np.asarray(display, np.float32)
  heat = np.asarray(heat, np.float32)
  colour = colormaps['jet'](heat)[..., :3].astype(np.float32) * 255.0
  alpha = (strength * heat)[..., None]
  return np.clip(np.round((1 - alpha) * image + alpha * colour), 0, 255).astype(np.uint8)


def selected_cells(glca_index, grid_hw) -> list[tuple[int, int]]:
  """GLCA token indices [1 + R] (CLS first, patches 1-based) -> [(row, col)] patch cells."""
  rows, cols = grid_hw
  idx = np.asarray(glca_index).reshape(-1)[1:].astype(np.int64) - 1
  if idx.size and (idx.min() < 0 or idx.max() >= rows * cols):
    raise ValueError(f'GLCA index out of the {rows}x{cols} patch grid: {idx.tolist()}')
  return [(int(i) // cols, int(i) % cols) for i in idx]


def cell_boxes(cells, grid_hw, image_hw) -> list[tuple[float, float, float, float]]:
  """(row, col) cells -> (x0, y0, width, height) pixel boxes in imshow coordinates."""
  y_edges = np.searchsorted(_cell_index(image_hw[0], grid_hw[0]), np.arange(grid_hw[0] + 1)) - 0.5
  x_edges = np.searchsorted(_cell_index(image_hw[1], grid_hw[1]), np.arange(grid_hw[1] + 1)) - 0.5
  return [(float(x_edges[c]), float(y_edges[r]), float(x_edges[c + 1] - x_edges[c]),
           float(y_edges[r + 1] - y_edges[r])) for r, c in cells]


def draw_boxes(picture: np.ndarray, boxes, value: int = 255) -> np.ndarray:
  """`cell_boxes` outlined (1 px) into a uint8 [H, W, 3] picture, in place; returns it."""
  for x0, y0, w, h in boxes:
    c0, r0 = int(round(x0 + 0.5)), int(round(y0 + 0.5))  # boxes are in imshow coordinates
    c1, r1 = c0 + int(round(w)) - 1, r0 + int(round(h)) - 1
    picture[r0:r1 + 1, [c0, c1]] = value
    picture[[r0, r1], c0:c1 + 1] = value
  return picture


def attention_picture(display, rollout_row, glca_index=None) -> np.ndarray:
  """The crop beside its attention map (`overlay` + the GLCA cells outlined): uint8 [H, 2W, 3]."""
  display = np.asarray(display, np.uint8)
  image_hw = display.shape[:2]
  grid = token_grid(np.asarray(rollout_row).size - 1, image_hw)
  picture = overlay(display, rollout_heatmap(rollout_row, grid, image_hw))
  if glca_index is not None:
    draw_boxes(picture, cell_boxes(selected_cells(glca_index, grid), grid, image_hw))
  return np.concatenate([display, picture], axis=1)


# ============================================================================ Re-ID rankings
RANK_PANEL_HEIGHT = 192  # px: every image of a ranking row is scaled to this height
RANK_FRAME = 4           # px: the green (same identity) / red frame around a gallery image
RANK_GAP = 12            # px between the query part and the gallery images
GREEN, RED, GREY = (40, 170, 60), (210, 40, 40), (150, 150, 150)
CAPTION_LINE = 12        # px per caption line (PIL's default font is about 11 px high)


def _scaled(image: np.ndarray, height: int) -> np.ndarray:
  """Nearest-neighbour resize of a uint8 [h, w, 3] image to `height` rows (aspect kept)."""
  h, w = image.shape[:2]
  width = max(1, int(round(w * height / h)))
  rows = np.minimum(np.arange(height) * h // height, h - 1)
  cols = np.minimum(np.arange(width) * w // width, w - 1)
  return np.asarray(image, np.uint8)[rows[:, None], cols[None, :]]


def ranking_picture(query, query_map, gallery, matches, *, query_caption: str = '',
                    captions=None) -> np.ndarray:
  """One ranking row, uint8 [H, W, 3]: the query, its attention map, then the ranked gallery
  images, each framed green if it shows the query's identity, red if not (grey for all when
  `matches` is None: identities unknown). `query_caption` (under the query and its map) and
  `captions` (lines under each gallery image) add a white band of text below the row."""
  if matches is None:
    matches = [None] * len(gallery)
  height = RANK_PANEL_HEIGHT
  parts = [_scaled(query, height), np.full((height, 2, 3), 255, np.uint8),
           _scaled(query_map, height), np.full((height, RANK_GAP, 3), 255, np.uint8)]
  spans = [(0, sum(p.shape[1] for p in parts[:3]))]   # (x, width) of what each caption is under
  for image, same in zip(gallery, matches):
    framed = _scaled(image, height - 2 * RANK_FRAME)
    framed = np.pad(framed, ((RANK_FRAME, RANK_FRAME), (RANK_FRAME, RANK_FRAME), (0, 0)))
    colour = GREY if same is None else GREEN if same else RED
    framed[:RANK_FRAME], framed[-RANK_FRAME:] = colour, colour
    framed[:, :RANK_FRAME], framed[:, -RANK_FRAME:] = colour, colour
    spans.append((sum(p.shape[1] for p in parts), framed.shape[1]))
    parts += [framed, np.full((height, 2, 3), 255, np.uint8)]
  row = np.concatenate(parts, axis=1)
  if not query_caption and not captions:
    return row
  texts = [[query_caption]] + [list(lines) for lines in (captions or [])]
  return captioned(row, list(zip(spans, texts)))


def captioned(picture: np.ndarray, texts) -> np.ndarray:
  """`picture` with a white band below it holding each ((x, width), lines) of `texts`: the
  lines written from x, each cut to the width (ending '..') so that captions never overlap."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  lines_most = max((len(lines) for _, lines in texts), default=0)
  height, width = picture.shape[:2]
  canvas = Image.new('RGB', (width, height + lines_most * CAPTION_LINE + 6), 'white')
  canvas.paste(Image.fromarray(np.asarray(picture, np.uint8)), (0, 0))
  draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
  for (x, span), lines in texts:
    for i, line in enumerate(lines):
      text = str(line)
      while len(text) > 2 and draw.textlength(text, font=font) > span - 4:
        text = text[:-3] + '..'
      draw.text((x + 2, height + 3 + i * CAPTION_LINE), text, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)
