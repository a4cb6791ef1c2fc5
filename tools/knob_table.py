"""The knob table of docs/CONFIG.md, made from dca_jax/config_lib.py's declarations (`KNOBS`:
each knob's default, doc and section; the Re-ID column from the Re-ID recipe, tasks/reid.py).

  python -m tools.knob_table                          # prints it
  python -m tools.knob_table --write docs/CONFIG.md   # replaces it between the markers
  python -m tools.knob_table --check docs/CONFIG.md   # exits 1 if the file's table is stale
"""

import sys

from dca_jax import config_lib, tasks

BEGIN, END = '<!-- knobs:begin -->', '<!-- knobs:end -->'
SECTION_TITLES = {'data': 'data', 'reid': 'Re-ID input (task=reid)', 'model': 'model',
                  'optim': 'optimisation', 'eval': 'evaluation, checkpoints, logging'}


def _show(value) -> str:
  if hasattr(value, 'to_dict'):  # a ConfigDict: its set entries
    value = {k: v for k, v in value.to_dict().items() if v is not None}
  return f'`{value!r}`'


def table() -> str:
  defaults = config_lib.base_config()
  reid = tasks.task_config('reid', 'vit_base')
  rows = ['| knob | default (= the FGVC recipe) | Re-ID recipe (`tasks/reid.py`) | meaning |',
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


def main(argv) -> None:
  text = table()
  if len(argv) == 3 and argv[1] in ('--check', '--write'):
    with open(argv[2]) as f:
      page = f.read()
    head, rest = page.split(BEGIN)
    current, tail = rest.split(END)
    if argv[1] == '--check':
      sys.exit(0 if current.strip() == text else
               f'{argv[2]}: the knob table is stale: run python -m tools.knob_table --write '
               f'{argv[2]}')
    with open(argv[2], 'w') as f:
      f.write(f'{head}{BEGIN}\n{text}\n{END}{tail}')
    return
  print(text)


if __name__ == '__main__':
  main(sys.argv)
