"""Sharded training equals single-device training; layouts follow the logical-axis rules."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from igpt_jax import sharding
from igpt_jax import steps
from igpt_jax.model import IGPTConfig

CFG = IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=4, vocab_size=64)
BATCH = 8
STEPS = 5


def run(mesh_shape, devices=None, accum_steps=1):
  """Losses of STEPS Adam steps on fixed random batches, and the final state."""
  mesh = sharding.make_mesh(mesh_shape, devices)
  # Tokens from 8 of the 64 ids: a pattern the model learns within the five steps.
  batches = np.random.default_rng(0).integers(0, 8, (STEPS, BATCH, CFG.n_ctx), dtype=np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    tx = steps.make_optimizer(1e-2, STEPS, warmup_steps=1)
    state = steps.create_train_state(CFG, tx, mesh, jax.random.key(0))
    step = steps.make_train_step(steps.loss_fn(CFG), tx, steps.state_shardings(CFG, tx, mesh),
                                 accum_steps=accum_steps)
    losses = []
    for tokens in batches:
      state, metrics = step(state, sharding.shard_batch({"tokens": tokens}, mesh))
      losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.fixture(scope="module")
def single():
  return run((1, 1, 1), jax.devices()[:1])


# fp32 with the batch split over up to 8 shards and tensor-parallel matmuls: the same sums in a
# different order, so gradients differ by a few ulp (~1e-7 relative). The losses stay within
# ~1e-6 of each other over five steps; 1e-5 relative leaves a margin yet catches any real
# layout bug (a wrong reduction changes the loss at the 1e-2 level). Parameters are not
# compared elementwise: Adam moves a weight whose gradient is ~0 by up to lr whatever the
# gradient's sign, so ulp-level noise there is amplified to ~1e-5 without affecting the loss.
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_equals_single_device(single, mesh_shape):
  losses, _ = run(mesh_shape)
  np.testing.assert_allclose(losses, single[0], rtol=1e-5)
  assert losses[-1] < losses[0] - 0.1  # it trains


def test_layout_follows_rules():
  mesh = sharding.make_mesh((1, 4, 2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    tx = steps.make_optimizer(1e-3, 10)
    state = steps.create_train_state(CFG, tx, mesh, jax.random.key(0))
  assert state.params["wte"].sharding.spec == P("tensor", "fsdp")  # [vocab, embed]
  assert state.params["h_0"]["c_fc"].sharding.spec == P("fsdp", "tensor")  # [embed, mlp]
  mu = state.opt_state[0].mu  # Adam's moments follow their parameters
  assert mu["wte"].sharding.spec == P("tensor", "fsdp")
  # Each device holds half the vocabulary rows and a quarter of the embedding columns.
  assert state.params["wte"].addressable_shards[0].data.shape == (CFG.vocab_size // 2,
                                                                   CFG.n_embd // 4)
  batch = sharding.shard_batch({"tokens": np.zeros((BATCH, CFG.n_ctx), np.int32)}, mesh)
  assert batch["tokens"].addressable_shards[0].data.shape == (BATCH // 4, CFG.n_ctx)


def test_accumulation_equals_full_batch(single):
  losses, _ = run((2, 2, 2), accum_steps=2)
  np.testing.assert_allclose(losses, single[0], rtol=1e-5)


def test_mesh_shape_fills_one_minus_one_and_refuses_bad_shapes():
  assert sharding.mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert sharding.mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  for bad in [(3, -1, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1), (8, 1)]:
    with pytest.raises(ValueError, match="mesh"):
      sharding.mesh_shape(bad, 8)


def test_batch_must_split_over_shards():
  with pytest.raises(ValueError, match="batch_size=6"):
    sharding.check_batch_size(6, sharding.make_mesh((4, 2, 1)))


def test_data_mesh_uses_the_most_devices_that_split_the_batch():
  assert jax.device_count() == 8  # conftest's fake CPU devices
  assert sharding.data_mesh(1) is None
  assert sharding.data_mesh(11) is None  # a prime above 8: one device
  assert dict(sharding.data_mesh(7).shape) == {"data": 7, "fsdp": 1, "tensor": 1}
  assert dict(sharding.data_mesh(12).shape) == {"data": 6, "fsdp": 1, "tensor": 1}
  assert dict(sharding.data_mesh(16).shape) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.slow
def test_one_cpu_device_per_core(tmp_path):
  """In a fresh process the host CPU becomes one device per core; a set count is kept."""

  def devices(flags, batch_size=None):
    code = ("from igpt_jax import sharding; "
            f"sharding.use_one_cpu_device_per_core({batch_size}); "
            "import jax; print(jax.device_count())")
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env=env).stdout
    return int(out)

  cores = os.cpu_count()
  assert devices("") == cores
  # With a batch: the largest power of two up to the core count that divides it.
  assert devices("", batch_size=5) == 1
  assert devices("", batch_size=32) == 2 ** (min(cores, 32).bit_length() - 1)
  assert devices("--xla_force_host_platform_device_count=3") == 3
