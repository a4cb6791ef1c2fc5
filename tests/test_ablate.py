"""The ablation tool's bookkeeping: overrides parsed as on the CLI, mean ± std tables, resume."""

import json

import pytest

from tools import ablate


def test_overrides_and_test_time_swaps_parse_as_on_the_command_line():
  assert ablate.parse_set(['num_epochs=40', 'glca_pool=mean']) == [('num_epochs', '40'),
                                                                  ('glca_pool', 'mean')]
  assert ablate.parse_test_time(['random:glca_select=random,top_k_ratio=0.1']) == [
      ('random', [('glca_select', 'random'), ('top_k_ratio', '0.1')])]
  with pytest.raises(SystemExit):
    ablate.parse_set(['num_epochs'])
  assert ablate._flag('use_gradient_checkpointing', False) == (  # pylint: disable=protected-access
      '--config.use_gradient_checkpointing=false')


def test_table_is_mean_and_sample_std_over_seeds_and_results_resume(tmp_path):
  path = tmp_path / 'results.jsonl'
  records = [dict(variant='a', seed=s, accuracy=acc, accuracy_sa=acc, accuracy_glca=None,
                  wall_s=10.0 * (s + 1)) for s, acc in enumerate((0.9, 0.8, 0.7))]
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  results = ablate.load_results(str(path))
  assert sorted(results) == [('a', 0), ('a', 1), ('a', 2)]   # a rerun skips these
  text = ablate.write_table(str(tmp_path / 'table.md'), {'a': {'glca_pool': 'mean'}, 'b': {}},
                            results, 'header')
  row = [line for line in text.splitlines() if line.startswith('| a ')][0]
  assert '**80.0 ± 10.0**' in row and 'glca_pool=mean' in row and '| 20 |' in row
  assert not any(line.startswith('| b ') for line in text.splitlines())  # no runs: no row


def test_test_time_table_pairs_each_seed_with_its_own_swapped_evaluation(tmp_path):
  # Seeds differ by 10 points, the swap costs each seed exactly 2 (GLCA) / 1 (SA+GLCA) points:
  # the paired difference has no spread although the means do.
  results = {('a', s): dict(variant='a', seed=s, accuracy=0.9 - 0.1 * s, accuracy_sa=0.5,
                            accuracy_glca=0.8 - 0.1 * s,
                            test_time={'random': dict(accuracy=0.89 - 0.1 * s,
                                                      accuracy_glca=0.78 - 0.1 * s)})
             for s in range(3)}
  text = ablate.write_test_time_table(str(tmp_path / 't.md'), {'a': {}}, results,
                                      [('random', [('glca_select', 'random')])], 'header')
  rows = {line.split(' | ')[2]: line for line in text.splitlines() if line.startswith('| a ')}
  assert '| 80.0 ± 10.0 | 79.0 ± 10.0 (Δ -1.0 ± 0.0) |' in rows['SA+GLCA']
  assert '| 70.0 ± 10.0 | 68.0 ± 10.0 (Δ -2.0 ± 0.0) |' in rows['GLCA']

