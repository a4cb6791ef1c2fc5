"""The docs name only what is in the tree: README.md and docs/*.md (the CHANGELOG, a history,
aside) checked line by line, each file a test of its own, every problem named by its line.

- A module named as `tools.ablate` or `dca_jax.reid.evaluate` (dotted, from a top-level
  package): its packages and module exist.
- `python -m X`: X is a module of the tree (X.py or X/__init__.py from the repository root), or
  one of THIRD_PARTY (pytest, pip, venv: installed tools, not ours).
- `bash X` and `python X.py`: the script exists.
- A repository path: a token whose first component is a top-level entry of the tree (dca_jax/,
  configs/, tools/, main.py, requirements-dev.txt, .ci/, ...) exists. `configs/x.py:arg` is
  configs/x.py, `docs/X.md#part` docs/X.md, `tests/x.py::test` tests/x.py; `*`, `?`, `<name>`
  and `{a,b}` are globs that must match.
- A Markdown link's target exists, relative to the page holding it.
- Nothing outside the repository: no `../`, no absolute path (ALLOWED_OUTSIDE lists the few
  places of the system or of a library that are named as facts, not as ours).

What a command creates is not a repository path: the value of an output flag (`--workdir`,
`--out`, ...), of `>` / `tee` / `mkdir`, lies wherever the user says, and a name that is no
top-level entry (runs/, WORKDIR, .venv-cuda, export/, DATA) is never looked up. The tree's
top-level entries are what git tracks or would track (so runs/ and .venv*/, ignored, are not).
"""

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m` of installed tools the docs tell the user to run
THIRD_PARTY = ('pytest', 'pip', 'venv', 'ruff', 'onnxruntime', 'tensorboard')
# Places outside the repository named as facts (a library's default folder, a system tool),
# never as where this project keeps or writes something:
ALLOWED_OUTSIDE = (
    '~/.cache/huggingface',   # the Hugging Face Hub's cache when HF_HOME is unset
    '~/tensorflow_datasets',  # TFDS's default data_dir
    '/usr/bin/time',          # GNU time (its -v), not the shell's builtin
    '/path/to/',              # the placeholder of a path (hub.py's error line says it)
)
# Flags whose value is a path the command creates (or the user picks): not looked up
OUTPUT_FLAGS = ('--workdir', '--out', '--out_dir', '--output', '--compare_workdir', '-o')
OUTPUT_COMMANDS = ('>', '>>', 'tee', 'mkdir', '-p')

URL = re.compile(r'[a-z][a-z0-9+.-]*://\S+|www\.\S+')
LINK = re.compile(r'\]\(([^)\s]+)\)')
PYTHON_M = re.compile(r'\bpython3?(?:\.\d+)? -m ([\w.]+)')
SCRIPT = re.compile(r'\b(?:bash|sh) ((?!-)[^\s`\'"|;&)]+)|\bpython3?(?:\.\d+)? ((?!-)[^\s`\'"|;&)]+\.py)\b')
DOTTED = re.compile(r'(?<![\w./-])([A-Za-z_]\w*(?:\.\w+)+)')
SPLIT = re.compile(r'[\s`\'"|;]+')
LEADING, TRAILING = '([*', ').,:;!?*'


def _git_top_level(root: str) -> set:
  try:
    out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                         cwd=root, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return set()
  return {line.split('/', 1)[0] for line in out.splitlines() if line}


def top_level(root: str = ROOT) -> set:
  """The top-level names of the tree: what git tracks or would track; without git, the
  folder's entries less the hidden caches."""
  return _git_top_level(root) or {n for n in os.listdir(root)
                                  if not n.startswith(('.git', '.venv', '.pytest', '.ruff'))
                                  and n not in ('runs', '__pycache__')}


def _braces(pattern: str) -> list:
  """`a/{b,c}.py` -> [a/b.py, a/c.py] (nested braces are not used in the docs)."""
  m = re.search(r'\{([^{}]*)\}', pattern)
  if not m:
    return [pattern]
  return [p for alt in m.group(1).split(',')
          for p in _braces(pattern[:m.start()] + alt + pattern[m.end():])]


