"""Blocked attention against jax.nn.dot_product_attention, alone and inside the model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax import attention
from igpt_jax import kernels
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


def test_splash_runs_per_device_on_a_data_fsdp_tensor_mesh():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v = _qkvg(128)[:3]
  q, k, v = (jnp.concatenate([x, x], axis=0)[:, :, :2] for x in (q, k, v))  # [4, 128, 2, 8]
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                                                     "tensor", None))
  with jax.set_mesh(mesh):
    fn = jax.jit(functools.partial(kernels.splash_attention, causal=True, interpret=True))
    out = fn(*(jax.device_put(x, spec) for x in (q, k, v)))
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


def test_auto_attention_follows_the_target_platform_and_dtype():
  assert attention.resolve("xla", jnp.float32) == "xla"
  expected = "blocked" if jax.default_backend() != "gpu" else "cudnn"
  assert attention.resolve("auto", jnp.bfloat16) == expected
  # The target platform decides, not the host's backend (a CPU host compiling for a TPU).
  assert attention.resolve("auto", jnp.bfloat16, "tpu") == "splash"
  assert attention.resolve("auto", jnp.bfloat16, "tpu", seq_len=1024) == "splash"
  assert attention.resolve("auto", jnp.bfloat16, "tpu", seq_len=64) == "xla"  # 8x8: no tiles
  assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float32, "gpu") == "xla"
  assert attention.resolve("auto", jnp.float32, "cpu") == "blocked"
  assert attention.resolve("splash", jnp.float32, "cpu") == "splash"
  assert IGPTConfig(attention="splash").attention == "splash"
  with pytest.raises(ValueError, match="flash"):
    attention.resolve("flash", jnp.float32)
  with pytest.raises(ValueError, match="attention"):
    IGPTConfig(attention="flash")


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
