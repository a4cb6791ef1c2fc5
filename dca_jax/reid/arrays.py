"""Array checks and run-length helpers shared by the retrieval metrics and the re-ranking."""

from __future__ import annotations

import numpy as np

GiB = 1 << 30


def int_at_least(name: str, value, low: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    wanted = 'a positive integer' if low == 1 else f'an integer >= {low}'
    raise ValueError(f'{name} must be {wanted}, got {value!r}')
  return int(value)


def query_gallery_matrix(name: str, values) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 2 or 0 in values.shape:
    raise ValueError(f'{name} must be a non-empty 2-D (queries, gallery) array, got shape '
                     f'{values.shape}')
  return values


def run_starts(lengths: np.ndarray) -> np.ndarray:
  """Where each of consecutive runs of these lengths starts."""
  return np.cumsum(lengths) - lengths


def run_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """starts[0] + (0, 1, ..., lengths[0] - 1), starts[1] + (0, ...), ... concatenated."""
  within = np.arange(lengths.sum()) - np.repeat(run_starts(lengths), lengths)
  return np.repeat(starts, lengths) + within
