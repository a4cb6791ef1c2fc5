"""Time peer processes against each other on one machine, their commands alternating.

Each peer is a command that starts a serving process (`benchmarks/step_serve.py`,
`benchmarks/peer_timm.py --serve`): it builds and warms up, answers one `@@ {ready}` line, then
times one command per stdin line. This sends `step` (with --parts also `fwd`, `fwdbwd`,
`matmul`) to every peer in turn, the order reversed every other round, so only one computes at
a time and load from other jobs hits all alike. One JSON line (`kind: peers`) holds every time,
CPU second and page fault, the pairwise-median ratios to the first peer, GFLOP/s and the share
of the JAX matmul peak of the same run; a markdown summary is printed.

  python -m benchmarks.peers --peer 'A=python -m benchmarks.step_serve ...' \\
      --peer 'timm=.venv-timm/bin/python -m benchmarks.peer_timm --serve' --same_flops timm=A
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

from benchmarks.machine import PREFIX, cpu_model, isa_flags


def loadavg() -> list:
  try:
    return list(os.getloadavg())
  except OSError:
    return []


class Peer:
  """One serving process: commands on stdin, `@@ {json}` answers on stdout."""

  def __init__(self, name: str, command: str, log):
    self.name = name
    self.proc = subprocess.Popen(shlex.split(command), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
    self.ready = self.read()

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(PREFIX):
        return json.loads(line[len(PREFIX):])
    raise RuntimeError(f'peer {self.name} exited (rc {self.proc.wait()}); see the log')

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
      self.proc.wait(timeout=60)
    except (BrokenPipeError, ValueError):
      pass
    except subprocess.TimeoutExpired:
      self.proc.kill()


def name_value(item: str, what: str):
  name, sep, value = item.partition('=')
  if not sep or not name or not value:
    raise SystemExit(f'{what} must be NAME=VALUE, got {item!r}')
  return name, value


def measure(args, commands: dict, parts: list, log) -> tuple[dict, dict]:
  """Starts the peers one at a time (compiling together would only slow each), then times
  `parts` round by round; ({name: Peer}, {'s' | 'minflt' | 'cpu_s': {name: {part: [...]}}})."""
  names, peers = list(commands), {}
  series = {k: {n: {p: [] for p in parts} for n in names} for k in ('s', 'minflt', 'cpu_s')}
  series['rss'], series['loads'] = dict.fromkeys(names, 0.0), []
  try:
    for name in names:
      print(f'# starting {name}: {commands[name]}', file=sys.stderr, flush=True)
      peers[name] = Peer(name, commands[name], log)
    for r in range(args.rounds):
      for part in parts:
        for n in names if r % 2 == 0 else names[::-1]:
          for _ in range(args.matmul_reps if part == 'matmul' else 1):
            rec = peers[n].ask(part)
            series['s'][n][part].append(rec['s'])
            series['minflt'][n][part].append(rec.get('minflt', 0))
            series['cpu_s'][n][part].append(rec.get('user_s', 0.0) + rec.get('sys_s', 0.0))
            series['rss'][n] = max(series['rss'][n], rec.get('maxrss_mb', 0.0))
      series['loads'].append((loadavg() or [None])[0])
      print(f'# round {r + 1}/{args.rounds}: ' + ', '.join(
          f'{n} step {series["s"][n]["step"][-1]:.3f} s' for n in names)
            + f'; load {series["loads"][-1]}', file=sys.stderr, flush=True)
  finally:
    for peer in peers.values():
      peer.close()
  return peers, series


def summarise(names, parts, flops, series) -> tuple[dict, float | None]:
  """Per peer and part: median [min, max], CPU s, faults, GFLOP/s, the share of the JAX matmul
  peak (the first peer's `matmul`) and the pairwise-median ratio to the first peer."""
  times, ref = series['s'], names[0]
  peak = flops[ref]['matmul'] / statistics.median(times[ref]['matmul']) / 1e9 \
      if 'matmul' in parts else None
  stats = {}
  for n in names:
    for part in parts:
      t = times[n][part]
      s = {'median': statistics.median(t), 'min': min(t), 'max': max(t), 'n': len(t),
           'cpu_s_median': statistics.median(series['cpu_s'][n][part]),
           'minflt_median': statistics.median(series['minflt'][n][part])}
      s['gflops'] = flops[n][part] / s['median'] / 1e9
      if peak and part != 'matmul':
        s['share_of_jax_matmul_peak'] = s['gflops'] / peak
      if n != ref:
        s[f'ratio_to_{ref}'] = statistics.median([x / y for x, y in zip(t, times[ref][part])])
      stats.setdefault(n, {})[part] = s
  return stats, peak


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--peer', action='append', required=True, metavar='NAME=COMMAND',
                 help='a peer (repeat; the first is the reference of the ratios)')
  p.add_argument('--rounds', type=int, default=5, help='timed rounds (each peer once per part)')
  p.add_argument('--parts', action='store_true', help='also time fwd, fwdbwd and matmul')
  p.add_argument('--matmul_reps', type=int, default=3, help='matmuls per round and peer')
  p.add_argument('--same_flops', action='append', default=[], metavar='NAME=REF',
                 help="NAME's FLOPs are REF's (same model: FlopCounterMode misses PyTorch's CPU "
                      'attention kernel)')
  p.add_argument('--label', default='')
  p.add_argument('--out', default='', help='append the JSON line here')
  p.add_argument('--log', default='', help="peers' stderr (default: this stderr)")
  args = p.parse_args(argv)
  commands = dict(name_value(x, '--peer') for x in args.peer)
  same = dict(name_value(x, '--same_flops') for x in args.same_flops)
  parts = ['step'] + (['fwd', 'fwdbwd', 'matmul'] if args.parts else [])
  load0, t0 = loadavg(), time.time()
  peers, series = measure(args, commands, parts, open(args.log, 'a') if args.log else sys.stderr)
  names = list(commands)
  flops = {n: {**peers[n].ready['flops'], **({k: v for k, v in peers[same[n]].ready['flops'].items()
                                                if k != 'matmul'} if n in same else {})}
           for n in names}
  stats, peak = summarise(names, parts, flops, series)
  rec = {'kind': 'peers', 'label': args.label, 'peers': names, 'reference': names[0],
         'rounds': args.rounds, 'commands': commands, 'same_flops': same, 'cpu': cpu_model(),
         'isa': isa_flags(), 'cpu_count': os.cpu_count(),
         'ready': {n: peers[n].ready for n in names}, 'flops': flops, 'times': series['s'],
         'minflt': series['minflt'], 'cpu_s': series['cpu_s'], 'peak_rss_mb': series['rss'],
         'load_start': load0, 'load_end': loadavg(), 'load_per_round': series['loads'],
         'wall_s': round(time.time() - t0, 1), 'parts': parts, 'stats': stats,
         'time': datetime.datetime.now().isoformat(timespec='seconds'),
         'command': ' '.join(shlex.quote(x) for x in ['python', *sys.argv])}
  if peak:
    rec['jax_matmul_peak_gflops'] = peak
    rec['jax_matmul_peak_gflops_best'] = flops[names[0]]['matmul'] / min(
        series['s'][names[0]]['matmul']) / 1e9
  if args.out:
    with open(args.out, 'a') as f:
      f.write(json.dumps(rec) + '\n')
  print(render([rec]))
  return 0


