"""The predict path's image listing (dca_jax/predict.py): files as given, folders read
recursively in sorted order, globs, with one line of what was taken and skipped."""

import os

from dca_jax import predict


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'')


def test_folders_globs_and_files_are_listed_in_sorted_order(tmp_path):
  for rel in ('b/2.png', 'b/10.JPG', 'a/x.jpeg', 'a/deep/y.webp', 'a/notes.txt', 'c.gif'):
    _touch(str(tmp_path / rel))
  said = []
  paths = predict.image_paths([str(tmp_path / 'a'), str(tmp_path / 'b' / '*'),
                               str(tmp_path / 'missing.jpg'), '  ', str(tmp_path / 'c.gif')],
                              say=said.append)
  assert paths == [str(tmp_path / 'a' / 'deep' / 'y.webp'), str(tmp_path / 'a' / 'x.jpeg'),
                   str(tmp_path / 'b' / '10.JPG'), str(tmp_path / 'b' / '2.png'),
                   str(tmp_path / 'missing.jpg'), str(tmp_path / 'c.gif')]
  assert said == [f'images: 2 file(s) from {tmp_path / "a"} (1 skipped: not an image name)',
                  f'images: 2 file(s) match {tmp_path / "b" / "*"}']


def test_a_glob_that_matches_nothing_stays_for_its_error_line(tmp_path):
  said = []
  pattern = str(tmp_path / 'none' / '*.jpg')
  assert predict.image_paths([pattern], say=said.append) == [pattern]
  assert said == [f'images: 0 file(s) match {pattern}']
