"""A config saved as JSON (a run's WORKDIR/config.json) as a config file: main.py loads
`--config path/to/config.json` through it, and a run's own config.json when a mode that reads a
workdir is given no --config. `--config.KEY=VALUE` overrides apply on top, as for any config.

  python main.py --config runs/mine/config.json --workdir runs/mine --mode eval
"""

from dca_jax import config_lib


def get_config(path):
  return config_lib.load_json(path)
