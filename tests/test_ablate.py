"""The ablation tool's bookkeeping: overrides parsed as on the CLI, mean ± std tables, resume."""

import json
import os

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
  assert sorted(results) == [('a', 0, 1), ('a', 1, 1), ('a', 2, 1)]   # a rerun skips these
  text = ablate.write_table(str(tmp_path / 'table.md'), {'a': {'glca_pool': 'mean'}, 'b': {}},
                            results, 'header')
  row = [line for line in text.splitlines() if line.startswith('| a ')][0]
  assert '**80.0 ± 10.0**' in row and 'glca_pool=mean' in row and '| 20 |' in row
  assert not any(line.startswith('| b ') for line in text.splitlines())  # no runs: no row


def test_test_time_table_pairs_each_seed_with_its_own_swapped_evaluation(tmp_path):
  # Seeds differ by 10 points, the swap costs each seed exactly 2 (GLCA) / 1 (SA+GLCA) points:
  # the paired difference has no spread although the means do.
  results = {('a', s, 1): dict(variant='a', seed=s, accuracy=0.9 - 0.1 * s, accuracy_sa=0.5,
                            accuracy_glca=0.8 - 0.1 * s,
                            test_time={'random': dict(accuracy=0.89 - 0.1 * s,
                                                      accuracy_glca=0.78 - 0.1 * s)})
             for s in range(3)}
  text = ablate.write_test_time_table(str(tmp_path / 't.md'), {'a': {}}, results,
                                      [('random', [('glca_select', 'random')])], 'header')
  rows = {line.split(' | ')[2]: line for line in text.splitlines() if line.startswith('| a ')}
  assert '| 80.0 ± 10.0 | 79.0 ± 10.0 (Δ -1.0 ± 0.0) |' in rows['SA+GLCA']
  assert '| 70.0 ± 10.0 | 68.0 ± 10.0 (Δ -2.0 ± 0.0) |' in rows['GLCA']



def test_a_run_far_from_its_variants_mean_is_named_and_the_runs_table_has_each_run(tmp_path):
  # seeds x thread counts of one variant: 60, 62, 61 on one thread, 61, 60, 69 on two
  results = {('d', s, t): dict(variant='d', seed=s, threads=t, accuracy=acc, wall_s=100.0,
                               train_s=90.0 + s, cpu='Some CPU')
             for (s, t), acc in zip([(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)],
                                    (0.60, 0.62, 0.61, 0.61, 0.60, 0.69))}
  far = ablate.out_of_tolerance({'d': {}}, results, 3.0)     # mean 62.2
  assert far == ['d seed 2 on 2 thread(s): 69.0 % is 6.8 points from the mean 62.2 % '
                 '(tolerance 3)']
  assert ablate.out_of_tolerance({'d': {}}, results, 7.0) == []
  text = ablate.write_runs(str(tmp_path / 'runs.md'), {'d': {}}, results)
  assert '| d | 2 | 2 | Some CPU | 69.0 | 92 |' in text and len(text.splitlines()) == 8


def test_one_thread_runs_get_a_processor_each_and_wider_runs_all_of_them():
  cpus = sorted(os.sched_getaffinity(0))
  one = ablate._cpu_slots(jobs=8, threads=1)  # pylint: disable=protected-access
  assert one == [{c} for c in cpus] or (len(cpus) == 1 and one == [None])
  assert ablate._cpu_slots(jobs=2, threads=0) == [None]  # pylint: disable=protected-access
