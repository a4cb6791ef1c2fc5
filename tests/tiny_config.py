"""The tiny configs of the test suite as a config file, for main.py in subprocess tests:
`tests/tiny_config.py` is conftest.tiny_config(), `tests/tiny_config.py:reid` tiny_reid_config()."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config, tiny_reid_config  # noqa: E402


def get_config(arg=None):
  return tiny_reid_config() if arg == 'reid' else tiny_config()
