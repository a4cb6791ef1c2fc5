"""Prints the README's knob table from dca_jax/config_lib.py (defaults and their comments,
read from the `_*_knobs` sections that `base_config` assembles).

  python tools/knob_table.py > /tmp/knobs.md   # then paste between the README markers
  python tools/knob_table.py --check README.md # exits 1 if the README's table is stale
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BEGIN, END = '<!-- knobs:begin -->', '<!-- knobs:end -->'


def table() -> str:
  from dca_jax import config_lib
  defaults = config_lib.base_config()
  reid = config_lib.reid_config()
  src = open(os.path.join(ROOT, 'dca_jax', 'config_lib.py')).read()
  # the knob sections: every `def _<section>_knobs(c)` up to base_config, in order
  src = src.split('\ndef base_config')[0]
  src = '\n'.join(part for part in src.split('\ndef ')[1:] if part.split('(')[0].endswith('_knobs'))
  rows = ['| knob | default (= the FGVC recipe) | Re-ID recipe (`reid_config`) | meaning |',
          '|---|---|---|---|']
  for key, comment in re.findall(r'^  c\.(\w+) = [^#\n]*(?:#\s*(.*))?$', src, re.M):
    if key not in defaults:
      continue
    d, r = defaults[key], reid[key]
    unset_dropped = lambda d: {k: v for k, v in d.to_dict().items() if v is not None}
    show = lambda v: '`' + (repr(unset_dropped(v)) if hasattr(v, 'to_dict') else repr(v)) + '`'
    rows.append(f'| `{key}` | {show(d)} | {show(r) if r != d else ""} '
                f'| {comment.replace("|", "/")} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  text = table()
  if len(sys.argv) == 3 and sys.argv[1] == '--check':
    readme = open(sys.argv[2]).read()
    current = readme.split(BEGIN)[1].split(END)[0].strip()
    sys.exit(0 if current == text else 'README knob table is stale: run tools/knob_table.py')
  print(text)
