"""``kdjax demo``, the README's main job, end to end on tiny configs; a rerun resumes."""

import json
import os

import numpy as np
import pytest

from kdjax.demo import RUNS

pytestmark = pytest.mark.slow


def _args(wd, data_dir, paths, *extra):
  return ['demo', '--workdir', wd, '--seeds', '2', '--variant', 'tiny',
          f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}', *extra]


def test_demo_writes_the_table_plot_and_results_and_a_rerun_resumes(kdjax_main, paths, data_dir,
                                                                   tmp_path):
  wd = str(tmp_path / 'demo')
  out = kdjax_main(_args(wd, data_dir, paths))
  results = json.load(open(os.path.join(wd, 'results.json')))
  assert results['_meta']['seeds'] == 2 and results['_meta']['variant'] == 'tiny'
  for key, *_ in RUNS:
    r = results[key]
    # each seed's accuracy is the one its run wrote; mean and std are of those
    written = [json.load(open(os.path.join(wd, key, f'seed{s}', 'summary.json')))['eval_accuracy']
               for s in (0, 1)]
    np.testing.assert_allclose(r['accuracies'], written, rtol=0, atol=1e-7)
    assert r['accuracy_mean'] == pytest.approx(np.mean(written))
    assert r['accuracy_std'] == pytest.approx(np.std(written, ddof=1))
    assert r['train_split'] and r['model'] and r['num_steps'] > 0
    assert key in out.stdout
  # the students were distilled from the same seed's teacher
  for key in ('student_kd', 'student_kd_transfer'):
    config = json.load(open(os.path.join(wd, key, 'seed1', 'config.json')))
    assert config['teacher']['workdir'] == os.path.join(wd, 'teacher', 'seed1')
  assert results['student_kd_transfer']['train_split'] != results['student_kd']['train_split']
  assert 'KD with the transfer split vs. baseline' in out.stdout
  with open(os.path.join(wd, 'results.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # a rerun (as after a kill) resumes every finished run: same figures, no new checkpoints
  ckpts = {key: sorted(os.listdir(os.path.join(wd, key, 'seed0', 'checkpoints')))
           for key, *_ in RUNS}
  kdjax_main(_args(wd, data_dir, paths))
  again = json.load(open(os.path.join(wd, 'results.json')))
  for key, *_ in RUNS:
    assert again[key]['accuracies'] == results[key]['accuracies'], key
    assert sorted(os.listdir(os.path.join(wd, key, 'seed0', 'checkpoints'))) == ckpts[key]


@pytest.mark.parametrize('extra, fragment', [
    (['--seeds', '0'], '--seeds must be at least 1'),
    (['--config.seed=3'], 'the demo sets seed'),
    (['--config.teacher.workdir=/x'], 'the demo sets teacher.workdir'),
    (['--config.no_such_key=1'], 'no_such_key'),
])
def test_demo_bad_input_is_one_line_and_exit_2(kdjax_main, paths, data_dir, tmp_path, extra, fragment):
  wd = str(tmp_path / 'demo')
  out = kdjax_main([*_args(wd, data_dir, paths), *extra], check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error:') and fragment in lines[0], lines
  assert not os.path.exists(os.path.join(wd, 'results.json'))
