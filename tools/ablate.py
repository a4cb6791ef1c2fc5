"""Ablation grids: config variants x seeds x thread counts, each trained and evaluated by main.py.

  python -m tools.ablate --grid paper --seeds 0,1,2                 # the paper's ablations, demo
  python -m tools.ablate --grid demo --seeds 0,1,2 --threads 1,2 --jobs 2 --tolerance 3 \
      --out runs/demo_spread                 # the README's demo figure, and its check
  python -m tools.ablate --grid selection --variants dcal_local_rollout \
      --test_time random:glca_select=random --test_time last_layer:glca_select=last_layer

Each run is `main.py --mode train` then `--mode eval` into OUT/<variant>/seed_<s>_threads_<t>
with `--config.seed=<s>`, the common `--set KEY=VALUE` and the variant's overrides as
`--config.KEY=VALUE`. Finished runs are lines of OUT/results.jsonl (a rerun skips them and
resumes an interrupted one); OUT/table.md holds mean ± std per variant, OUT/runs.md each run.
`--threads 1` pins a run to one processor (as `taskset -c`), `--jobs 2` runs two such side by
side; `--tolerance 3` exits 1 naming each run more than 3 points from its variant's mean.
`--test_time NAME:KEY=VALUE[,...]` evaluates finished runs again with knobs changed at test time
only (OUT/test_time.md: each swap paired with the same weights as trained). docs/ABLATIONS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import subprocess
import sys
import time

import numpy as np

from benchmarks import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SA_ONLY = {'num_glca_layers': 0, 'num_pwca_layers': 0}


def _dcal(pool, select='rollout', **extra):
  return {'glca_pool': pool, 'glca_select': select, **extra}


_SELECTIONS = {f'dcal_{pool}_{select}': _dcal(pool, select) for pool in ('mean', 'local')
               for select in ('rollout', 'random', 'last_layer')}
# Named grids: variant name -> overrides (on top of the config file and --set).
GRIDS = {
    'paper': {  # the paper's ablations (DeiT-T, CUB; Tables 4-6) on the config given
        'sa_only': _SA_ONLY, 'sa_pwca': {'num_glca_layers': 0},
        'sa_glca_local': {'num_pwca_layers': 0, **_dcal('local')},
        'dcal_cls': _dcal('cls'),  # every glca_select gives the same model under 'cls'
        **_SELECTIONS,
        'dcal_local_rollout_all_blocks': _dcal('local', rollout_layers='all'),
        **{f'dcal_local_r{int(100 * r)}': _dcal('local', top_k_ratio=r) for r in (0.05, 0.1, 0.3)},
        # few local queries: where a random pick should most often miss the decisive patch
        'dcal_local_random_r5': _dcal('local', 'random', top_k_ratio=0.05),
        'dcal_lw_lr_x10': {'loss_weights_lr_multiplier': 10.0},
    },
    'selection': _SELECTIONS,   # the pooled readings with each selection
    'loss_weights': {f'dcal_lw_lr_x{m:g}': {'loss_weights_lr_multiplier': m}
                     for m in (1.0, 10.0, 100.0)},
    # the README's demo figures: DCAL and SA-only at the same budget (Re-ID demo: its mAP)
    'demo': {'dcal': {}, 'sa_only': _SA_ONLY},
}


def parse_set(items):
  """['key=value', ...] -> [(key, value)] in order (values stay strings, as on the CLI)."""
  out = []
  for item in items or ():
    if '=' not in item:
      raise SystemExit(f'error: --set {item!r} is not KEY=VALUE')
    key, value = item.split('=', 1)
    out.append((key.strip(), value.strip()))
  return out


def parse_test_time(items):
  """['name:key=value,key=value', ...] -> [(name, [(key, value), ...])]."""
  out = []
  for item in items or ():
    if ':' not in item:
      raise SystemExit(f'error: --test_time {item!r} is not NAME:KEY=VALUE[,KEY=VALUE]')
    name, pairs = item.split(':', 1)
    out.append((name.strip(), parse_set(pairs.split(','))))
  return out


def _flag(key, value) -> str:
  return f'--config.{key}={json.dumps(value) if isinstance(value, bool) else value}'


def _flags(common, seed, overrides) -> list:
  """One run's --config.* flags: --set, the seed, then the variant's (later ones win)."""
  return ([_flag(k, v) for k, v in common] + [f'--config.seed={seed}']
          + [_flag(k, v) for k, v in overrides])


def _main_py(config, workdir, mode, flags, cpus=None):
  """`main.py --mode MODE` on `workdir`, pinned to `cpus` (jax and TensorFlow size their pools
  by the processors a process may use), its output appended to workdir/ablate.log."""
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={config}',
         f'--workdir={workdir}', f'--mode={mode}'] + flags
  with open(os.path.join(workdir, 'ablate.log'), 'a') as log:
    log.write(' '.join(cmd) + '\n')
    log.flush()
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                          preexec_fn=pin).returncode
  if code:
    raise RuntimeError(f'{workdir}: main.py --mode {mode} {" ".join(flags)} exited {code} '
                       f'(see {log.name})')


def run_one(config, workdir, seed, overrides, common, *, cpus=None) -> dict:
  """Train + eval one variant/seed on the processors `cpus` (None: all); its result record."""
  flags = _flags(common, seed, overrides.items())
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  _main_py(config, workdir, 'train', flags, cpus=cpus)
  train_s = time.time() - start
  _main_py(config, workdir, 'eval', flags, cpus=cpus)
  result = json.load(open(os.path.join(workdir, 'eval.json')))
  metric = 'accuracy' if 'accuracy' in result else 'mAP'   # the task's metric (Re-ID: mAP)
  return {'accuracy': result[metric], 'metric': metric, 'accuracy_sa': result.get('accuracy_sa'),
          'accuracy_glca': result.get('accuracy_glca'),
          'num_images': result.get('num_images', result.get('num_query')),
          'wall_s': time.time() - start, 'train_s': train_s,
          'threads': len(cpus) if cpus else len(os.sched_getaffinity(0)),
          'cpu': machine.cpu_model(), **_loss_weights(workdir)}


def eval_again(config, workdir, seed, overrides, common, name, swaps):
  """`main.py --mode eval` of a finished run with `swaps` changed; its results."""
  path = os.path.join(workdir, f'eval_{name}.json')
  if not os.path.exists(path):
    flags = _flags(common, seed, list(overrides.items()) + list(swaps))
    _main_py(config, workdir, 'eval', flags + [f'--eval_out=eval_{name}.json'])
  return json.load(open(path))


def _loss_weights(workdir) -> dict:
  """The last logged uncertainty weights w_b of a run."""
  last, path = {}, os.path.join(workdir, 'metrics.jsonl')
  for line in open(path) if os.path.exists(path) else ():
    last.update({k.split('/')[-1]: v for k, v in json.loads(line).items()
                 if k.startswith('train/w_')})
  return last


def load_results(path):
  """{(variant, seed, threads): record} of the finished runs in results.jsonl."""
  records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  return {(r['variant'], r['seed'], r.get('threads', 1)): r for r in records}


def _runs_of(name, results) -> list:
  return [r for (v, *_), r in sorted(results.items()) if v == name]


def _pct(values):
  a = 100 * np.asarray([v for v in values if v is not None], np.float64)
  return f'{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}' if len(a) else '–'


def _write(path, rows) -> str:
  text = '\n'.join(rows) + '\n'
  with open(path, 'w') as f:
    f.write(text)
  return text


def out_of_tolerance(variants, results, points: float) -> list:
  """A line per run whose SA+GLCA top-1 is more than `points` from its variant's mean over
  every seed and thread count (the demo must not depend on the machine's rounding)."""
  lines = []
  for name in variants:
    recs = _runs_of(name, results)
    mean = 100 * np.mean([r['accuracy'] for r in recs]) if recs else 0.0
    lines += [f'{name} seed {r["seed"]} on {r.get("threads", 1)} thread(s): '
              f'{100 * r["accuracy"]:.1f} % is {abs(100 * r["accuracy"] - mean):.1f} points '
              f'from the mean {mean:.1f} % (tolerance {points:g})'
              for r in recs if abs(100 * r['accuracy'] - mean) > points]
  return lines


def write_table(path, variants, results, header: str) -> str:
  rows = [header, '', '| variant | overrides | seeds | SA+GLCA top-1 % | SA % | GLCA % | '
          'w_sa / w_glca / w_pwca | wall s (train+eval) |', '|---|---|---|---|---|---|---|---|']
  for name, overrides in variants.items():
    recs = _runs_of(name, results)
    if recs:
      ws = ' / '.join(f'{np.mean([r[k] for r in recs]):.2f}' if all(k in r for r in recs)
                      else '–' for k in ('w_sa', 'w_glca', 'w_pwca'))
      over = ', '.join(f'{k}={v}' for k, v in overrides.items()) or '(config as is)'
      rows.append(f'| {name} | {over} | {",".join(str(r["seed"]) for r in recs)} | '
                  f'**{_pct([r["accuracy"] for r in recs])}** | '
                  f'{_pct([r["accuracy_sa"] for r in recs])} | '
                  f'{_pct([r["accuracy_glca"] for r in recs])} | {ws} | '
                  f'{np.mean([r["wall_s"] for r in recs]):.0f} |')
  return _write(path, rows)


def write_runs(path, variants, results) -> str:
  """One row per run: variant, seed, threads, CPU, top-1, train seconds (the README's table)."""
  rows = ['| variant | seed | threads | CPU | top-1 (Re-ID: mAP) % | train s |',
          '|---|---|---|---|---|---|']
  rows += [f'| {name} | {seed} | {threads} | {r.get("cpu", "?")} | {100 * r["accuracy"]:.1f} | '
           f'{r.get("train_s", r["wall_s"]):.0f} |'
           for (name, seed, threads), r in sorted(results.items()) if name in variants]
  return _write(path, rows)


def _paired(recs, test, key):
  """The swapped evaluation's `key` and its per-seed difference to the run as trained (same
  weights, same test set: the seed noise of training cancels)."""
  swapped = [r['test_time'][test][key] for r in recs]
  if any(v is None for v in swapped):
    return '–'
  return f'{_pct(swapped)} (Δ {_pct([s - r[key] for s, r in zip(swapped, recs)])})'


def write_test_time_table(path, variants, results, tests, header) -> str:
  """Per trained variant: as trained, then each swap paired, for SA+GLCA and GLCA alone."""
  rows = [header, '', '| trained as | seeds | branch | evaluated as trained | ' + ' | '.join(
      f'evaluated with {name} ({", ".join(f"{k}={v}" for k, v in swaps)})'
      for name, swaps in tests) + ' |', '|---|---|---|---|' + '---|' * len(tests)]
  for variant in variants:
    recs = [r for r in _runs_of(variant, results) if 'test_time' in r]
    for branch, key in (('SA+GLCA', 'accuracy'), ('GLCA', 'accuracy_glca')) if recs else ():
      cells = [_pct([r[key] for r in recs])] + [_paired(recs, name, key) for name, _ in tests]
      rows.append(f'| {variant} | {",".join(str(r["seed"]) for r in recs)} | {branch} | '
                  + ' | '.join(cells) + ' |')
  return _write(path, rows)


def _cpu_slots(jobs: int, threads: int) -> list:
  """The processor sets `jobs` runs of `threads` threads can use side by side (0: all, one run
  at a time)."""
  cpus = sorted(os.sched_getaffinity(0))
  if not threads or threads >= len(cpus):
    return [None]
  return [set(cpus[k * threads:(k + 1) * threads])
          for k in range(max(1, min(jobs, len(cpus) // threads)))]


def _done(rec, results, results_path) -> None:
  with open(results_path, 'a') as f:
    f.write(json.dumps(rec) + '\n')
  results[(rec['variant'], rec['seed'], rec['threads'])] = rec
  print(f'{rec["variant"]} seed {rec["seed"]} on {rec["threads"]} thread(s): {rec["metric"]} '
        f'{rec["accuracy"]:.3f} (SA {rec["accuracy_sa"]}, GLCA {rec["accuracy_glca"]}; train '
        f'{rec["train_s"]:.0f} s)', flush=True)


def run_grid(a, variants, common, seeds, results, results_path) -> None:
  """Every (variant, seed, thread count) not in `results`: one-thread runs side by side (up to
  --jobs, each on its own processor), wider runs one at a time."""
  for threads in a.thread_counts:
    count = threads or len(os.sched_getaffinity(0))
    todo = [(n, s) for n in variants for s in seeds if (n, s, count) not in results]
    slots = queue.Queue()
    for cpus in _cpu_slots(a.jobs, threads) if todo else ():
      slots.put(cpus)

    def job(name, seed, count=count, slots=slots):
      cpus = slots.get()
      try:
        return {'variant': name, 'seed': seed, 'overrides': variants[name],
                'common': dict(common), **run_one(
                    a.config, os.path.join(a.out, name, f'seed_{seed}_threads_{count}'), seed,
                    variants[name], common, cpus=cpus)}
      finally:
        slots.put(cpus)

    with concurrent.futures.ThreadPoolExecutor(max(1, slots.qsize())) as pool:
      futures = {pool.submit(job, *item): item for item in todo}
      for future in concurrent.futures.as_completed(futures):
        try:
          _done(future.result(), results, results_path)
        except RuntimeError as e:
          print(f'FAILED {futures[future]}: {e}', flush=True)


def _parser():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'demo.py'))
  p.add_argument('--grid', default='paper', choices=sorted(GRIDS))
  p.add_argument('--variants', default='', help='comma-separated subset of the grid (default all)')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='a knob for every run (repeatable), e.g. --set num_epochs=24')
  p.add_argument('--out', default=os.path.join(ROOT, 'runs', 'ablate'))
  p.add_argument('--jobs', type=int, default=1, help='one-thread runs at a time')
  p.add_argument('--threads', default='', help='processors per run (a list: each); 0 = all; '
                 'default 1 with --jobs > 1, else 0')
  p.add_argument('--tolerance', type=float, default=0.0,
                 help="exit 1 if a run's top-1 is further than this many points from its "
                      "variant's mean (0: no check)")
  p.add_argument('--table_only', action='store_true')
  p.add_argument('--test_time', action='append', default=[], metavar='NAME:KEY=VALUE[,...]',
                 help='evaluate finished runs again with these knobs changed (repeatable)')
  return p


def main():
  a = _parser().parse_args()
  grid = GRIDS[a.grid]
  names = [v.strip() for v in a.variants.split(',') if v.strip()] or list(grid)
  if set(names) - set(grid):
    raise SystemExit(f'error: unknown variant(s) {sorted(set(names) - set(grid))} in grid '
                     f'{a.grid}: {", ".join(grid)}')
  variants, seeds = {n: grid[n] for n in names}, [int(s) for s in a.seeds.split(',') if s]
  a.thread_counts = [int(t) for t in a.threads.split(',') if t] or [1 if a.jobs > 1 else 0]
  common = parse_set(a.set)
  os.makedirs(a.out, exist_ok=True)
  results_path = os.path.join(a.out, 'results.jsonl')
  results = load_results(results_path)
  header = (f'Config `{os.path.relpath(a.config, ROOT)}`'
            + (' with ' + ', '.join(f'`{k}={v}`' for k, v in common) if common else '')
            + f'; seeds {a.seeds}; mean ± std (sample) over seeds and thread counts.')
  if not a.table_only:
    run_grid(a, variants, common, seeds, results, results_path)
  print(write_table(os.path.join(a.out, 'table.md'), variants, results, header))
  print(write_runs(os.path.join(a.out, 'runs.md'), variants, results))
  tests = parse_test_time(a.test_time)
  for (name, seed, threads), rec in sorted(results.items()) if tests else ():
    if name in variants:
      workdir = os.path.join(a.out, name, f'seed_{seed}_threads_{threads}')
      rec['test_time'] = {test: eval_again(a.config, workdir, seed, variants[name], common,
                                           test, swaps) for test, swaps in tests}
  if tests:
    print(write_test_time_table(os.path.join(a.out, 'test_time.md'), variants, results, tests,
                                header))
  far = out_of_tolerance(variants, results, a.tolerance) if a.tolerance else []
  if far:
    raise SystemExit('error: ' + '; '.join(far))


if __name__ == '__main__':
  main()
