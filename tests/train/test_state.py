"""Tests for nfnets/train/state.py: init, the applied-update count, NaN names."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets.train import mesh as mesh_lib
from nfnets.train import state as state_lib


def _forward():
  def f(images, is_training):
    del is_training
    return {'logits': hk.Linear(3, w_init=jnp.ones, name='linear')(images.reshape(len(images), -1))}
  return hk.transform_with_state(f)


def test_init_on_a_mesh_is_replicated_without_a_device_axis():
  optimizer = optax.sgd(optax.linear_schedule(0.1, 0.0, 10))
  ts0 = state_lib.init_train_state(_forward(), optimizer, 0, (2, 2, 1))
  assert ts0.step.dtype == jnp.int32 and int(ts0.step) == 0
  assert ts0.rng.dtype == jnp.uint32
  mesh = mesh_lib.make_mesh()
  on_mesh = state_lib.init_train_state(_forward(), optimizer, 0, (2, 2, 1), mesh)
  w = on_mesh.params['linear']['w']
  assert w.shape == ts0.params['linear']['w'].shape and w.sharding.is_fully_replicated
  assert len(w.sharding.device_set) == jax.device_count()
  jax.tree.map(np.testing.assert_array_equal, mesh_lib.host_copy(on_mesh), jax.device_get(ts0))
  with pytest.raises(ValueError, match='image_shape'):
    state_lib.init_train_state(_forward(), optimizer, 0, (8, 3))
  # The applied-update count is the schedule's own counter, 0 before any update.
  assert int(state_lib.applied_updates(ts0.opt_state, default=jnp.int32(7))) == 0
  # A constant-lr optimizer has no schedule counter: the default is used.
  plain = optax.sgd(0.1).init(ts0.params)
  assert int(state_lib.applied_updates(plain, default=jnp.int32(7))) == 7


def test_init_is_one_program_and_no_two_leaves_share_a_buffer(caplog):
  # Shapes no other test compiles: a program taken from this process's caches would log nothing.
  def f(images, is_training):
    del is_training
    return {'logits': hk.Linear(13, name='linear')(images.reshape(len(images), -1))}

  optimizer = optax.sgd(optax.linear_schedule(0.1, 0.0, 10), momentum=0.9)
  with caplog.at_level('WARNING'), jax.log_compiles(True):
    ts = state_lib.init_train_state(hk.transform_with_state(f), optimizer, jax.random.key(5),
                                    (3, 1, 1))
  compiled = [r.getMessage().split(' ')[1] for r in caplog.records
              if r.getMessage().startswith('Compiling ')]
  assert len(compiled) == 1, compiled
  # The train step donates the whole state: every leaf must own its buffer (the EMA copies too).
  leaves = jax.tree.leaves(ts)
  assert len({x.unsafe_buffer_pointer() for x in leaves}) == len(leaves)
  jax.tree.map(np.testing.assert_array_equal, ts.ema_params, ts.params)


def test_first_nonfinite_names_the_path():
  tree = {'params': {'x': np.array([np.nan])},
          'grads': {'TinyNet/~/conv': {'w': np.ones(3), 'b': np.array([0.0, np.inf])}},
          'loss': np.float32(1.0)}
  assert state_lib.first_nonfinite(tree) == 'grads/TinyNet/~/conv/b'
  assert state_lib.first_nonfinite({'loss': 1.0, 'count': np.array([1, 2])}) is None
  assert state_lib.first_nonfinite([np.ones(2), np.array([np.nan], jnp.bfloat16)]) == '1'
