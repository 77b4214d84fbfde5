"""Blocked attention against jax.nn.dot_product_attention, alone and inside the model."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax import attention
from igpt_jax import checkpoint
from igpt_jax import kernels
from igpt_jax import sharding
from igpt_jax.model import IGPT, IGPTConfig, init_cache, init_params


def _qkvg(t, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, (2, t, 3, 8), jnp.float32) for k in keys]


# t 40 with block 16: a last block shorter than the others; block 64 >= t: a single block.
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,block", [(64, 16), (40, 16), (24, 64)])
def test_blocked_matches_reference_values_and_grads(causal, t, block):
  q, k, v, g = _qkvg(t)

  def loss(fn, q, k, v):  # a random projection of the output: its grads cover every entry
    return jnp.vdot(fn(q, k, v), g)

  ref = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
  ours = functools.partial(kernels.blocked_attention, causal=causal, block=block)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
  grads_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
  grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# Pallas' interpreter (the TPU kernel on CPU): T 256 in tiles of 128, so the causal mask skips a
# tile, a partial (diagonal) tile and a full one all occur, forward and in both backward kernels.
@pytest.mark.parametrize("causal", [True, False])
def test_splash_interpret_matches_reference_values_and_grads(causal):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = [jax.random.normal(key, (2, 256, 2, 16), jnp.float32) for key in keys]
  loss = lambda fn, q, k, v: jnp.vdot(fn(q, k, v), g)
  ref = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
  ours = functools.partial(kernels.splash_attention, causal=causal, block=128, interpret=True)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
  grads_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_px", [32, 48, 64])
def test_splash_tiles_divide_every_preset_length(n_px):
  t = n_px * n_px  # 1024, 2304 (48x48: 512 does not divide it), 4096
  block = kernels.splash_block(t)
  assert t % block == 0 and block % 128 == 0 and 128 <= block <= kernels.SPLASH_BLOCK
  assert block == max(b for b in range(128, 513, 128) if t % b == 0)
  with pytest.raises(ValueError, match="multiple of 128"):
    kernels.splash_block(t + 64)


def test_splash_with_a_tile_wider_than_divides_t():
  # T 384 with tiles of up to 256: 256 does not divide 384, so the kernel must take 128.
  q, k, v = (x[:, :, :1] for x in _qkvg(384)[:3])
  out = jax.jit(functools.partial(kernels.splash_attention, causal=True, block=256,
                                  interpret=True))(q, k, v)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True),
                             atol=1e-5, rtol=1e-5)


def _shard_map_specs(fn, q, k, v):
  """The specs of q, k, v (its last three operands; the kernel's mask tables come first) and
  of the output in the one shard_map of fn's jaxpr."""
  eqns = [e for e in jax.make_jaxpr(fn)(q, k, v).jaxpr.eqns if e.primitive.name == "shard_map"]
  assert len(eqns) == 1, eqns
  return (*eqns[0].params["in_specs"][-3:], *eqns[0].params["out_specs"])


# Ours (sharding.RULES over data x fsdp x tensor), and a caller's own mesh names and rules.
@pytest.mark.parametrize("axes, rules, batch, heads", [
    (("data", "fsdp", "tensor"), sharding.RULES, ("data", "fsdp"), ("tensor",)),
    (("replica", "model", "unused"), (("batch", "replica"), ("heads", "model")), ("replica",),
     ("model",)),
])
def test_splash_splits_batch_and_heads_as_the_rules_in_effect_say(axes, rules, batch, heads):
  mesh = jax.make_mesh((2, 2, 2), axes, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v = _qkvg(128)[:3]
  q, k, v = (jnp.concatenate([x, x], axis=0)[:, :, :2] for x in (q, k, v))  # [4, 128, 2, 8]
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  spec = jax.sharding.PartitionSpec(batch, None, heads, None)
  placed = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = functools.partial(kernels.splash_attention, causal=True, interpret=True)
    assert _shard_map_specs(fn, *placed) == (spec,) * 4
    out = jax.jit(fn)(*placed)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_blocked_is_causal():
  q, k, v, _ = _qkvg(32)
  out = kernels.blocked_attention(q, k, v, causal=True, block=8)
  k2, v2 = k.at[:, 20:].set(7.0), v.at[:, 20:].set(-3.0)  # change only the future of row 19
  out2 = kernels.blocked_attention(q, k2, v2, causal=True, block=8)
  np.testing.assert_array_equal(out[:, :20], out2[:, :20])
  assert not np.allclose(out[:, 20:], out2[:, 20:])


def test_bfloat16_inputs_keep_float32_softmax():
  q, k, v, _ = _qkvg(32)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  low = kernels.blocked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=True,
                                    block=8)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(jnp.float32), ref, atol=3e-2)


def _device(platform, capability=None):
  """A device as resolve reads one: a real GPU and a compile-only one (a plan's target) alike
  carry their compute capability."""
  return types.SimpleNamespace(platform=platform, compute_capability=capability)


