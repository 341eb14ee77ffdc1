"""Real runs trace their train call under the mesh (``jax.set_mesh`` in
``TrainCalls.jitted``): a tiny decoder LM on 4 fake CPU devices under a data x fsdp mesh
lowers with the residual stream constrained to the batch axes (as ``kdjax plan`` lowers
it) and trains and evaluates as on one device."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, re, sys
    import jax, numpy as np
    jax.config.update('jax_default_matmul_precision', 'highest')
    from kdjax.config import load_config
    from kdjax.engine import setup
    from kdjax.models.transformer import PARTITION_RULES

    config_file, data_dir = sys.argv[1:3]
    rules = [('.*' + regex, spec) for regex, spec in PARTITION_RULES]

    def run(mesh):
        c = load_config(config_file + ':tiny')
        c.data.data_dir = data_dir
        c.mesh = mesh
        c.partition_rules = rules
        c.num_steps = 2
        r = setup(c, log=lambda m: None)
        state = r.init()
        inputs = r.feed.inputs(0, 2)
        lowered = r.calls.jitted(2).lower(state, inputs).as_text()      # as the loop runs it
        unmeshed = r.calls.jitted(2).fn.lower(state, inputs).as_text()  # the bare jit
        state, metrics = r.calls(state, inputs, 2)
        with jax.set_mesh(r.mesh):   # as train_loop evaluates
            evaluation = r.evaluate(state)
        params = {jax.tree_util.keystr(p): np.asarray(jax.device_get(a))
                  for p, a in jax.tree_util.tree_leaves_with_path(state.params['student'])}
        loss = np.asarray(metrics['loss'][0]) / np.asarray(metrics['loss'][1])
        return params, loss, evaluation, lowered, unmeshed, c

    one, loss1, eval1, _, _, _ = run([('data', 1)])
    four, loss4, eval4, lowered, unmeshed, c = run([('data', 2), ('fsdp', 2)])
    worst = max(float(np.max(np.abs(one[k] - four[k])) / np.max(np.abs(one[k]))) for k in one)
    residual = (rf'sdy.sharding_constraint [^\\n]*<@mesh, \\[{{"data", "fsdp"}}, {{}}, {{}}\\]>'
                rf' : tensor<{c.batch_size}x\\d+x{c.model.kwargs.hidden_size}xf32>')
    print(json.dumps({
        'devices': jax.device_count(), 'worst': worst,
        'loss_diff': float(np.max(np.abs(loss1 - loss4))),
        'eval': [eval1, eval4], 'layers': c.model.kwargs.num_layers,
        'residual_in_mesh': len(re.findall(residual, lowered)),
        'residual_unmeshed': len(re.findall(residual, unmeshed))}))
''')


def test_train_call_lowers_with_the_residual_constraint_and_equals_one_device(data_dir, root,
                                                                              tmp_path):
  script = tmp_path / 'mesh_context.py'
  script.write_text(SCRIPT)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '4'}
  out = subprocess.run([sys.executable, str(script), f'{root}/configs/lm/teacher.py', data_dir],
                       capture_output=True, text=True, env=env, timeout=600, cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['devices'] == 4
  # the residual stream after the embedding and after each block, [batch, tokens,
  # hidden], split over data x fsdp: only with the mesh in context
  assert result['residual_in_mesh'] >= result['layers'] + 1, result
  assert result['residual_unmeshed'] == 0, result
  # The sharded gradient sums round in another order (~1e-7 relative); AdamW's first
  # steps divide each gradient by its own magnitude, which brings near-zero gradients'
  # differences up to ~1e-5 of a parameter's scale.
  assert result['worst'] < 1e-4 and result['loss_diff'] < 1e-5, result
  (a, b) = result['eval']
  assert abs(a['loss'] - b['loss']) < 1e-5 and abs(a['accuracy'] - b['accuracy']) < 1e-6, result