def exists(path: str, root: str = ROOT) -> bool:
  """`path` (relative to root; globs, <placeholders>, {a,b}) names something in the tree."""
  path = re.sub(r'<[^<>/]*>', '*', path)
  return all(glob.glob(os.path.join(root, p)) for p in _braces(path))


def module_exists(module: str, root: str = ROOT) -> bool:
  base = os.path.join(root, *module.split('.'))
  return os.path.isfile(base + '.py') or os.path.isfile(os.path.join(base, '__init__.py'))


def dotted_exists(name: str, root: str = ROOT) -> bool:
  """`tools.ablate`, `dca_jax.reid.evaluate`, `dca_jax.checks.checked`: the packages then a
  module exist (what follows the module is its attribute, not looked up)."""
  path = root
  for part in name.split('.'):
    if os.path.isfile(os.path.join(path, part + '.py')):
      return True
    path = os.path.join(path, part)
    if not os.path.isdir(path):
      return False
  return True


def _clean(token: str) -> str:
  """A token as a path: no trailing punctuation, anchor, `:arg` of a config, `::test`."""
  token = token.lstrip(LEADING).rstrip(TRAILING)
  while token.endswith(']') and '[' not in token:   # the end of a link's text
    token = token[:-1].rstrip(TRAILING)
  token = token.split('#', 1)[0].split('::', 1)[0]
  token = re.sub(r'(\.py):.*$', r'\1', token)
  return token[2:] if token.startswith('./') else token


def _outside(token: str) -> bool:
  if token.startswith(ALLOWED_OUTSIDE):
    return False
  return token.startswith(('../', '~/')) or token == '..' or bool(re.match(r'/[\w.$]', token))


def _tokens(line: str):
  """(token, is_output) for each word of `line` that could be a path: `--flag=VALUE` and
  `KEY=VALUE` give VALUE, a comma-separated list each item (not inside {a,b})."""
  words = [w for w in SPLIT.split(line) if w]
  for i, word in enumerate(words):
    before = words[i - 1] if i else ''
    output = before in OUTPUT_FLAGS + OUTPUT_COMMANDS
    if '=' in word and not word.startswith('='):
      flag, word = word.split('=', 1)
      output = flag in OUTPUT_FLAGS
    for item in re.split(r',(?![^{]*\})', word):
      yield item, output


def line_problems(line: str, top: set, page_dir: str = '', root: str = ROOT) -> list:
  """What `line` of a page in `page_dir` (relative to root) names that is not in the tree."""
  found = []
  if line.lstrip().startswith('```'):
    return found   # a fence's language tag (```python serve.py) is no command
  line = URL.sub(' ', line)
  for target in LINK.findall(line):
    path = _clean(target)
    if path and not target.startswith(('#', 'mailto:')):
      full = os.path.normpath(os.path.join(root, page_dir, path))
      if not full.startswith(root + os.sep) or not exists(os.path.relpath(full, root), root):
        found.append(f'link to {target}: not in the tree')
  line = LINK.sub('] ', line)
  for module in PYTHON_M.findall(line):
    module = module.rstrip('.')
    if module.split('.')[0] not in THIRD_PARTY and not module_exists(module, root):
      found.append(f'python -m {module}: no such module in the tree')
  for name in DOTTED.findall(line):
    if name.split('.')[0] in top and os.path.isdir(os.path.join(root, name.split('.')[0])):
      if not dotted_exists(name, root):
        found.append(f'{name}: no such module in the tree')
  for script in (a or b for a, b in SCRIPT.findall(line)):
    script = _clean(script)
    if '/' in script or script.endswith(('.sh', '.py')):
      if not _outside(script) and not exists(script, root):
        found.append(f'{script}: no such script in the tree')
  for token, output in _tokens(line):
    path = _clean(token)
    if not path:
      continue
    if _outside(path):
      found.append(f'{path}: outside the repository (use runs/..., or a placeholder: DIR)')
    elif not output and path.split('/', 1)[0] in top and not exists(path, root):
      found.append(f'{path}: not in the tree')
  return found


