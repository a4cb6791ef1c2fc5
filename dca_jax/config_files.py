"""The one loader of a run's configuration, and the one step that makes it ready to run.

    config, said = config_files.load('configs/cub.py:vit_base', ['--config.batch_size=8'])
    config = config_files.prepare(config)   # checked, then the CPU host tuned for it

`load` reads an experiment file (`configs/x.py[:arg]`: its `get_config(arg)`), a JSON config
(`x.json`, e.g. a run's WORKDIR/config.json) or, given no spec, a run's own
`run_dir/config.json`; then applies `--config.KEY=VALUE` overrides (ml_collections' own parsing:
typed by the knob; `--config.KEY VALUE` and `--noconfig.KEY` too) on top of any of them. Every
mistake is a ConfigError of one line.

`prepare` checks the config (dca_jax/checks.py) and tunes glibc's malloc for it
(dca_jax/host_malloc.py), which is to happen before numpy or jax is imported (the arena limit
binds only threads that have not allocated yet: see there). So the knobs the tuning reads are
checked first without either (`config_lib.check_declared`), the tuning applied, then the whole
check (which imports jax) run. Importing this module imports neither.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Optional, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from dca_jax import config_lib, host_malloc
from dca_jax.errors import ConfigError

RUN_CONFIG = 'config.json'   # what a training writes into its workdir


def parse_known_flags(argv):
  """absl's parser for a command's own flags (`app.run(main, flags_parser=...)`; a mistake: one
  line); what it does not know, the --config.KEY=VALUE overrides, goes on to `main(argv)` and
  `load`."""
  try:
    return flags.FLAGS(argv, known_only=True)
  except flags.Error as e:
    raise SystemExit(f'error: {e} (--help lists the flags)') from None


def load(spec: Optional[str], overrides: Sequence[str] = (), *,
         run_dir: Optional[str] = None) -> tuple[Optional[ml_collections.ConfigDict], str]:
  """(config, the line saying which was taken: '' for an experiment file) of `spec`, else of
  `run_dir`'s own config.json when run_dir is given (a mode that reads a trained run), else
  (None, ''); `overrides` (command-line arguments, `--config.KEY=VALUE`) applied on top."""
  if spec:
    config, said = _read(spec), ''
    if spec.endswith('.json'):
      said = f'config: {spec} (JSON; --config.KEY=VALUE overrides apply on top)'
  elif run_dir:
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
      raise ConfigError(f'--config is needed: {path} does not exist (train into this --workdir '
                        'first, or name the experiment file, e.g. --config configs/cub.py)')
    config = config_lib.load_json(path)
    said = f"config: {path} (the run's own; --config.KEY=VALUE overrides apply on top)"
  else:
    config, said = None, ''
  return apply_overrides(config, overrides), said


def _read(spec: str) -> ml_collections.ConfigDict:
  if spec.endswith('.json'):
    return config_lib.load_json(spec)
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'--config {path}: no such file')
  module = importlib.util.spec_from_file_location('dca_jax_experiment', path)
  if module is None:
    raise ConfigError(f'--config {path}: not a Python experiment file (configs/x.py[:arg]) '
                      'or a JSON config (.json)')
  source = importlib.util.module_from_spec(module)
  module.loader.exec_module(source)
  get_config = getattr(source, 'get_config', None)
  if get_config is None:
    raise ConfigError(f'--config {path}: has no get_config()')
  try:
    config = get_config(arg) if arg else get_config()
  except ValueError as e:   # a ConfigError among them: e.g. an unknown backbone as :arg
    raise ConfigError(f'--config {spec}: {" ".join(str(e).split())}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config {spec}: get_config() returned {type(config).__name__}, not a '
                      'ConfigDict')
  return config


def apply_overrides(config, overrides: Sequence[str]):
  """`config` with the command line's `--config.KEY=VALUE` overrides applied, locked (a new key
  cannot be added by mistake later). ConfigError for an unknown key, a bad value, or anything
  among `overrides` that is not one."""
  overrides = list(overrides)
  if config is None:
    for arg in overrides:
      if re.match(r'--?(no)?config\.', arg):
        raise ConfigError(f'{arg}: an override needs a config (--config configs/x.py, or a '
                          '--workdir that holds a trained run)')
    if overrides:
      raise ConfigError(_unexpected(overrides))
    return None
  parser = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict('config', config, flag_values=parser, lock_config=True,
                                    sys_argv=['main.py'] + overrides)
    rest = parser(['main.py'] + overrides)
  except (AttributeError, KeyError) as e:   # ml_collections: a key the config does not have
    raise ConfigError(_unknown_key(e)) from None
  except (flags.Error, TypeError, ValueError) as e:
    raise ConfigError(f'bad config override: {" ".join(str(e).split())}') from None
  if rest[1:]:
    raise ConfigError(_unexpected(rest[1:]))
  return config


def _unexpected(args) -> str:
  return (f'unexpected argument(s) {" ".join(args)} (each flag is --NAME=VALUE, each override '
          '--config.KEY=VALUE)')


def _unknown_key(error: Exception) -> str:
  """ml_collections' message (the key, then a "Did you mean" line) as one line."""
  raw = str(error.args[0] if error.args else error).replace('\\n', '\n')
  parts = [p.strip(' \'"\\') for p in raw.split('\n') if p.strip(' \'"\\')]
  hint = f'. {parts[1]}' if len(parts) > 1 else ''
  return (f"unknown config key '{parts[0] if parts else raw}'{hint} "
          '(every key is listed in dca_jax/config_lib.py)')


def prepare(config: Optional[ml_collections.ConfigDict]):
  """`config` checked (checks.checked: one ConfigError line naming the first bad knob) and the
  host's malloc tuned for it, in the order the module doc gives. None (a mode that needs no
  config): the malloc settings for small steps."""
  if config is None:
    host_malloc.retain_freed_memory()
    return None
  config_lib.check_declared(config)
  host_malloc.retain_freed_memory(
      one_arena=host_malloc.one_arena_pays(config_lib.activation_elements(config)))
  from dca_jax import checks  # pylint: disable=g-import-not-at-top  (imports jax: after malloc)
  return checks.checked(config)
