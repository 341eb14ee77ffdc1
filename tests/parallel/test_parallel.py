"""Meshes and regex partition rules (on fake CPU devices in a subprocess)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from kdjax.parallel import make_mesh, shardings_from_rules


def test_single_device_rules():
  mesh = make_mesh([('data', -1)])
  tree = {'dense': {'kernel': jnp.zeros((4, 6)), 'bias': jnp.zeros(6)}}
  sh = shardings_from_rules(tree, [('.*kernel', 'fsdp'), ('.*', None)], mesh)
  assert sh['dense']['bias'].spec == P()


def test_mesh_errors():
  with pytest.raises(ValueError, match='at most one'):
    make_mesh([('data', -1), ('model', -1)])
  with pytest.raises(ValueError, match='needs'):
    make_mesh([('data', jax.device_count() + 1)])


def test_fsdp_rules_on_four_devices():
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp
      from jax.sharding import PartitionSpec as P
      from kdjax.parallel import make_mesh, shardings_from_rules
      mesh = make_mesh([('data', -1)])
      assert mesh.shape['data'] == 4
      tree = {'a': {'kernel': jnp.zeros((3, 8)), 'bias': jnp.zeros(8)},
              'emb': {'embedding': jnp.zeros((10, 5))}, 'odd': {'kernel': jnp.zeros((3, 5))}}
      rules = [('.*kernel', 'fsdp'), ('.*embedding', (None, None)), ('.*', None)]
      sh = shardings_from_rules(tree, rules, mesh)
      assert sh['a']['kernel'].spec == P(None, 'data'), sh['a']['kernel'].spec
      assert sh['odd']['kernel'].spec == P(), sh['odd']['kernel'].spec   # nothing divides by 4
      assert sh['a']['bias'].spec == P()
      placed = jax.device_put(tree, sh)
      assert len(placed['a']['kernel'].addressable_shards) == 4
      assert placed['a']['kernel'].addressable_shards[0].data.shape == (3, 2)
      print('ok')
  ''')
  env = {'JAX_NUM_CPU_DEVICES': '4', 'JAX_PLATFORMS': 'cpu'}
  import os
  out = subprocess.run([sys.executable, '-c', code], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'ok' in out.stdout
