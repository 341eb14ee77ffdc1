"""The token-KD step sharded over data x fsdp x model on 8 (fake CPU) devices equals the
one-device step: the student and the teacher each placed by the decoder's partition rules."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    jax.config.update('jax_default_matmul_precision', 'highest')
    from kdjax.config import load_config
    from kdjax.engine import setup
    from kdjax.models.transformer import PARTITION_RULES

    config_file, teacher, data_dir = sys.argv[1:4]
    rules = [('.*' + regex, spec) for regex, spec in PARTITION_RULES]

    def run(mesh):
        c = load_config(config_file + ':tiny')
        c.teacher.workdir, c.data.data_dir = teacher, data_dir
        c.mesh = mesh
        c.partition_rules = rules
        c.teacher.partition_rules = rules
        c.num_steps = 8
        r = setup(c, log=lambda m: None)
        state = r.init()
        batch_spec = str(r.feed.source.batch_sharding.spec)
        state, metrics = r.calls(state, r.feed.inputs(0, 8), 8)
        leaves = jax.tree_util.tree_leaves_with_path(state.params['student'])
        specs = {jax.tree_util.keystr(p): str(a.sharding.spec) for p, a in leaves}
        values = {jax.tree_util.keystr(p): np.asarray(jax.device_get(a)) for p, a in leaves}
        return (values, specs, np.asarray(metrics['loss'][0]) / np.asarray(metrics['loss'][1]),
                batch_spec)

    one, _, loss1, _ = run([('data', 1)])
    eight, specs, loss8, batch_spec = run([('data', 2), ('fsdp', 2), ('model', 2)])
    # per parameter: the largest difference relative to the parameter's scale
    worst = max(float(np.max(np.abs(one[k] - eight[k])) / np.max(np.abs(one[k]))) for k in one)
    print(json.dumps({'worst': worst, 'loss_diff': float(np.max(np.abs(loss1 - loss8))),
                      'specs': specs, 'devices': jax.device_count(),
                      'batch_spec': batch_spec}))
''')


@pytest.mark.multiprocess
def test_sharded_token_kd_step_equals_one_device(lm_teacher_dir, data_dir, paths, tmp_path):
  script = tmp_path / 'sharded.py'
  script.write_text(SCRIPT)
  env = {'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '8'}
  import os
  out = subprocess.run([sys.executable, str(script), f'{paths["configs"]}/lm/token_kd.py',
                        lm_teacher_dir, data_dir], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600, cwd=paths['root'])
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['devices'] == 8
  specs = result['specs']
  # tensor parallelism on the heads and the MLP, FSDP on the other axis
  q = next(v for k, v in specs.items() if "'attn'" in k and "'q'" in k and 'kernel' in k)
  down = next(v for k, v in specs.items() if "'down'" in k and 'kernel' in k)
  assert q == "P('fsdp', 'model', None)", specs
  assert down == "P('model', 'fsdp')", specs
  # the batch is split over data x fsdp (each FSDP shard its own examples), not over model
  assert result['batch_spec'] == "P(('data', 'fsdp'),)", result['batch_spec']
  assert result['worst'] < 1e-5 and result['loss_diff'] < 1e-5, result