def page_problems(page: str, root: str = ROOT, top=None) -> list:
  top = top_level(root) if top is None else top
  with open(os.path.join(root, page), encoding='utf-8') as f:
    lines = f.read().splitlines()
  page_dir = os.path.dirname(page)
  return [f'{page}:{n}: {problem}' for n, line in enumerate(lines, 1)
          for problem in dict.fromkeys(line_problems(line, top, page_dir, root))]


PAGES = ['README.md'] + sorted(os.path.relpath(p, ROOT)
                               for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))
                               if not p.endswith('CHANGELOG.md'))


@pytest.mark.parametrize('page', PAGES)
def test_the_page_names_only_what_is_in_the_tree(page):
  problems = page_problems(page)
  assert not problems, '\n'.join(problems)


# ------------------------------------------------------------------------- the checker itself
TOP = top_level()


@pytest.mark.parametrize('line', [
    'python -m tools.knob_table > docs/CONFIG.md',
    'run `python -m pytest tests -q` and `python -m venv .venv`',
    'bash tools/accelerator_venvs.sh cuda .venv-cuda && .venv-cuda/bin/python main.py --mode plan',
    'python main.py --config configs/cub.py:vit_base --workdir runs/cub --mode eval',
    'see [CONFIG.md](docs/CONFIG.md#the-knob-table) and `tests/test_e2e_*.py`, `tests/test_<module>.py`',
    'the readers in dca_jax/data/, `requirements*.txt`, `.ci/run`, dca_jax/{checks,config_lib}.py',
    'python main.py --workdir runs/mine --mode predict --out predictions/new.jsonl',
    'python -m dca_jax.reid.evaluate q.npz g.npz --out tests/fixtures/new.json  # written by it',
    'HF_HOME defaults to ~/.cache/huggingface; WORKDIR/export/model.onnx, DIR/config.json',
    '`dca_jax.checks.checked(config)`, `dca_jax.reid.evaluate`, tools.ablate; README.md, 1.5x',
    '```python serve.py',   # a fence's language tag and title
])
def test_the_checker_passes_what_exists_and_what_a_command_writes(line):
  assert line_problems(line, TOP) == []


@pytest.mark.parametrize('line,problem', [
    ('python -m tools.no_such_tool --list', 'python -m tools.no_such_tool: no such module'),
    ('python -m probe_reid', 'python -m probe_reid: no such module'),
    ('its `dca_jax.reid.gone.run` and `tools.old_tool`', 'dca_jax.reid.gone.run: no such module'),
    ('bash benchmarks/run_nothing.sh', 'benchmarks/run_nothing.sh: no such script'),
    ('python tools/gone.py --x', 'tools/gone.py: no such script'),
    ('the table comes from `dca_jax/old_module.py`.', 'dca_jax/old_module.py: not in the tree'),
    ('python main.py --config configs/nope.py:arg --workdir runs/x', 'configs/nope.py: not in'),
    ('every file in `tests/test_nothing_*.py`', 'tests/test_nothing_*.py: not in the tree'),
    ('see [the guide](docs/NOPE.md#part)', 'link to docs/NOPE.md#part: not in the tree'),
    ('run ../shared/gpu.sh first', '../shared/gpu.sh: outside the repository'),
    ('--workdir /shared/runs/cub', '/shared/runs/cub: outside the repository'),
    ('`--config.data_dir=/data/CUB`', '/data/CUB: outside the repository'),
])
def test_the_checker_fails_a_stale_or_outside_path(line, problem):
  found = line_problems(line, TOP)
  assert any(p.startswith(problem) for p in found), found


def test_a_link_is_read_from_its_page():
  assert line_problems('[CONFIG.md](CONFIG.md), [up](../README.md)', TOP, 'docs') == []
  assert line_problems('[x](../../outside.md)', TOP, 'docs') == [
      'link to ../../outside.md: not in the tree']
