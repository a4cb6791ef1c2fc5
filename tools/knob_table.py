"""Prints the README's knob table from dca_jax/config_lib.py's declarations (`KNOBS`: each
knob's default, doc and section; the Re-ID column from `reid_config`).

  python -m tools.knob_table > /tmp/knobs.md   # then paste between the README markers
  python -m tools.knob_table --check README.md # exits 1 if the README's table is stale
"""

import sys

from dca_jax import config_lib

BEGIN, END = '<!-- knobs:begin -->', '<!-- knobs:end -->'
SECTION_TITLES = {'data': 'data', 'reid': 'Re-ID input (task=reid)', 'model': 'model',
                  'optim': 'optimisation', 'eval': 'evaluation, checkpoints, logging'}


def _show(value) -> str:
  if hasattr(value, 'to_dict'):  # a ConfigDict: its set entries
    value = {k: v for k, v in value.to_dict().items() if v is not None}
  return f'`{value!r}`'


def table() -> str:
  defaults = config_lib.base_config()
  reid = config_lib.reid_config()
  rows = ['| knob | default (= the FGVC recipe) | Re-ID recipe (`reid_config`) | meaning |',
          '|---|---|---|---|']
  section = None
  for name, knob in config_lib.KNOBS.items():
    if knob.section != section:
      section = knob.section
      rows.append(f'| **{SECTION_TITLES.get(section, section)}** | | | |')
    d, r = defaults[name], reid[name]
    rows.append(f'| `{name}` | {_show(d)} | {_show(r) if r != d else ""} '
                f'| {knob.doc.replace("|", "/")} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  text = table()
  if len(sys.argv) == 3 and sys.argv[1] == '--check':
    readme = open(sys.argv[2]).read()
    current = readme.split(BEGIN)[1].split(END)[0].strip()
    sys.exit(0 if current == text else 'README knob table is stale: run python -m tools.knob_table')
  print(text)
