"""What the folder readers share: a dataset's splits as file lists, the checks of an extracted
layout, and the pre-scan that drops unreadable images.

Each reader (`data_source='folder'`: fgvc_readers.py, reid_sources.py) returns splits of image
paths and 0-based labels in a fixed order. The label files are checked against each other and
against the image folder; any disagreement raises DataError naming the file. `verify_images`
then pre-scans every listed image with PIL and drops (with one warning naming them) the files
that are corrupt, truncated or not images (`drop_unreadable`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import warnings

import numpy as np

from dca_jax.data.errors import DataError, DataWarning
from dca_jax.data.preprocess import TF_FORMATS

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


class ImageSplit:
  """Base of the split dataclasses: `paths` and per-image numpy arrays (labels, pids, ...)."""

  def subset(self, keep):
    """The split with the images where `keep` is True (its paths and every per-image array)."""
    keep = np.asarray(keep, bool)
    arrays = {field.name: getattr(self, field.name)[keep] for field in dataclasses.fields(self)
              if isinstance(getattr(self, field.name), np.ndarray)}
    paths = [path for path, kept in zip(self.paths, keep) if kept]
    return dataclasses.replace(self, paths=paths, **arrays)


@dataclasses.dataclass
class FileSplit(ImageSplit):
  paths: list[str]
  labels: np.ndarray  # int32, 0-based
  label_file: str     # the file that defines this split (for messages)

  @property
  def listing(self) -> str:
    """Where messages say the split's images come from."""
    return f'listed by {self.label_file}'


@dataclasses.dataclass
class FolderDataset:
  name: str
  root: str
  class_names: list[str]
  train: FileSplit
  test: FileSplit
  crop_bottom: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)


def check_data_dir(data_dir: str, what: str) -> None:
  """DataError unless `data_dir` is an existing folder (`what`: the layout, for the message)."""
  if not data_dir:
    raise DataError(f'config.data_dir is empty: set it to the folder that holds the {what} '
                    'layout (data_source=folder)')
  if not os.path.isdir(data_dir):
    raise DataError(f'data_dir does not exist or is not a folder: {data_dir}')


def find_root(data_dir: str, candidates: list[str], marker: str, what: str) -> str:
  check_data_dir(data_dir, what)
  for candidate in candidates:
    root = os.path.join(data_dir, candidate)
    if os.path.exists(os.path.join(root, marker)):
      return os.path.normpath(root)
  tried = ', '.join(os.path.normpath(os.path.join(data_dir, candidate, marker))
                    for candidate in candidates)
  raise DataError(f'{what} layout not found under {data_dir}: none of {tried} exists')


def read_lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f'missing label file: {path}')
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def read_id_table(path: str, cast=str) -> dict[int, object]:
  """'<id> <value>' lines -> {id: value}; the value may contain spaces."""
  table = {}
  for line_number, line in enumerate(read_lines(path), 1):
    parts = line.split(maxsplit=1)
    if len(parts) != 2:
      raise DataError(f'{path}:{line_number}: expected "<id> <value>", got {line!r}')
    try:
      key, value = int(parts[0]), cast(parts[1].strip())
    except ValueError:
      raise DataError(f'{path}:{line_number}: cannot parse {line!r}') from None
    if key in table:
      raise DataError(f'{path}:{line_number}: id {key} appears twice')
    table[key] = value
  return table


def check_files_exist(paths: list[str], label_file: str) -> None:
  """DataError naming `label_file` and a missing file when any of `paths` does not exist."""
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise DataError(f'{label_file} lists {len(missing)} image(s) that do not exist, e.g. '
                    f'{missing[0]}{more}')


def nonempty(split: FileSplit, which: str) -> FileSplit:
  if not split.paths:
    raise DataError(f'the {which} split is empty: {split.label_file} lists no {which} images')
  return split


def check_tables(images, images_file, labels, labels_file, is_train, split_file) -> None:
  """The CUB-style id tables agree: the same image ids in each, split flags 0|1."""
  for table_file, table in ((labels_file, labels), (split_file, is_train)):
    if set(table) != set(images):
      raise DataError(f'{table_file} does not match {images_file}: {len(table)} vs '
                      f'{len(images)} ids, {len(set(images) ^ set(table))} ids in only one of '
                      'them')
  bad = [i for i in images if is_train[i] not in (0, 1)]
  if bad:
    raise DataError(f'{split_file}: image id {bad[0]} has flag {is_train[bad[0]]}, expected '
                    '0|1')


# ----------------------------------------------------------------------------- pre-scan
def check_image(path: str, crop_bottom: int = 0) -> str | None:
  """Returns None if TF can decode `path`, else a short reason. Fully decodes the file (JPEG at
  1/8 scale: still reads every entropy-coded byte, so truncation is caught) with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      if image.format not in TF_FORMATS:
        return f'unsupported image format {image.format}'
      if image.height <= crop_bottom + 1 or image.width < 2:
        return f'image too small ({image.width}x{image.height})'
      if image.format == 'JPEG':
        image.draft('RGB', (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def scan_images(paths: list[str], crop_bottom: int = 0, num_threads: int = 0) -> list:
  """check_image over many files with a thread pool (PIL decodes without the GIL)."""
  num_threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return list(pool.map(lambda path: check_image(path, crop_bottom), paths, chunksize=64))


def drop_unreadable(dataset, num_threads: int = 0, splits=('train', 'test'), *,
                    stacklevel: int = 3):
  """Pre-scans `splits`; removes unreadable files and warns once, naming them.

  Args:
    dataset: a FolderDataset, or a reid_sources.ReidDataset (its splits have no banner to
      crop); changed in place and returned.
    num_threads: of the scan (0: 4 per core, at most 32).
    splits: the names of the splits to scan.
    stacklevel: of the warning, counted from this function (3: its caller's caller).

  Returns:
    `dataset`, its unreadable files moved from the splits to `dataset.skipped`.
  """
  crop_bottom = getattr(dataset, 'crop_bottom', 0)
  unreadable = []
  for which in splits:
    split = getattr(dataset, which)
    reasons = scan_images(split.paths, crop_bottom, num_threads)
    found = [(path, reason) for path, reason in zip(split.paths, reasons) if reason is not None]
    if found:
      unreadable += found
      setattr(dataset, which, split.subset([reason is None for reason in reasons]))
      if not getattr(dataset, which).paths:
        raise DataError(f'the {which} split is empty: every image {split.listing} is '
                        f'unreadable (e.g. {found[0][0]}: {found[0][1]})')
  if unreadable:
    dataset.skipped.extend(unreadable)
    shown = '; '.join(f'{path} ({reason})' for path, reason in unreadable[:20])
    more = f'; ... and {len(unreadable) - 20} more' if len(unreadable) > 20 else ''
    message = (f'{dataset.name}: skipped {len(unreadable)} unreadable image(s) under '
               f'{dataset.root}: {shown}{more}')
    warnings.warn(message, DataWarning, stacklevel=stacklevel)
  return dataset


def content_keys(paths) -> list[str]:
  """A key per file of its bytes: identical files (the same image twice) share it."""
  return [hashlib.sha256(open(p, 'rb').read()).hexdigest() for p in paths]
