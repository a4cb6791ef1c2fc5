"""The tiny config of the test suite as a config file, for main.py in subprocess tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402


def get_config(arg=None):
  del arg
  return tiny_config()
