"""The multi-model schemes and ``kdjax demo`` with their workdir in a bucket (``gs://``),
against the session's GCS emulator (``conftest.py``): a DML cohort and a born-again chain
(stage folders, ``predictions.npz``, the stage plot) end exactly where the same runs on
local disk end, and the demo writes its ``results.json``, plot and runs into the bucket."""

import io
import json

import jax
import numpy as np
import pytest

from kdjax import storage
from kdjax import workdir as workdir_lib

pytestmark = pytest.mark.slow

# What differs between two equal runs: the timings, and the paths (the local root or the
# bucket's), which :func:`_same` maps onto each other.
TIMINGS = ('examples_per_sec', 'wall_seconds', 'tokens_per_sec')
# Every run: 20 steps in two calls, one checkpoint and one evaluation, at the end.
SHORT = ['--config.num_steps=20', '--config.steps_per_call=10', '--config.checkpoint_every=20',
         '--config.eval_every=20', '--config.log_every=10']


def _main(args):
  from kdjax.cli import main
  with jax.default_matmul_precision('highest'):
    assert main(list(args)) == 0, args


def _summary(workdir):
  return json.loads(storage.read_text(storage.join(workdir, workdir_lib.SUMMARY)))


def _same(tree, root: str, other: str):
  """``tree`` without timings, ``root`` replaced by ``other`` in its strings."""
  if isinstance(tree, dict):
    return {k: _same(v, root, other) for k, v in tree.items() if k not in TIMINGS}
  if isinstance(tree, list):
    return [_same(v, root, other) for v in tree]
  return tree.replace(root, other) if isinstance(tree, str) else tree


def _both(args, local_root, name):
  """Runs ``args`` into ``LOCAL_ROOT/name`` and ``gs://kdjax-test/schemes/name``."""
  local, gs = storage.join(local_root, name), f'gs://kdjax-test/schemes/{name}'
  _main([*args, '--workdir', local])
  _main([*args, '--workdir', gs])
  return local, gs


def test_dml_in_a_bucket_equals_local(gcs, data_dir, paths, tmp_path):
  local, gs = _both(['train', '--config', f"{paths['configs']}/mnist1d/dml.py:tiny",
                     f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}',
                     '--config.progress=false', *SHORT],
                    str(tmp_path), 'dml')
  a, b = _summary(local), _summary(gs)
  assert b['step'] == 20 and b['scheme'] == 'dml' and len(b['student_accuracies']) == 4
  assert _same(a, local, gs) == _same(b, gs, gs)
  assert workdir_lib.all_steps(gs) == workdir_lib.all_steps(local) == [20]
  assert (storage.read_text(storage.join(gs, 'metrics.jsonl')).count('\n')
          == storage.read_text(storage.join(local, 'metrics.jsonl')).count('\n'))
  assert storage.read_bytes(storage.join(gs, 'learning_curves.png'))[:4] == b'\x89PNG'


def test_born_again_stages_in_a_bucket_equal_local(gcs, data_dir, paths, tmp_path):
  tiny = {'num_steps': 20, 'checkpoint_every': 20, 'eval_every': 20, 'log_every': 10,
          'steps_per_call': 10}
  local, gs = _both(['distill', '--config', f"{paths['configs']}/mnist1d/born_again.py:tiny",
                     f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}',
                     '--config.progress=false', '--config.scheme.num_generations=2',
                     f'--config.scheme.overrides={tiny!r}'], str(tmp_path), 'ban')
  a, b = _summary(local), _summary(gs)
  assert b['generations'] == ['gen0', 'gen1'] and b['step'] == 20
  # every stage's summary (its teacher's folder, fingerprint, figures) and the ensemble's
  assert _same(a, local, gs) == _same(b, gs, gs)
  assert [r['workdir'] for r in b['stages']] == [f'{gs}/gen0', f'{gs}/gen1']
  gen1 = workdir_lib.read_config(storage.join(gs, 'gen1'))
  assert gen1['teacher']['workdir'] == f'{gs}/gen0'      # distilled from the bucket's gen0
  pa = np.load(io.BytesIO(storage.read_bytes(storage.join(local, 'predictions.npz'))))
  pb = np.load(io.BytesIO(storage.read_bytes(storage.join(gs, 'predictions.npz'))))
  np.testing.assert_array_equal(pa['logits'], pb['logits'])
  assert storage.read_bytes(storage.join(gs, 'learning_curves.png'))[:4] == b'\x89PNG'
  assert {'config.json', 'summary.json', 'predictions.npz', 'gen0', 'gen1'} <= set(
      storage.listdir(gs))


def test_demo_writes_its_results_into_a_bucket(gcs, data_dir, paths, kdjax_main):
  from kdjax.demo import RUNS
  gs = 'gs://kdjax-test/demo'
  with jax.default_matmul_precision('highest'):
    out = kdjax_main(['demo', '--workdir', gs, '--seeds', '1', '--variant', 'tiny',
                      f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}',
                      *SHORT])
  assert f'[demo] results: {gs}/results.json, plot: {gs}/results.png' in out.stdout
  results = json.loads(storage.read_text(f'{gs}/results.json'))
  for key, *_ in RUNS:
    run = f'{gs}/{key}/seed0'
    assert results[key]['accuracies'] == [_summary(run)['eval_accuracy']], key
    assert workdir_lib.all_steps(run)[-1] == results[key]['num_steps'], key
  assert workdir_lib.read_config(f'{gs}/student_kd/seed0')['teacher']['workdir'] == (
      f'{gs}/teacher/seed0')
  assert storage.read_bytes(f'{gs}/results.png')[:4] == b'\x89PNG'
