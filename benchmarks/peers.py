"""Time peer processes against each other on one machine, their commands alternating.

Each peer is a command line that starts a serving process (`benchmarks/step_serve.py`,
`peer_timm.py --serve`): it builds and warms up, answers one `@@ {ready}` line, then times one
command per stdin line. This coordinator sends `step` (and, with --parts, `fwd`, `fwdbwd`,
`matmul`) to every peer in turn, the order reversed every other round (ABBA...), so that only
one of them computes at any moment and load from other jobs hits all alike. It writes one JSON
line (`kind: peers`) with every time, CPU seconds and page-fault count, the medians and ranges,
the pairwise-median ratio of each peer to the first (the reference), GFLOP/s, the share of the
JAX matmul peak measured in the same run (the first peer's `matmul`), the load average and the
CPU model; and prints a markdown summary.

  python -m benchmarks.peers \\
      --peer 'jax=python -m benchmarks.step_serve --config.num_glca_layers=0 \\
          --config.num_pwca_layers=0 --config.use_gradient_checkpointing=false' \\
      --peer 'timm=.venv-timm/bin/python -m benchmarks.peer_timm --serve' \\
      --same_flops timm=jax --rounds 5 --parts --out benchmarks/results/cpu_peers.jsonl
  python -m benchmarks.peers --render benchmarks/results/cpu_peers.jsonl

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
from benchmarks.machine import cpu_model, isa_flags

PREFIX = '@@ '
PARTS = ('step', 'fwd', 'fwdbwd', 'matmul')




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


def name_value(item: str, what: str):
  name, sep, value = item.partition('=')
  if not sep or not name or not value:
    raise SystemExit(f'{what} must be NAME=VALUE, got {item!r}')
  return name, value


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--peer', action='append', required=True, metavar='NAME=COMMAND',
                 help='a peer (repeat; the first is the reference of the ratios)')
  p.add_argument('--rounds', type=int, default=5, help='timed rounds (each peer once per part)')
  p.add_argument('--parts', action='store_true',
                 help="also time fwd, fwdbwd and matmul (the first peer's matmul = the JAX "
                      'matmul peak)')
  p.add_argument('--matmul_reps', type=int, default=3, help='matmuls per round and peer')
  p.add_argument('--same_flops', action='append', default=[], metavar='NAME=REF',
                 help="NAME's GFLOP/s from REF's FLOP count (same model: FlopCounterMode does "
                      "not count PyTorch's CPU attention kernel)")
  p.add_argument('--label', default='')
  p.add_argument('--out', default='', help='append the JSON line here')
  p.add_argument('--log', default='', help="peers' stderr (default: this stderr)")
  args = p.parse_args(argv)

  commands = dict(name_value(x, '--peer') for x in args.peer)
  names = list(commands)
  same = dict(name_value(x, '--same_flops') for x in args.same_flops)
  log = open(args.log, 'a') if args.log else sys.stderr
  load0 = loadavg()
  t0 = time.time()
  peers = {}
  parts = ['step'] + (['fwd', 'fwdbwd', 'matmul'] if args.parts else [])
  times = {n: {part: [] for part in parts} for n in names}
  faults = {n: {part: [] for part in parts} for n in names}
  cpu = {n: {part: [] for part in parts} for n in names}
  rss = {n: 0.0 for n in names}
  loads = []
  try:
    # Start one at a time: compiling together would only slow each.
    for name in names:
      print(f'# starting {name}: {commands[name]}', file=sys.stderr, flush=True)
      peers[name] = Peer(name, commands[name], log)
      peers[name].wait_ready()
    for r in range(args.rounds):
      order = names if r % 2 == 0 else names[::-1]
      for part in parts:
        for n in order:
          for _ in range(args.matmul_reps if part == 'matmul' else 1):
            rec = peers[n].ask(part)
            times[n][part].append(rec['s'])
            faults[n][part].append(rec.get('minflt', 0))
            cpu[n][part].append(rec.get('user_s', 0.0) + rec.get('sys_s', 0.0))
            rss[n] = max(rss[n], rec.get('maxrss_mb', 0.0))
      loads.append(loadavg()[0] if loadavg() else None)
      print(f'# round {r + 1}/{args.rounds}: ' + ', '.join(
          f'{n} step {times[n]["step"][-1]:.3f} s' for n in names) + f'; load {loads[-1]}',
            file=sys.stderr, flush=True)
  finally:
    for peer in peers.values():
      peer.close()

  ref = names[0]
  flops = {}
  for n in names:
    own = dict(peers[n].ready['flops'])
    if n in same:
      own.update({k: v for k, v in peers[same[n]].ready['flops'].items() if k != 'matmul'})
    flops[n] = own
  rec = {'kind': 'peers', 'label': args.label, 'peers': names, 'reference': ref,
         'rounds': args.rounds, 'commands': commands, 'same_flops': same,
         'cpu': cpu_model(), 'isa': isa_flags(), 'cpu_count': os.cpu_count(),
         'ready': {n: peers[n].ready for n in names}, 'flops': flops, 'times': times,
         'minflt': faults, 'cpu_s': cpu, 'peak_rss_mb': rss, 'load_start': load0, 'load_end': loadavg(),
         'load_per_round': loads, 'wall_s': round(time.time() - t0, 1),
         'time': datetime.datetime.now().isoformat(timespec='seconds'),
         'command': ' '.join(shlex.quote(x) for x in ['python', *sys.argv]), 'parts': parts}
  peak = None
  if 'matmul' in parts:
    peak = flops[ref]['matmul'] / statistics.median(times[ref]['matmul']) / 1e9
    rec['jax_matmul_peak_gflops'] = peak
    rec['jax_matmul_peak_gflops_best'] = flops[ref]['matmul'] / min(times[ref]['matmul']) / 1e9
  stats = {}
  for n in names:
    for part in parts:
      t = times[n][part]
      s = summary(t)
      s['cpu_s_median'] = statistics.median(cpu[n][part])
      s['minflt_median'] = statistics.median(faults[n][part])
      s['gflops'] = flops[n][part] / s['median'] / 1e9
      if peak and part != 'matmul':
        s['share_of_jax_matmul_peak'] = s['gflops'] / peak
      if n != ref:
        s[f'ratio_to_{ref}'] = statistics.median(
            [x / y for x, y in zip(t, times[ref][part])])
      stats.setdefault(n, {})[part] = s
  rec['stats'] = stats
  line = json.dumps(rec)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'a') as f:
      f.write(line + '\n')
  print(render([rec]))
  return 0


def describe(ready: dict) -> str:
  if ready.get('framework') == 'torch':
    return f'timm {ready.get("model")}, torch {ready.get("torch")}, {ready.get("threads")} threads'
  branches = 'DCAL' if ready.get('glca_M') or ready.get('pwca_T') else 'SA only'
  return (f'{ready.get("backbone")} {branches}, remat {"on" if ready.get("remat") else "off"}, '
          f'jax {ready.get("jax")}')


def render(recs) -> str:
  """Markdown: one table per record (each peer per part), with machine, load and commands."""
  out = []
  for r in recs:
    names, ref = r['peers'], r['reference']
    r0 = r['ready'][ref]
    out.append(f'**{r.get("label") or "peers"}**: {r0.get("size")} px, batch {r0.get("batch")}, '
               f'fp32, on {r["cpu"]} ({r.get("isa") or "ISA not recorded"}; {r["cpu_count"]} cores), {r["time"]}, {r["rounds"]} '
               f'rounds, load {r["load_start"][:1]} -> {r["load_end"][:1]}')
    out.append('')
    share = 'matmul' in r['parts']
    hdr = ['peer', 'part', 's median [min, max]', f'/ {ref} (pairwise median)', 'GFLOP/s']
    hdr += ['% of JAX matmul peak'] if share else []
    hdr += ['CPU s per call', 'page faults per call']
    out.append('| ' + ' | '.join(hdr) + ' |')
    out.append('|' + '---|' * len(hdr))
    for part in r['parts']:
      for n in names:
        s = r['stats'][n][part]
        cells = [f'{n} ({describe(r["ready"][n])})', part,
                 f'{s["median"]:.3f} [{s["min"]:.3f}, {s["max"]:.3f}]',
                 f'**{s[f"ratio_to_{ref}"]:.2f}x**' if n != ref else '1',
                 f'{s["gflops"]:.1f}']
        if share:
          v = s.get('share_of_jax_matmul_peak')
          cells.append('' if v is None else f'{100 * v:.0f}%')
        cells += [f'{s["cpu_s_median"]:.2f}', f'{s["minflt_median"]:.0f}']
        out.append('| ' + ' | '.join(cells) + ' |')
    out.append('')
    if share:
      out.append(f'JAX matmul peak ({r0.get("matmul_n")}^2 fp32, `{ref}` process, same run): '
                 f'{r["jax_matmul_peak_gflops"]:.1f} GFLOP/s median (best '
                 f'{r["jax_matmul_peak_gflops_best"]:.1f}).')
    fl = []
    for n in names:
      if n in r['same_flops']:
        fl.append(f'{n}: as {r["same_flops"][n]} (same model)')
      elif r['ready'][n].get('framework') == 'torch':
        fl.append(f'{n}: FlopCounterMode (CPU attention kernel not counted)')
      else:
        fl.append(f'{n}: XLA cost analysis ({r["flops"][n]["step"] / 1e9:.1f} GFLOP/step)')
    out.append('FLOPs: ' + '; '.join(fl) + '.')
    if r.get('peak_rss_mb'):
      out.append('Peak RSS: ' + ', '.join(f'{n} {v / 1024:.2f} GiB'
                                          for n, v in r['peak_rss_mb'].items()) + '.')
    out.append('Commands: ' + '; '.join(f'{n}: `{c}`' for n, c in r['commands'].items()))
    out.append('')
  return '\n'.join(out)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--render':
    recs = []
    for path in sys.argv[2:]:
      with open(path) as f:
        recs += [json.loads(line) for line in f if line.strip()]
    print(render([r for r in recs if r.get('kind') == 'peers' and 'stats' in r]))
  else:
    sys.exit(main())
