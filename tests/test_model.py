"""The model: published sizes, causality, the KV cache, taps, options and input checks."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax import model as M

TINY = M.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=4)


@functools.partial(jax.jit, static_argnums=(0, 1))
def randomized_params(cfg, seed=0):
  """Fresh params with every leaf perturbed: the zero-init head would hide most bugs."""
  params = M.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def tokens_for(cfg, batch=2, seed=0):
  # numpy, so that editing tokens in a test costs no eager XLA compile per op
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.n_ctx), np.int32)


def with_token(tokens, pos, shift):
  changed = tokens.copy()
  changed[0, pos] = (changed[0, pos] + shift) % 512
  return changed


@pytest.mark.parametrize("name,millions", [("igpt_s", 76.6), ("igpt_m", 455.2),
                                           ("igpt_l", 1362.3), ("igpt_xl", 6801.4)])
def test_preset_param_counts_match_paper(name, millions):
  cfg = M.preset(name)
  shapes = M.abstract_params(cfg)
  counted = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert counted == M.param_count(cfg)
  assert abs(counted / 1e6 - millions) / millions < 1e-3


def test_init_follows_release():
  cfg = M.IGPTConfig(n_px=16, n_layer=4, n_embd=256, n_head=4)
  p = M.init_params(cfg, jax.random.key(0))
  assert not np.any(p["wtet"])  # zero head: initial loss is exactly log(V)
  np.testing.assert_allclose(np.std(p["wpe"]), 0.01, rtol=0.05)
  np.testing.assert_allclose(np.std(p["wte"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(p["h_0"]["attn"]["c_attn"]), 1 / 16, rtol=0.05)
  np.testing.assert_allclose(np.std(p["h_0"]["attn"]["c_proj"]), 1 / np.sqrt(256 * 4), rtol=0.05)
  np.testing.assert_allclose(np.std(p["h_0"]["c_fc"]), 0.02, rtol=0.05)
  np.testing.assert_array_equal(p["h_0"]["ln_1"]["g"], 1.0)
  logits = jax.jit(M.IGPT(cfg).apply)({"params": p}, tokens_for(cfg))
  np.testing.assert_array_equal(logits, 0.0)


@pytest.mark.parametrize("scan", [False, True])
def test_ar_is_causal(scan):
  cfg = TINY.replace(scan_layers=scan)
  params = randomized_params(cfg)
  tokens = tokens_for(cfg, batch=1)
  jitted = jax.jit(lambda t: M.IGPT(cfg).apply({"params": params}, t))
  forward = lambda t: np.asarray(jitted(t))
  base = forward(tokens)
  for t in (0, 5, cfg.n_ctx - 1):
    out = forward(with_token(tokens, t, 1))
    # Position i predicts token i from tokens < i, so positions <= t must not move...
    np.testing.assert_array_equal(out[0, :t + 1], base[0, :t + 1])
    # ...and the change must reach the later ones, or the test proves nothing.
    if t + 1 < cfg.n_ctx:
      assert np.abs(out[0, t + 1:] - base[0, t + 1:]).max() > 1e-4


def test_bert_sees_both_sides_and_zeroes_masked_embeddings():
  cfg = TINY.replace(objective="bert")
  params = randomized_params(cfg)
  tokens = tokens_for(cfg, batch=1)
  mask = np.zeros(tokens.shape, bool)
  mask[0, 3] = True
  jitted = jax.jit(lambda t: M.IGPT(cfg).apply({"params": params}, t, mask))
  forward = lambda t: np.asarray(jitted(t))
  base = forward(tokens)
  np.testing.assert_array_equal(forward(with_token(tokens, 3, 7)), base)
  out = forward(with_token(tokens, 10, 7))
  assert np.abs(out[0, :10] - base[0, :10]).max() > 1e-4  # no causal mask
  with pytest.raises(ValueError, match="bert_mask"):
    M.IGPT(cfg).apply({"params": params}, tokens)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_matches_full_forward(scan):
  cfg = TINY.replace(scan_layers=scan)
  params = randomized_params(cfg)
  tokens = tokens_for(cfg)
  full = M.IGPT(cfg).apply({"params": params}, tokens)
  ids = np.concatenate([np.full((2, 1), cfg.sos_id), tokens[:, :-1]], axis=1)

  step = jax.jit(lambda cache, ids, i: M.IGPT(cfg).apply(
      {"params": params, "cache": cache}, ids, i, method=M.IGPT.decode, mutable=["cache"]))
  prefix = 5  # a prefill chunk, then one token at a time
  # The cache starts just long enough for the prefill and grows halfway through.
  logits, state = step(M.init_cache(cfg, 2, length=prefix), ids[:, :prefix], 0)
  cache, outs = state["cache"], [logits]
  for i in range(prefix, cfg.n_ctx):
    if i in (prefix, cfg.n_ctx // 2):
      cache = M.grow_cache(cache, cfg.n_ctx // 2 if i == prefix else cfg.n_ctx)
    logits, state = step(cache, ids[:, i:i + 1], i)
    cache = state["cache"]
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)
  with pytest.raises(ValueError, match="cache length"):
    M.init_cache(cfg, 2, length=cfg.n_ctx + 1)


@pytest.mark.parametrize("scan", [False, True])
def test_decode_refuses_positions_outside_the_cache(scan):
  cfg = TINY.replace(scan_layers=scan)
  params = randomized_params(cfg)
  cache = M.init_cache(cfg, 2, length=8)
  decode = lambda ids, i: M.IGPT(cfg).apply({"params": params, "cache": cache}, ids, i,
                                            method=M.IGPT.decode, mutable=["cache"])[0]
  ids = np.full((2, 3), cfg.sos_id, np.int32)
  assert np.isfinite(decode(ids, 5)).all()  # positions 5, 6, 7: the last three
  for index in (6, np.int32(7), -1):  # a clamped write would overwrite positions 5..7
    with pytest.raises(ValueError, match=r"positions \[.*outside the cache, whose positions "
                                         r"are \[0, 8\)"):
      decode(ids, index)
  with pytest.raises(ValueError, match="9 positions does not fit a cache of 8"):
    decode(np.zeros((2, 9), np.int32), 0)
  # A traced index (a decode loop under jit) is not read back: the logits say it instead.
  traced = jax.jit(decode)
  assert np.isfinite(traced(ids, 5)).all()
  assert np.isnan(traced(ids, 6)).all() and np.isnan(traced(ids, -1)).all()


def test_remat_under_scan_lets_xla_optimise_and_keeps_the_gradients():
  """nn.remat inside nn.scan without prevent_cse's barriers (the loop already keeps the
  recomputation apart, as flax's docs say), unscanned with them; the same gradients."""
  tokens = tokens_for(TINY)
  params = randomized_params(TINY)
  stacked = {k: v for k, v in params.items() if not k.startswith("h_")}
  stacked["h"] = jax.tree.map(lambda *x: jnp.stack(x), params["h_0"], params["h_1"])
  loss = lambda cfg: lambda p: jnp.mean(M.IGPT(cfg).apply({"params": p}, tokens) ** 2)
  ref = jax.grad(loss(TINY.replace(scan_layers=True)))(stacked)

  def remats(jaxpr):  # prevent_cse of every remat in jaxpr, nested ones included
    found = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
        found.append(eqn.params["prevent_cse"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        found += remats(sub)
    return found

  for remat in ("full", "dots"):
    scanned = TINY.replace(scan_layers=True, remat=remat)
    assert set(remats(jax.make_jaxpr(loss(scanned))(stacked).jaxpr)) == {False}
    unscanned = TINY.replace(remat=remat)
    assert set(remats(jax.make_jaxpr(loss(unscanned))(params).jaxpr)) == {True}
  grads = jax.jit(jax.grad(loss(TINY.replace(scan_layers=True, remat="full"))))(stacked)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref)


def test_options_do_not_change_the_function():
  params = randomized_params(TINY)
  tokens = tokens_for(TINY)
  ref = M.IGPT(TINY).apply({"params": params}, tokens)
  for remat in ("full", "dots"):
    out = M.IGPT(TINY.replace(remat=remat)).apply({"params": params}, tokens)
    np.testing.assert_allclose(out, ref, atol=1e-6)
  scanned = TINY.replace(scan_layers=True)
  stacked = {k: v for k, v in params.items() if not k.startswith("h_")}
  stacked["h"] = jax.tree.map(lambda *x: jnp.stack(x), params["h_0"], params["h_1"])
  np.testing.assert_allclose(M.IGPT(scanned).apply({"params": stacked}, tokens), ref, atol=1e-5)
  bf16 = M.IGPT(TINY.replace(dtype="bfloat16")).apply({"params": params}, tokens)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, ref, atol=0.1)