def test_auto_attention_follows_the_target_device_and_dtype():
  bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
  assert attention.resolve("xla", f32) == "xla"
  expected = "blocked" if jax.default_backend() != "gpu" else "cudnn"
  assert attention.resolve("auto", bf16, head_dim=64) == expected
  # The target device decides, not the host's backend (a CPU host compiling for a TPU).
  tpu = _device("tpu")
  assert attention.resolve("auto", bf16, tpu) == "splash"
  assert attention.resolve("auto", bf16, tpu, seq_len=1024) == "splash"
  assert attention.resolve("auto", bf16, tpu, seq_len=64) == "xla"  # 8x8: no tiles
  assert attention.resolve("auto", f32, _device("cpu")) == "blocked"
  assert attention.resolve("splash", f32, _device("cpu")) == "splash"
  # cuDNN's flash attention where it runs: Ampere (8.0) and later, 16 bit, head dim a multiple
  # of 8 up to 128 (256 from Hopper); XLA's on a V100 (7.0) or a T4 (7.5), and in float32.
  a100, h100 = _device("gpu", "8.0"), _device("gpu", "9.0")
  for gpu in (a100, _device("gpu", "8.9"), h100):
    assert attention.resolve("auto", bf16, gpu, head_dim=64) == "cudnn"
    assert attention.resolve("auto", f16, gpu, head_dim=128) == "cudnn"
    assert attention.resolve("auto", f32, gpu, head_dim=64) == "xla"
    assert attention.resolve("auto", bf16, gpu, head_dim=60) == "xla"
  for old in (_device("gpu", "7.0"), _device("gpu", "7.5"), _device("gpu", "6.0")):
    assert attention.resolve("auto", f16, old, head_dim=64) == "xla"
    assert attention.resolve("auto", bf16, old, head_dim=64) == "xla"
  assert attention.resolve("auto", bf16, a100, head_dim=256) == "xla"
  assert attention.resolve("auto", bf16, h100, head_dim=256) == "cudnn"
  assert IGPTConfig(attention="splash").attention == "splash"
  with pytest.raises(ValueError, match="flash"):
    attention.resolve("flash", f32)
  with pytest.raises(ValueError, match="attention"):
    IGPTConfig(attention="flash")


def test_a_checkpoint_that_recorded_cudnn_runs_auto_where_cudnn_does_not():
  saved = IGPTConfig(n_px=8, n_layer=1, n_embd=64, n_head=1, attention="cudnn", dtype="float16")
  assert checkpoint.for_this_host(saved, device=_device("gpu", "8.0")).attention == "cudnn"
  for where in (_device("gpu", "7.5"), _device("cpu"), _device("tpu")):
    assert checkpoint.for_this_host(saved, device=where).attention == "auto"
  assert checkpoint.for_this_host(saved.replace(dtype="float32"),
                                  device=_device("gpu", "9.0")).attention == "auto"


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_model_logits_agree_across_implementations(objective):
  cfg = IGPTConfig(n_px=8, n_layer=2, n_embd=32, n_head=4, vocab_size=16, objective=objective,
                   attention="xla")
  params = init_params(cfg, jax.random.key(0))
  # wtet starts at zero (all logits 0): perturb it so the comparison sees the trunk.
  params["wtet"] = jax.random.normal(jax.random.key(1), params["wtet"].shape)
  tokens = jax.random.randint(jax.random.key(2), (2, cfg.n_ctx), 0, cfg.vocab_size)
  mask = jax.random.bernoulli(jax.random.key(3), 0.15, tokens.shape) if objective == "bert" else None
  ref = jax.jit(IGPT(cfg).apply)({"params": params}, tokens, mask)
  blocked = jax.jit(IGPT(cfg.replace(attention="blocked")).apply)({"params": params}, tokens,
                                                                   mask)
  np.testing.assert_allclose(blocked, ref, atol=1e-5, rtol=1e-5)


def test_decode_with_blocked_config_matches_full_forward():
  cfg = IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=4, vocab_size=16, attention="blocked")
  params = init_params(cfg, jax.random.key(0))
  params["wtet"] = jax.random.normal(jax.random.key(1), params["wtet"].shape)
  tokens = jax.random.randint(jax.random.key(2), (2, cfg.n_ctx), 0, cfg.vocab_size)
  full = jax.jit(IGPT(cfg).apply)({"params": params}, tokens)
  ids = jnp.concatenate([jnp.full((2, 1), cfg.sos_id), tokens[:, :-1]], axis=1)
  prefill = jax.jit(functools.partial(IGPT(cfg).apply, method=IGPT.decode, mutable=["cache"]),
                    static_argnums=2)
  logits, _ = prefill({"params": params, "cache": init_cache(cfg, 2)}, ids, 0)
  np.testing.assert_allclose(logits, full, atol=1e-5, rtol=1e-5)