def describe(ready: dict) -> str:
  if ready.get('framework') == 'torch':
    return f'timm {ready.get("model")}, torch {ready.get("torch")}, {ready.get("threads")} threads'
  branches = 'DCAL' if ready.get('glca_M') or ready.get('pwca_T') else 'SA only'
  return (f'{ready.get("backbone")} {branches}, remat {"on" if ready.get("remat") else "off"}, '
          f'jax {ready.get("jax")}')


def _flops_line(r) -> str:
  lines = []
  for n in r['peers']:
    if n in r['same_flops']:
      lines.append(f'{n}: as {r["same_flops"][n]} (same model)')
    elif r['ready'][n].get('framework') == 'torch':
      lines.append(f'{n}: FlopCounterMode (CPU attention kernel not counted)')
    else:
      lines.append(f'{n}: XLA cost analysis ({r["flops"][n]["step"] / 1e9:.1f} GFLOP/step)')
  return 'FLOPs: ' + '; '.join(lines) + '.'


def render_one(r) -> list:
  ref, share = r['reference'], 'matmul' in r['parts']
  r0 = r['ready'][ref]
  hdr = (['peer', 'part', 's median [min, max]', f'/ {ref} (pairwise median)', 'GFLOP/s']
         + ['% of JAX matmul peak'] * share + ['CPU s per call', 'page faults per call'])
  out = [f'**{r.get("label") or "peers"}**: {r0.get("size")} px, batch {r0.get("batch")}, fp32, on '
         f'{r["cpu"]} ({r.get("isa") or "ISA not recorded"}; {r["cpu_count"]} cores), '
         f'{r["time"]}, {r["rounds"]} rounds, load {r["load_start"][:1]} -> {r["load_end"][:1]}',
         '', '| ' + ' | '.join(hdr) + ' |', '|' + '---|' * len(hdr)]
  for part in r['parts']:
    for n in r['peers']:
      s = r['stats'][n][part]
      v = s.get('share_of_jax_matmul_peak')
      cells = ([f'{n} ({describe(r["ready"][n])})', part,
                f'{s["median"]:.3f} [{s["min"]:.3f}, {s["max"]:.3f}]',
                f'**{s[f"ratio_to_{ref}"]:.2f}x**' if n != ref else '1', f'{s["gflops"]:.1f}']
               + ['' if v is None else f'{100 * v:.0f}%'] * share
               + [f'{s["cpu_s_median"]:.2f}', f'{s["minflt_median"]:.0f}'])
      out.append('| ' + ' | '.join(cells) + ' |')
  out.append('')
  if share:
    out.append(f'JAX matmul peak ({r0.get("matmul_n")}^2 fp32, `{ref}` process, same run): '
               f'{r["jax_matmul_peak_gflops"]:.1f} GFLOP/s median (best '
               f'{r["jax_matmul_peak_gflops_best"]:.1f}).')
  out.append(_flops_line(r))
  if r.get('peak_rss_mb'):
    out.append('Peak RSS: ' + ', '.join(f'{n} {v / 1024:.2f} GiB'
                                        for n, v in r['peak_rss_mb'].items()) + '.')
  return out + ['Commands: ' + '; '.join(f'{n}: `{c}`' for n, c in r['commands'].items()), '']


def render(recs) -> str:
  """Markdown: one table per record (each peer per part), with machine, load and commands."""
  return '\n'.join(line for r in recs for line in render_one(r))


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--render':
    recs = [json.loads(line) for path in sys.argv[2:] for line in open(path) if line.strip()]
    print(render([r for r in recs if r.get('kind') == 'peers' and 'stats' in r]))
  else:
    sys.exit(main())
