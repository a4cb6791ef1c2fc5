"""Fills the weight cache where the network is open, so that a job without it finds the files
(run it with the HF_HOME the job will see); each file verified (dca_jax/hub.py), its path printed.

  python -m tools.fetch_weights --paper                 # the paper's weights for every backbone
  python -m tools.fetch_weights timm/deit_tiny_patch16_224.fb_in1k imagenet21k/ViT-B_16.npz
  python -m tools.fetch_weights --list                  # the names we know, and the paper's
  HF_HUB_OFFLINE=1 python -m tools.fetch_weights NAME   # only check what the cache holds
"""

import argparse
import sys


def main(argv=None) -> int:
  from dca_jax import hub  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('names', nargs='*', help='Hub ids, known names or files')
  parser.add_argument('--paper', action='store_true', help="the paper's weights (PAPER_WEIGHTS)")
  parser.add_argument('--list', action='store_true', help='print the known names and exit')
  parser.add_argument('--cache-dir', default=None,
                      help='the Hub cache (default: huggingface_hub\'s, from HF_HOME / HF_HUB_CACHE)')
  args = parser.parse_args(argv)
  if args.list:
    paper = {name: backbone for backbone, name in hub.PAPER_WEIGHTS.items()}
    for name, known in hub.KNOWN.items():
      mark = f'  [paper default for {paper[name]}]' if name in paper else ''
      print(f'{name}\n    {known.backbone}: {known.description}; inputs {known.normalization}'
            f'{mark}')
    return 0
  names = list(args.names) + (list(hub.PAPER_WEIGHTS.values()) if args.paper else [])
  if not names:
    parser.error('name weights to fetch, or pass --paper or --list')
  status = 0
  for name in dict.fromkeys(names):
    try:
      resolved = hub.resolve(name, cache_dir=args.cache_dir)
    except hub.WeightFetchError as error:
      print(f'error: {error}', file=sys.stderr)
      status = 1
      continue
    if resolved is None:
      print(f'{name}: nothing to fetch (random initialisation)')
    else:
      print(f'{name}: {resolved.path} ({resolved.verified})')
  return status


if __name__ == '__main__':
  sys.exit(main())
