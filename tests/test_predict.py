"""The predict path's image listing (dca_jax/predict.py): files as given, folders read
recursively in sorted order, globs, with one line of what was taken and skipped; its output
files replaced only whole."""

import os

import pytest
from conftest import one_line_error

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


def test_a_glob_that_matches_nothing_is_one_error_line(tmp_path):
  said = []
  pattern = str(tmp_path / 'none' / '*.jpg')
  line = one_line_error(lambda: predict.image_paths([pattern], say=said.append),
                        'no file matches')
  assert line == f'--images {pattern}: no file matches this pattern'
  assert said == []   # no "0 file(s)" line before it


def test_an_output_file_is_replaced_only_by_a_whole_one(tmp_path):
  path = str(tmp_path / 'out' / 'p.jsonl')
  predict.write_jsonl(path, [{'a': 1}])

  def fails(temporary):
    with open(temporary, 'w') as f:
      f.write('half')
    raise RuntimeError('killed half way')
  with pytest.raises(RuntimeError):
    predict.write_atomically(path, fails)
  with open(path) as f:
    assert f.read() == '{"a": 1}\n'
  assert os.listdir(tmp_path / 'out') == ['p.jsonl']   # no temporary left
  assert predict.output_path('W', 'p.jsonl') == os.path.join('W', 'p.jsonl')
  assert predict.output_path('W', str(tmp_path / 'abs.jsonl')) == str(tmp_path / 'abs.jsonl')
