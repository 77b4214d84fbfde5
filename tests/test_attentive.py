"""The attentive probe: it finds the one informative token that a mean-pooled linear probe
dilutes; the head trained through a frozen forward pass ("joint") equals the one trained on
stored token features ("memory"); the per-token features pool to the linear probe's."""

import jax
import ml_collections
import numpy as np
import pytest

from experiments import probe_base
from igpt_jax import model as model_lib
from igpt_jax import sharding
from igpt_jax.probe import attentive
from igpt_jax import probe
from conftest import labelled_images

CFG = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)


def _toy(n, seed, tokens=16, dim=8, classes=4):
  """Noise tokens and one token per row, at a random place, that holds the class: its centre
  plus a marker in channel 0 that the queries can find."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n).astype(np.int32)
  x = rng.normal(0, 1, (n, tokens, dim)).astype(np.float32)
  at = rng.integers(0, tokens, n)
  x[np.arange(n), at] = 3 * np.random.default_rng(7).normal(0, 1, (classes, dim))[y]
  x[np.arange(n), at, 0] += 6
  return x, y


def _shards(x, y, count=2):
  return [{"x": a, "y": b, "valid": np.ones(len(b), bool)}
          for a, b in zip(np.split(x, count), np.split(y, count))]


def test_attentive_probe_learns_a_separable_toy_problem():
  (x, y), (tx, ty) = _toy(512, 0), _toy(256, 1)
  mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
  got = probe.fit_heads(_shards(x, y), _shards(tx, ty), attentive._stored, None, mesh,
                        n_classes=4, dim=8, heads=2, lrs=(3e-3, 3e-2), weight_decays=(0.01,),
                        epochs=5, batch_size=64)
  assert got["accuracy"] >= 0.97 and got["chosen_val_accuracy"] >= 0.9
  assert got["n_fit"] + got["n_val"] == 512 and got["n_test"] == 256
  assert got["chosen_val_loss"] == min(r["val_loss"] for r in got["grid"])
  assert len(got["grid"]) == 2 and got["steps"] == 5 * (min(
      int((~(np.random.default_rng([0, d]).random(256) < 0.1)).sum()) for d in (0, 1)) // 32)
  # The mean over tokens drowns the one token that holds the class.
  mean_pooled = probe.linear_probe(x.mean(1), y, tx.mean(1), ty, l2s=(1e-3, 1e-2))
  assert mean_pooled["accuracy"] < got["accuracy"] - 0.15


def test_head_shapes_and_bad_heads():
  params = attentive.init_head(jax.random.key(0), 8, 3, heads=2, queries=3)
  assert params["query"].shape == (3, 2, 4) and params["wv"].shape == (8, 2, 4)
  assert attentive.head_logits(params, np.ones((5, 7, 8), np.float32)).shape == (5, 3)
  with pytest.raises(ValueError, match="3 heads do not divide the feature width 8"):
    attentive.init_head(jax.random.key(0), 8, 3, heads=3, queries=1)


def test_token_features_pool_to_the_linear_probes_features():
  params = model_lib.init_params(CFG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, CFG.n_ctx), np.int32)
  pooled = probe.extract_features(CFG, params, tokens, batch_size=4)
  for layers in ((0,), (2,), (0, 1, 2)):
    got = np.asarray(jax.jit(lambda p, t, l=layers: probe.token_features(CFG, p, t, l))(
        params, tokens))
    assert got.shape == (3, CFG.n_ctx, CFG.n_embd)
    np.testing.assert_allclose(got.mean(1), np.mean([pooled[l] for l in layers], 0),
                               rtol=1e-5, atol=1e-6)
  scanned = CFG.replace(scan_layers=True)  # the blocks' parameters stacked on a layer axis
  stacked = {**{k: v for k, v in params.items() if not k.startswith("h_")},
             "h": jax.tree.map(lambda *a: np.stack(a), params["h_0"], params["h_1"])}
  np.testing.assert_allclose(probe.token_features(scanned, stacked, tokens, (1,)),
                             probe.token_features(CFG, params, tokens, (1,)), rtol=1e-5,
                             atol=1e-6)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  """48 labelled 4x4 images, 4 classes (class c brighter in channel c % 3), and a palette."""
  root = tmp_path_factory.mktemp("attentive")
  images, labels = labelled_images(48, 4)
  np.savez(root / "tiny.npz", images=images, labels=labels)
  return root / "tiny.npz"


@pytest.mark.slow
def test_joint_training_through_the_frozen_model_equals_stored_features(tiny_npz):
  palette = np.random.default_rng(1).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  params = model_lib.init_params(CFG, jax.random.key(0))
  acfg = ml_collections.ConfigDict(probe_base.get_config().attentive)
  acfg.update(batch_size=8, epochs=3, lrs=(3e-3,), weight_decays=(0.01, 0.1))
  mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
  splits = {"train": "train[:32]", "test": "train[32:]"}
  got = {}
  for mode in ("memory", "joint"):
    acfg.mode = mode
    got[mode] = attentive.attentive_probe(acfg, {"name": str(tiny_npz)}, splits, CFG, params,
                                          palette, (1, 2), mesh)
  memory, joint = got["memory"], got["joint"]
  assert (memory["mode"], joint["mode"], memory["layers"]) == ("memory", "joint", [1, 2])
  assert memory["memory_bytes_per_process"] == 48 * CFG.n_ctx * CFG.n_embd * 4
  assert (memory["n_fit"] + memory["n_val"], memory["n_test"]) == (32, 16)
  for a, b in zip(memory["grid"], joint["grid"]):
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-4)
  assert (memory["accuracy"], memory["weight_decay"]) == (joint["accuracy"],
                                                          joint["weight_decay"])
  acfg.update(mode="auto", max_bytes=1)
  assert attentive.attentive_probe(acfg, {"name": str(tiny_npz)}, splits, CFG, params, palette,
                                   (2,), mesh)["mode"] == "joint"
