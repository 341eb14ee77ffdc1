"""Layer-wise distillation (``kdjax.schemes.layerwise``): which parameters each depth
trains, the frozen parameters exactly unchanged through a hint stage (weight decay and
all), the hint loss going down, a depth the student or the teacher does not have refused
in one line with nothing written, and a run killed with SIGKILL mid-stage resumed stage
by stage to the uninterrupted run's parameters."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdjax.schemes import depth_masks
from kdjax.schemes import frozen
from kdjax.schemes import layerwise_options
from kdjax.schemes import parameter_names

HINT, FINAL = 10, 10
TINY = [f'--config.scheme.hint_steps={HINT}', f'--config.num_steps={FINAL}',
        "--config.scheme.hints=[{'student': 1, 'teacher': 1}]",
        '--config.checkpoint_every=5', '--config.log_every=1', '--config.eval_every=10',
        '--config.steps_per_call=5', '--config.batch_size=64']
STAGES = ('hint1', 'final')


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def test_depth_masks_name_the_blocks_up_to_each_depth():
  names, masks = depth_masks({'name': 'cnn1d', 'kwargs': {'channels': (4, 4, 4),
                                                          'kernel_size': 3, 'strides': 2}},
                             num_classes=3, input_shape=(16, 1))
  assert names == ['stage1', 'stage2', 'stage3']
  assert parameter_names(masks[1]) == ['convs/0/bias', 'convs/0/kernel']
  assert parameter_names(masks[3]) == [f'convs/{i}/{k}' for i in range(3)
                                       for k in ('bias', 'kernel')]


def test_frozen_parameters_stay_exactly_as_they_were():
  params = {'student': {'a': jnp.ones(3), 'b': jnp.full(3, 2.0)}, 'loss': {'w': jnp.ones(2)}}
  tx = frozen(optax.adamw(0.1, weight_decay=0.5), {'a': True, 'b': False})
  state = tx.init(params)
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['student']['b'], np.full(3, 2.0))   # decay too
  assert np.all(params['student']['a'] < 1) and np.all(params['loss']['w'] < 1)


@pytest.mark.parametrize('hints,message', [
    ([], 'config.scheme.hints must list the hint stages'),
    ([{'student': 1}], 'config.scheme.hints[0] must be'),
    ([{'student': 2, 'teacher': 1}, {'student': 1, 'teacher': 2}], 'must increase'),
])
def test_layerwise_options_refuse_a_bad_hint_list(hints, message):
  from kdjax.errors import UserError
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace(']', r'\]')):
    layerwise_options(ml_collections.ConfigDict({'scheme': {'name': 'layerwise',
                                                            'hints': hints}}))


def _args(paths, data_dir, teacher_dir, wd, *extra):
  return ['distill', '--config', f'{paths["configs"]}/mnist1d/layerwise.py:tiny',
          '--workdir', wd, f'--config.data.name={paths["small"]}',
          f'--config.data.data_dir={data_dir}', f'--config.teacher.workdir={teacher_dir}',
          '--config.progress=false', *TINY, *extra]


@pytest.mark.parametrize('override,message', [
    ("--config.scheme.hints=[{'student': 3, 'teacher': 1}]",
     'the student (mlp) has no block 3; its blocks are 1..2'),
    ("--config.scheme.hints=[{'student': 1, 'teacher': 4}]",
     'the teacher (cnn1d) has no block 4; its blocks are 1..3'),
    ('--config.scheme.train=all', 'config.scheme.train must be one of prefix, block'),
])
def test_cli_refuses_a_depth_that_is_not_there_and_writes_nothing(
    paths, data_dir, teacher_dir, tmp_path, kdjax_main, override, message):
  wd = tmp_path / 'run'
  out = kdjax_main(_args(paths, data_dir, teacher_dir, str(wd), override), check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0], lines
  assert not wd.exists()


def _params(wd, step):
  from kdjax.workdir import restore_subtree
  return restore_subtree(wd, step, ('params', 'student'))


def _leaves(tree):
  """``{'hidden/0/kernel': array, ...}`` of a model state or a restored checkpoint."""
  out = {}
  for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path
             if not isinstance(k, jax.tree_util.GetAttrKey)]
    out['/'.join(p for p in parts if p != 'value')] = np.asarray(v)
  return out


@pytest.mark.slow
def test_kill9_mid_stage_resumes_and_hint_stages_train_only_their_blocks(
    paths, data_dir, teacher_dir, tmp_path, kdjax_main, kill9):
  ref, wd = str(tmp_path / 'ref'), str(tmp_path / 'killed')
  killed_at = kill9(_args(paths, data_dir, teacher_dir, wd),
                    os.path.join(wd, 'final', 'checkpoints'), timeout=180)
  assert killed_at is not None and killed_at < FINAL, 'the run ended before it was killed'
  first = kdjax_main(_args(paths, data_dir, teacher_dir, ref))   # the uninterrupted run
  assert f'student initialized from {ref}/hint1' in first.stdout   # final warm-starts
  out = kdjax_main(_args(paths, data_dir, teacher_dir, wd))
  assert f'resuming from step {killed_at}' in out.stdout
  a, b = (json.load(open(os.path.join(d, 'summary.json'))) for d in (ref, wd))
  rows = {r['name']: r for r in b['stages']}
  assert rows['hint1']['skipped'] and rows['final']['summary']['resumed_from'] == killed_at
  for key in ('step', 'eval_accuracy', 'eval_loss', 'train_loss'):
    assert a[key] == b[key], key
  for stage, steps in zip(STAGES, (HINT, FINAL)):
    x, y = _leaves(_params(os.path.join(ref, stage), steps)), _leaves(_params(
        os.path.join(wd, stage), steps))
    assert all(np.array_equal(x[k], y[k]) for k in x), stage

  # What each stage trained: hint1 the first hidden layer, final all.
  assert a['trainable'] == {'hint1': ['hidden/0/bias', 'hidden/0/kernel'], 'final': 'all'}
  from kdjax.data import dataset_spec
  from kdjax.models import from_config
  spec = dataset_spec(paths['small'], data_dir=data_dir)
  start = _leaves(from_config({'name': 'mlp'}, num_classes=spec.num_classes,
                              input_shape=spec.input_shape)[1](0)[0])   # seed 0's init
  h1, fin = (_leaves(_params(os.path.join(ref, s), n)) for s, n in zip(STAGES, (HINT, FINAL)))
  for k in ('hidden/1/kernel', 'hidden/1/bias', 'head/kernel', 'head/bias'):
    np.testing.assert_array_equal(h1[k], start[k])      # frozen through hint1 (adamw decay on)
  assert not np.array_equal(h1['hidden/0/kernel'], start['hidden/0/kernel'])   # trained
  for k in ('hidden/1/kernel', 'head/kernel'):
    assert not np.array_equal(fin[k], h1[k])            # trained in the final stage

  # The hint loss goes down in each hint stage (the first logged steps against the last).
  for stage in ('hint1',):
    rows = [json.loads(line) for line in open(os.path.join(ref, stage, 'metrics.jsonl'))]
    hint = [r['loss/hint'] for r in rows if r.get('split') == 'train' and 'loss/hint' in r]
    assert len(hint) == HINT and np.mean(hint[-3:]) < np.mean(hint[:3]), (stage, hint)

  # The same workdir under another hint scheme (other frozen parameters) is refused.
  other = kdjax_main(_args(paths, data_dir, teacher_dir, ref, '--config.scheme.train=block'),
                     check=False)
  assert other.returncode == 2 and 'differs in scheme' in other.stderr, other.stderr[-500:]


@pytest.mark.parametrize('train,second', [
    ('prefix', ['hidden/0/bias', 'hidden/0/kernel', 'hidden/1/bias', 'hidden/1/kernel']),
    ('block', ['hidden/1/bias', 'hidden/1/kernel'])])
def test_the_plan_trains_blocks_up_to_i_or_block_i_alone(paths, data_dir, teacher_dir, tmp_path,
                                                         train, second):
  from kdjax.config import load_config
  from kdjax.schemes import plan_layerwise
  flags = [f'data.name={paths["small"]}', f'data.data_dir={data_dir}',
           f'teacher.workdir={teacher_dir}', f'scheme.train={train}']
  config = load_config(f'{paths["configs"]}/mnist1d/layerwise.py:tiny',
                       [tuple(f.split('=', 1)) for f in flags])
  plan = plan_layerwise(config, str(tmp_path / 'run'))
  assert [p.stage.name for p in plan] == ['hint1', 'hint2', 'final']
  assert parameter_names(plan[0].trainable) == ['hidden/0/bias', 'hidden/0/kernel']
  assert parameter_names(plan[1].trainable) == second and plan[2].trainable is None
  assert plan[1].stage.config.init.workdir == plan[0].stage.workdir   # each warm-starts
  assert plan[2].stage.config.init.workdir == plan[1].stage.workdir
  assert dict(plan[1].stage.config.loss.terms.hint)['teacher'] == 'stage2'
  assert not (tmp_path / 'run').exists()
