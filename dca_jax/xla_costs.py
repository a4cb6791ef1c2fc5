"""XLA's cost analysis of a lowered or compiled program, read one way.

`cost_analysis()` returns a dict on current jax, a list of one dict per program on older ones,
and None (or no 'flops') where a backend does not count (deviceless GPU executables).
"""

from __future__ import annotations


def analysis(lowered_or_compiled) -> dict:
  """The cost analysis as one dict ({} when the backend reports none)."""
  try:
    cost = lowered_or_compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without one: nothing to read)
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return dict(cost) if cost else {}


def flops(lowered_or_compiled, default: float = float('nan')) -> float:
  """FLOPs XLA counts for the program (a multiply-add is 2), `default` when it counts none."""
  return float(analysis(lowered_or_compiled).get('flops', default))


def bytes_accessed(lowered_or_compiled, default: float = float('nan')) -> float:
  return float(analysis(lowered_or_compiled).get('bytes accessed', default))