def test_bf16_logits_are_accumulated_and_returned_in_float32():
  cfg = TINY.replace(dtype="bfloat16")
  params = randomized_params(cfg)
  head = lambda m, t: m._head(m._trunk(m._embed(t, None))[0])  # pylint: disable=protected-access
  hn, logits = M.IGPT(cfg).apply({"params": params}, tokens_for(cfg), method=head)
  assert hn.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  # The bf16 operands' exact products, summed in float32: not a bf16 result cast up.
  exact = jnp.einsum("bsd,vd->bsv", hn.astype(jnp.float32),
                     params["wtet"].astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(logits, exact, rtol=1e-5, atol=1e-5)
  assert np.any(np.asarray(logits) != np.asarray(logits.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_mlp_backward_is_the_autodiff_one(dtype, tol):
  kx, k1, k2, kg = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(kx, (2, 5, 8), dtype)
  w_fc = (jax.random.normal(k1, (8, 32)) * 0.3).astype(dtype)
  w_proj = (jax.random.normal(k2, (32, 8)) * 0.3).astype(dtype)
  dy = jax.random.normal(kg, (2, 5, 8), dtype)
  plain = lambda x, a, b: M.quick_gelu(x @ a) @ b
  out, vjp = jax.vjp(M.mlp, x, w_fc, w_proj)
  ref_out, ref_vjp = jax.vjp(plain, x, w_fc, w_proj)
  np.testing.assert_array_equal(out, ref_out)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)


def test_feature_taps():
  cfg = TINY
  params = randomized_params(cfg)
  tokens = tokens_for(cfg)
  model = M.IGPT(cfg)
  feats = model.apply({"params": params}, tokens, method=M.IGPT.features)
  assert sorted(feats) == [0, 1, 2] and all(f.shape == (2, 32) for f in feats.values())
  # Layer 0's ln_1 reading is the normed, gain-scaled input embedding, mean over positions.
  x = model.apply({"params": params}, tokens, None, method=lambda m, t, b: m._embed(t, b))
  ms = jnp.mean(x * x, axis=-1, keepdims=True)
  expected = jnp.mean(x / jnp.sqrt(ms + cfg.norm_eps) * params["h_0"]["ln_1"]["g"], axis=1)
  np.testing.assert_allclose(feats[0], expected, atol=1e-5)
  resid = model.apply({"params": params}, tokens, [0], "residual", method=M.IGPT.features)
  np.testing.assert_allclose(resid[0], jnp.mean(x, axis=1), atol=1e-6)
  with pytest.raises(ValueError, match="out of range"):
    model.apply({"params": params}, tokens, [3], method=M.IGPT.features)


def test_quadrant_readings():
  cfg = TINY  # 4x4: quadrant (i, j) holds pixels of rows 2i, 2i+1 and columns 2j, 2j+1
  params = randomized_params(cfg)
  tokens = tokens_for(cfg)
  model = M.IGPT(cfg)
  x = model.apply({"params": params}, tokens, None, method=lambda m, t, b: m._embed(t, b))
  grid = model.apply({"params": params}, tokens, [0, 2], "residual_2x2", method=M.IGPT.features)
  assert grid[0].shape == grid[2].shape == (2, 4 * cfg.n_embd)
  image = np.asarray(x).reshape(2, 4, 4, cfg.n_embd)
  for q, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    np.testing.assert_allclose(grid[0][:, q * cfg.n_embd:(q + 1) * cfg.n_embd],
                               image[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2)),
                               atol=1e-6)
  # The four quadrant means average to the position mean, at every layer including ln_f's.
  means = model.apply({"params": params}, tokens, [1, 2], "ln1", method=M.IGPT.features)
  quads = model.apply({"params": params}, tokens, [1, 2], "ln1_2x2", method=M.IGPT.features)
  for layer in (1, 2):
    np.testing.assert_allclose(quads[layer].reshape(2, 4, -1).mean(axis=1), means[layer],
                               atol=1e-5)
  scanned = cfg.replace(scan_layers=True)
  stacked = {k: v for k, v in params.items() if not k.startswith("h_")}
  stacked["h"] = jax.tree.map(lambda *x: jnp.stack(x), params["h_0"], params["h_1"])
  scan_quads = M.IGPT(scanned).apply({"params": stacked}, tokens, [1, 2], "ln1_2x2",
                                     method=M.IGPT.features)
  for layer in (1, 2):
    np.testing.assert_allclose(scan_quads[layer], quads[layer], atol=1e-5)
  odd = cfg.replace(n_px=3)
  with pytest.raises(ValueError, match="even n_px"):
    M.IGPT(odd).apply({"params": M.init_params(odd, jax.random.key(0))}, tokens_for(odd), None,
                      "ln1_2x2", method=M.IGPT.features)


def test_classifier_head():
  cfg = TINY.replace(n_classes=10)
  params = M.init_params(cfg, jax.random.key(0))
  assert params["clf"].shape == (32, 10) and not np.any(params["clf"])
  logits, class_logits = M.IGPT(cfg).apply({"params": params}, tokens_for(cfg),
                                           method=M.IGPT.classify)
  assert logits.shape == (2, 16, 512) and class_logits.shape == (2, 10)


def test_parameters_carry_logical_axes():
  boxed = M.abstract_params(TINY.replace(scan_layers=True))
  names = jax.tree.map(lambda b: b.names, boxed,
                       is_leaf=lambda x: hasattr(x, "names"))
  assert names["wte"] == ("vocab", "embed")
  assert names["h"]["attn"]["c_attn"] == ("layers", "embed", None, "heads", "kv")
  assert names["h"]["c_fc"] == ("layers", "embed", "mlp")


def test_bad_input_is_refused_clearly():
  params = M.init_params(TINY, jax.random.key(0))
  model = M.IGPT(TINY)
  with pytest.raises(ValueError, match="length 15"):
    model.apply({"params": params}, jnp.zeros((1, 15), jnp.int32))
  with pytest.raises(ValueError, match=r"\[0, 512\)"):  # values: in a host (numpy) array
    model.apply({"params": params}, np.full((1, 16), 512, np.int32))
  with pytest.raises(ValueError, match="integers"):
    model.apply({"params": params}, jnp.zeros((1, 16), jnp.float32))
  with pytest.raises(ValueError, match="unknown preset"):
    M.preset("igpt_xxl")
  with pytest.raises(ValueError, match="unknown IGPTConfig fields"):
    M.preset("igpt_s", n_layers=3)
  with pytest.raises(ValueError, match="divisible"):
    M.IGPTConfig(n_embd=30, n_head=4)
  with pytest.raises(ValueError, match="objective"):
    M.IGPTConfig(objective="mlm")
