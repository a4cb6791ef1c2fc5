"""The shape of the project: the layers of docs/ARCHITECTURE.md hold (lint-imports), no import
cycle anywhere in dca_jax (imports inside functions counted), modules and functions stay small
(the package, benchmarks/ and tools/ alike), the tree is lint-clean, and README/docs carry no
history (docs/CHANGELOG.md does)."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = os.path.join(ROOT, 'dca_jax')
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 59


def _modules(*roots):
  for root in roots or (PACKAGE,):
    for folder, _, names in os.walk(root):
      for name in sorted(names):
        if name.endswith('.py'):
          yield os.path.join(folder, name)


def _module_name(path):
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _imports(path, modules):
  """The dca_jax modules `path` imports, at the top or inside a function (`from pkg import mod`
  is an import of pkg.mod, as grimp counts it)."""
  tree = ast.parse(open(path).read())
  name = _module_name(path)
  package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith('dca_jax'))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      if base.startswith('dca_jax'):
        submodules = {f'{base}.{a.name}' for a in node.names} & set(modules)
        found.update(submodules or {base})
        if len(submodules) < len(node.names):
          found.add(base)
  return found


def test_lint_imports_keeps_the_layers():
  # the one installed beside this Python (a venv not on PATH), else PATH's
  beside = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
  exe = beside if os.path.exists(beside) else shutil.which('lint-imports')
  if exe is None:
    pytest.skip('import-linter is not installed (requirements-dev.txt)')
  r = subprocess.run([exe, '--no-cache'], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-1000:]
  assert 'dca_jax layers KEPT' in r.stdout


def test_no_import_cycle_in_the_package():
  """Our own reading of every import statement (also inside functions), independent of
  import-linter: the module graph has no cycle."""
  modules = {_module_name(p): p for p in _modules()}
  graph = {m: {i for i in _imports(p, modules) if i in modules and i != m}
           for m, p in modules.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m)


SCRIPTS = ('benchmarks', 'tools', os.path.join('tests', 'fixtures'))  # the last: its generators


def test_modules_and_functions_are_small():
  """The package's rules of size hold for the scripts beside it too."""
  long_modules, long_functions = [], []
  for path in _modules(PACKAGE, *(os.path.join(ROOT, d) for d in SCRIPTS)):
    text = open(path).read()
    if text.count('\n') > MAX_MODULE_LINES:
      long_modules.append(f'{os.path.relpath(path, ROOT)}: {text.count(chr(10))} lines')
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          long_functions.append(f'{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}: '
                                f'{length} lines')
  assert not long_modules, long_modules
  assert not long_functions, long_functions


MAX_SCRIPT_LINES = 3500   # benchmarks/ and tools/ together, their results (data) aside


def _script_files() -> list:
  """benchmarks/ and tools/ as git tracks them or would (untracked, not ignored); without git,
  the folders' files less caches. The results are data, not counted."""
  try:
    paths = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard',
                            'benchmarks', 'tools'], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    paths = [os.path.relpath(os.path.join(folder, name), ROOT) for top in ('benchmarks', 'tools')
             for folder, _, names in os.walk(os.path.join(ROOT, top))
             if '__pycache__' not in folder for name in names]
  results = os.path.join('benchmarks', 'results') + os.sep
  return [p for p in paths if not p.startswith(results) and os.path.isfile(os.path.join(ROOT, p))]


def test_benchmarks_and_tools_stay_within_their_line_budget():
  """All the scripts beside the package together: MAX_SCRIPT_LINES lines at most (`wc -l`)."""
  lines = {p: open(os.path.join(ROOT, p), 'rb').read().count(b'\n') for p in _script_files()}
  assert len(lines) > 20 and sum(lines.values()) <= MAX_SCRIPT_LINES, (
      sum(lines.values()), sorted(lines.items(), key=lambda kv: -kv[1])[:10])


HISTORY = re.compile(r'issues? #?\d+|#\d{2}\b|before the fixes|machine was loaded|'
                     r'\b20\d\d-\d\d-\d\d\b|this session|last session', re.IGNORECASE)


def test_readme_and_docs_carry_no_history():
  """Issue numbers, dates of work, machine-load remarks live in docs/CHANGELOG.md only (a date
  inside a cited upstream commit is the one kind allowed: 'at commit <sha>, <date>')."""
  pages = [os.path.join(ROOT, 'README.md')] + [
      os.path.join(ROOT, 'docs', n) for n in sorted(os.listdir(os.path.join(ROOT, 'docs')))
      if n.endswith('.md') and n != 'CHANGELOG.md']
  found = []
  for page in pages:
    for number, line in enumerate(open(page), 1):
      if HISTORY.search(re.sub(r'at commit \w+, \d{4}-\d\d-\d\d', '', line)):
        found.append(f'{os.path.relpath(page, ROOT)}:{number}: {line.strip()[:120]}')
  assert not found, '\n'.join(found)


def test_the_tree_is_lint_clean():
  """ruff with pyproject.toml's rules over the whole repository (the library strictly), the
  fixture generators named as well: pyproject.toml keeps ruff's walk out of tests/fixtures/."""
  r = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.', 'tests/fixtures'],
                     cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
