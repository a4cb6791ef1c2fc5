"""Time two peer processes against each other on one machine, their commands alternating.

Each peer is a command line that starts a `--serve` process (`train_step.py --serve`,
`peer_timm.py --serve`): it builds and warms up, answers one `@@ {ready}` line, then times one
command per stdin line. This coordinator sends `step` (and, with --parts, `fwd`, `fwdbwd`,
`matmul`) to A and B in turn, ABBA order, so that only one of them computes at any moment and
load from other jobs hits both alike. It writes one JSON line (`kind: peers`) with every time,
the medians, ranges, the pairwise-median ratios B/A, GFLOP/s (each peer's own FLOP count) and the
share of A's JAX matmul peak measured in the same run, the load average before and after, and
the CPU model; and prints a markdown summary.

  python benchmarks/peers.py --a 'python benchmarks/train_step.py --serve --sa_only --remat off' \\
      --b '.venv-timm/bin/python benchmarks/peer_timm.py --serve' --rounds 5 --parts \\
      --out benchmarks/results/cpu_peers.jsonl

`benchmarks/run_cpu_peers.sh` is the usual entry point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

PREFIX = '@@ '


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown'


def loadavg() -> list:
  try:
    with open('/proc/loadavg') as f:
      return [float(v) for v in f.read().split()[:3]]
  except OSError:
    return []


class Peer:
  """One `--serve` process: commands on stdin, `@@ {json}` answers on stdout."""

  def __init__(self, name: str, command: str, log):
    self.name, self.command = name, command
    self.proc = subprocess.Popen(shlex.split(command), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
    self.ready = None

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(PREFIX):
        return json.loads(line[len(PREFIX):])
    raise RuntimeError(f'peer {self.name} exited (rc {self.proc.wait()}); see the log')

  def wait_ready(self) -> dict:
    self.ready = self.read()
    return self.ready

  def ask(self, cmd: str) -> dict:
    self.proc.stdin.write(cmd + '\n')
    self.proc.stdin.flush()
    rec = self.read()
    if 'error' in rec:
      raise RuntimeError(f'peer {self.name}: {rec["error"]}')
    return rec

  def close(self):
    try:
      self.proc.stdin.write('quit\n')
      self.proc.stdin.close()
    except (BrokenPipeError, ValueError):
      pass
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def summary(times):
  return {'median': statistics.median(times), 'min': min(times), 'max': max(times),
          'n': len(times)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--a', required=True, help='command line of peer A (the reference: ours)')
  p.add_argument('--b', required=True, help='command line of peer B')
  p.add_argument('--a_name', default='jax')
  p.add_argument('--b_name', default='timm')
  p.add_argument('--rounds', type=int, default=5, help='timed rounds (each: A and B once per part)')
  p.add_argument('--parts', action='store_true',
                 help='also time fwd, fwdbwd and matmul (A\'s matmul = the JAX matmul peak)')
  p.add_argument('--matmul_reps', type=int, default=3, help='matmuls per round and peer')
  p.add_argument('--flops_from_a', action='store_true',
                 help="B's GFLOP/s from A's FLOP count (when both run the same model: "
                      "FlopCounterMode does not count PyTorch's CPU attention kernel)")
  p.add_argument('--label', default='')
  p.add_argument('--out', default='', help='append the JSON line here')
  p.add_argument('--log', default='', help='peers\' stderr (default: this stderr)')
  args = p.parse_args(argv)

  log = open(args.log, 'a') if args.log else sys.stderr
  load0 = loadavg()
  t0 = time.time()
  peers = {}
  try:
    # Start one at a time: compiling both at once would only slow both.
    for name, cmd in ((args.a_name, args.a), (args.b_name, args.b)):
      print(f'# starting {name}: {cmd}', file=sys.stderr, flush=True)
      peers[name] = Peer(name, cmd, log)
      peers[name].wait_ready()
    names = [args.a_name, args.b_name]
    parts = ['step'] + (['fwd', 'fwdbwd', 'matmul'] if args.parts else [])
    times = {n: {part: [] for part in parts} for n in names}
    faults = {n: {part: [] for part in parts} for n in names}
    cpu = {n: {part: [] for part in parts} for n in names}
    loads = []
    for r in range(args.rounds):
      order = names if r % 2 == 0 else names[::-1]
      for part in parts:
        for n in order:
          for _ in range(args.matmul_reps if part == 'matmul' else 1):
            rec = peers[n].ask(part)
            times[n][part].append(rec['s'])
            faults[n][part].append(rec.get('minflt', 0))
            cpu[n][part].append(rec.get('user_s', 0.0) + rec.get('sys_s', 0.0))
      loads.append(loadavg()[0] if loadavg() else None)
      print(f'# round {r + 1}/{args.rounds}: ' + ', '.join(
          f'{n} step {times[n]["step"][-1]:.3f} s' for n in names) + f'; load {loads[-1]}',
            file=sys.stderr, flush=True)
  finally:
    for peer in peers.values():
      peer.close()

  a, b = names
  fa, fb = peers[a].ready['flops'], peers[b].ready['flops']
  if args.flops_from_a:
    fb = dict(fb, **{k: v for k, v in fa.items() if k != 'matmul'})
  rec = {'kind': 'peers', 'label': args.label, 'a': a, 'b': b, 'rounds': args.rounds,
         'a_command': args.a, 'b_command': args.b,
         'cpu': cpu_model(), 'cpu_count': os.cpu_count(), 'a_ready': peers[a].ready,
         'b_ready': peers[b].ready, 'times': times, 'minflt': faults, 'cpu_s': cpu,
         'b_flops_from_a': args.flops_from_a, 'load_start': load0, 'load_end': loadavg(), 'load_per_round': loads,
         'wall_s': round(time.time() - t0, 1),
         'time': datetime.datetime.now().isoformat(timespec='seconds'),
         'command': ' '.join(shlex.quote(x) for x in ['python', *sys.argv])}
  for part in parts:
    ta, tb = times[a][part], times[b][part]
    rec[f'{part}_{a}'] = summary(ta)
    rec[f'{part}_{b}'] = summary(tb)
    pairwise = [y / x for x, y in zip(ta, tb)]
    rec[f'{part}_ratio_{b}_over_{a}'] = statistics.median(pairwise)
    rec[f'{part}_ratio_{a}_over_{b}'] = statistics.median([1 / q for q in pairwise])
    # CPU seconds per call: less sensitive to other jobs than wall time on a shared machine
    rec[f'{part}_cpu_s_{a}'] = statistics.median(cpu[a][part])
    rec[f'{part}_cpu_s_{b}'] = statistics.median(cpu[b][part])
    rec[f'{part}_gflops_{a}'] = fa[part] / statistics.median(ta) / 1e9
    rec[f'{part}_gflops_{b}'] = fb[part] / statistics.median(tb) / 1e9
  if 'matmul' in parts:
    peak = rec[f'matmul_gflops_{a}']
    rec['jax_matmul_peak_gflops'] = peak
    rec['jax_matmul_peak_gflops_best'] = fa['matmul'] / min(times[a]['matmul']) / 1e9
    for part in ('step', 'fwd', 'fwdbwd'):
      rec[f'{part}_{a}_share_of_jax_peak'] = rec[f'{part}_gflops_{a}'] / peak
  line = json.dumps(rec)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'a') as f:
      f.write(line + '\n')
  print(render([rec]))
  return 0


def render(recs) -> str:
  """Markdown: one table per record (A vs B per part), with machine, load and command."""
  out = []
  for r in recs:
    a, b = r['a'], r['b']
    ra, rb = r['a_ready'], r['b_ready']
    what = (f'{ra.get("backbone")} {ra.get("size")} px, batch {ra.get("batch")}, '
            f'{"DCAL" if ra.get("glca_M") or ra.get("pwca_T") else "SA only"}, '
            f'remat {"on" if ra.get("remat") else "off"}, {ra.get("precision")}')
    out.append(f'**{r.get("label") or "peers"}** ({what}; {b}: {rb.get("model", "")}) on '
               f'{r["cpu"]} ({r["cpu_count"]} cores), {r["time"]}, {r["rounds"]} rounds, '
               f'load {r["load_start"][:1]} -> {r["load_end"][:1]}')
    out.append('')
    out.append(f'| part | {a} s median [min, max] | {b} s median [min, max] | {a}/{b} '
               f'(pairwise median) | {a} GFLOP/s | {b} GFLOP/s | {a} % of JAX matmul peak | '
               f'{a} / {b} CPU s per call | {a} / {b} page faults per call |')
    out.append('|---|---|---|---|---|---|---|---|---|')
    for part in ('step', 'fwd', 'fwdbwd', 'matmul'):
      if f'{part}_{a}' not in r:
        continue
      sa, sb = r[f'{part}_{a}'], r[f'{part}_{b}']
      share = r.get(f'{part}_{a}_share_of_jax_peak')
      fa = statistics.median(r['minflt'][a][part])
      fb = statistics.median(r['minflt'][b][part])
      out.append(f'| {part} | {sa["median"]:.3f} [{sa["min"]:.3f}, {sa["max"]:.3f}] | '
                 f'{sb["median"]:.3f} [{sb["min"]:.3f}, {sb["max"]:.3f}] | '
                 f'**{r[f"{part}_ratio_{a}_over_{b}"]:.2f}x** | {r[f"{part}_gflops_{a}"]:.1f} | '
                 f'{r[f"{part}_gflops_{b}"]:.1f} | '
                 f'{"" if share is None else f"{100 * share:.0f}%"} | '
                 f'{r.get(f"{part}_cpu_s_{a}", float("nan")):.2f} / '
                 f'{r.get(f"{part}_cpu_s_{b}", float("nan")):.2f} | {fa:.0f} / {fb:.0f} |')
    if 'jax_matmul_peak_gflops' in r:
      out.append('')
      out.append(f'JAX matmul peak ({ra.get("matmul_n")}^2 fp32, same run): '
                 f'{r["jax_matmul_peak_gflops"]:.1f} GFLOP/s median '
                 f'(best {r["jax_matmul_peak_gflops_best"]:.1f}). '
                 f'FLOPs: {a} XLA cost analysis ({ra["flops"]["step"] / 1e9:.1f} GFLOP/step), '
                 + (f'{b} the same count (same model)' if r.get('b_flops_from_a') else
                    f'{b} XLA cost analysis ({rb["flops"]["step"] / 1e9:.1f} GFLOP/step)'
                    if rb.get('framework') == 'jax' else
                    f'{b} FlopCounterMode ({rb["flops"]["step"] / 1e9:.1f} GFLOP fwd+bwd, '
                    'CPU attention not counted)') + '.')
    out.append('')
  return '\n'.join(out)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--render':
    recs = []
    for path in sys.argv[2:]:
      with open(path) as f:
        recs += [json.loads(line) for line in f if line.strip()]
    print(render([r for r in recs if r.get('kind') == 'peers']))
  else:
    sys.exit(main())
