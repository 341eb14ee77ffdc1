"""A checkpoint's JSON data is what it held at the save, whatever the caller does next."""

import jax.numpy as jnp

from kdjax import workdir as workdir_lib


def test_an_async_save_keeps_the_data_as_it_was_at_the_save(tmp_path):
  # The loop saves its log window ({name: [sum, count]}) and goes on adding the next
  # steps to the same dict while orbax writes the JSON in the background.
  manager = workdir_lib.checkpoint_manager(str(tmp_path), keep=2)
  state = {'w': jnp.arange(3.0)}
  window = {'loss': [1.0, 2.0]}
  workdir_lib.save(manager, 5, state, {'position': 5, 'log_window': window})
  window['loss'][0] += 100.0
  window['grad_norm'] = [3.0, 1.0]
  manager.wait_until_finished()
  restored, data = workdir_lib.restore(manager, 5, state)
  manager.close()
  assert data == {'position': 5, 'log_window': {'loss': [1.0, 2.0]}}
  assert restored['w'].tolist() == [0.0, 1.0, 2.0]
