"""``kdjax demo --task lm`` end to end on the tiny configs; a rerun resumes; bad input."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.demo_lm import RUN_KEYS, STUDENTS, WARM_STARTED

pytestmark = pytest.mark.slow


def _args(wd, data_dir, *extra):
  return ['demo', '--task', 'lm', '--workdir', wd, '--seeds', '1', '--variant', 'tiny',
          f'--config.data.data_dir={data_dir}', *extra]


def test_lm_demo_scores_every_run_the_same_way_and_a_rerun_resumes(kdjax_main, data_dir,
                                                                   tmp_path):
  from kdjax import data as kdata
  from kdjax import teacher as teacher_lib
  from kdjax.distill.evaluate import evaluate_workdir
  from kdjax.models import model_kwargs
  from kdjax.parallel import make_mesh

  wd = str(tmp_path / 'demo_lm')
  out = kdjax_main(_args(wd, data_dir))
  results = json.load(open(os.path.join(wd, 'results.json')))
  assert set(RUN_KEYS) <= set(results)
  required = ('teacher', 'student_data', 'student_token_kd', 'student_seq_kd', 'student_gkd',
              'student_cached_kd')
  for key in required:
    r = results[key]
    for field in ('perplexity_mean', 'perplexity_std', 'agreement_mean'):
      assert math.isfinite(r[field]), (key, field)
    assert key in out.stdout
    assert len(r['perplexities']) == 1   # one seed here (the demo's default is 3)
    assert r['perplexity_mean'] == pytest.approx(np.mean(r['perplexities']))
  assert results['teacher']['agreement_mean'] == 1.0
  assert results['teacher']['parameters'] > results['student_data']['parameters']

  # The demo's perplexity of a run on the packed held-out rows is the engine evaluator's.
  for key in ('student_data', 'student_token_kd'):
    ev = evaluate_workdir(os.path.join(wd, key, 'seed0'), split='test')
    assert results[key]['perplexities'][0] == pytest.approx(math.exp(ev['loss']), rel=1e-4)

  # Agreement, recomputed here for one student: argmax of both models on the held-out rows.
  mesh = make_mesh([('data', 1)], devices=jax.devices()[:1])
  arrays = kdata.load_arrays('shakespeare_lm/tiny', 'test', data_dir=data_dir)
  t = teacher_lib.load_teacher(os.path.join(wd, 'teacher'), mesh)
  s = teacher_lib.load_teacher(os.path.join(wd, 'student_cached_kd', 'seed0'), mesh)
  same = count = 0
  for i in range(0, len(arrays['x']), 256):
    b = {k: jnp.asarray(v[i:i + 256]) for k, v in arrays.items()
         if k in ('x', 'segment_ids', 'positions')}
    top = [np.asarray(jnp.argmax(m.apply(*m.variables, b['x'], train=False,
                                         **model_kwargs(b))[0].logits, -1)) for m in (t, s)]
    mask = arrays['mask'][i:i + 256]
    same += int(np.sum((top[0] == top[1]) & mask))
    count += int(mask.sum())
  assert results['student_cached_kd']['agreements'][0] == pytest.approx(same / count, abs=1e-6)

  # The warm-started runs started from the data-only run's halfway checkpoint.
  for key in WARM_STARTED:
    config = json.load(open(os.path.join(wd, key, 'seed0', 'config.json')))
    assert config['init']['workdir'] == os.path.join(wd, 'student_data', 'seed0')
    assert config['init']['step'] == results['student_data']['num_steps'] // 2
  config = json.load(open(os.path.join(wd, 'student_seq_kd', 'seed0', 'config.json')))
  assert config['teacher']['cache'] == os.path.join(wd, 'cache_seq')
  assert config['teacher']['workdir'] == os.path.join(wd, 'teacher')    # Seq-KD + Word-KD
  assert set(config['loss']['terms']) == {'kd', 'ce'}
  assert config['cache']['generate']['temperature'] == 1.0   # sampled continuations
  with open(os.path.join(wd, 'results.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # A rerun (as after a kill) resumes every finished run: same figures, no new checkpoints.
  ckpts = {key: sorted(os.listdir(os.path.join(wd, key, 'seed0', 'checkpoints')))
           for key, *_ in STUDENTS}
  kdjax_main(_args(wd, data_dir))
  again = json.load(open(os.path.join(wd, 'results.json')))
  for key in RUN_KEYS:
    assert again[key]['perplexities'] == results[key]['perplexities'], key
  for key, *_ in STUDENTS:
    assert sorted(os.listdir(os.path.join(wd, key, 'seed0', 'checkpoints'))) == ckpts[key]


@pytest.mark.parametrize('extra, fragment', [
    (['--variant', 'huge'], "the LM demo has the variants"),
    (['--config.init.workdir=/x'], 'the demo sets init.workdir'),
    (['--config.teacher.cache=/x'], 'the demo sets teacher.cache'),
])
def test_lm_demo_bad_input_is_one_line_and_exit_2(kdjax_main, data_dir, tmp_path, extra,
                                                  fragment):
  wd = str(tmp_path / 'demo_lm')
  out = kdjax_main([*_args(wd, data_dir), *extra], check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error:') and fragment in lines[0], lines
  assert not os.path.exists(wd)
