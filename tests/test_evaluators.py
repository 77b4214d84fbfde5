"""The loop's evaluators built from the config, their shared batched reducer, and the loop's
schedule and early-stopping record."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from igpt_jax import evaluators
from igpt_jax import model as model_lib
from igpt_jax import sharding
from igpt_jax import steps
from igpt_jax import train

CFG = model_lib.IGPTConfig(n_px=4, n_layer=1, n_embd=16, n_head=2, vocab_size=16)


def test_batch_sums_adds_named_counts_over_every_batch():
  mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
  rows = np.arange(24, dtype=np.int32).reshape(3, 8)  # 3 batches of 8
  fn = jax.jit(lambda params, batch, rng: {
      "total": jnp.sum(batch["x"]) * params, "rows": jnp.float32(batch["x"].shape[0]),
      "draw": jax.random.uniform(rng)})
  got = evaluators.batch_sums(fn, 2.0, [{"x": r} for r in rows], mesh, seed=5)
  assert got["total"] == 2 * rows.sum() and got["rows"] == 24
  want = sum(float(jax.random.uniform(jax.random.fold_in(jax.random.key(5), i)))
             for i in range(3))  # batch i draws from fold_in(key(seed), i)
  np.testing.assert_allclose(got["draw"], want, rtol=1e-6)


def _build(cfg, **evals):
  config = base.get_config()
  config.evals.update(evals)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  return evaluators.build(config, cfg, None, mesh, "/nonexistent", eval_batches=lambda: [])


def test_build_makes_the_loops_own_then_the_configured_ones():
  assert [e.name for e in _build(CFG)] == ["held_out", "samples"]  # the probe's every is 0
  # BERT models draw no samples (sample() refuses them), even at the last step.
  assert [e.name for e in _build(CFG.replace(objective="bert"))] == ["held_out"]
  with pytest.raises(ValueError, match=r"config.evals.mine: unknown type 'fid'"):
    _build(CFG, mine={"type": "fid", "every": 10})


def test_periodic_actions_are_due_every_n_steps_and_at_the_last():
  assert [s for s in range(1, 11) if train.due(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if train.due(s, 0, 10)] == [10]


def test_early_stopping_counts_evaluations_without_a_gain():
  record = train.EarlyStopping()
  for step, accuracy in [(2, 0.5), (4, 0.5), (6, 0.7), (8, 0.6), (10, 0.7)]:
    record.update(step, accuracy)
  assert (record.best_step, record.best_eval_accuracy, record.stale) == (6, 0.7, 2)
  assert record.stop(patience=2) and not record.stop(patience=3) and not record.stop(patience=0)


def test_held_out_loss_by_pixel_is_a_picture_of_the_same_loss(tmp_path):
  params = jax.tree.map(lambda p: p + 0.05, model_lib.init_params(CFG, jax.random.key(0)))
  tokens = np.random.default_rng(0).integers(0, 16, (4, CFG.n_ctx), dtype=np.int32)
  batch = {"tokens": tokens, "valid": np.array([True, True, True, False])}
  config = base.get_config()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  held_out, = [e for e in evaluators.build(config, CFG, None, mesh, str(tmp_path),
                                           lambda: iter([batch])) if e.name == "held_out"]
  got = held_out.fn(params, 7)
  png = (tmp_path / "loss_by_pixel_0000007.png").read_bytes()
  assert got["eval_loss_by_pixel"] == png and png[:4] == b"\x89PNG"
  # The picture's pixels: each position's loss over the 3 valid rows; their mean is eval_loss.
  sums = steps.make_eval_step(CFG)(params, batch, None)
  by_pixel = np.asarray(sums["position_loss"]) / 3
  np.testing.assert_allclose(by_pixel.mean(), got["eval_loss"], rtol=1e-5)
  logits = model_lib.IGPT(CFG).apply({"params": params}, tokens[:3])
  first = -jax.nn.log_softmax(logits[:, 0])[np.arange(3), tokens[:3, 0]]  # the top-left pixel
  np.testing.assert_allclose(by_pixel[0], first.mean(), rtol=1e-5)
  # BERT counts only the masked positions, so each pixel has its own count.
  bert = steps.make_eval_step(CFG.replace(objective="bert"))(params, batch, jax.random.key(1))
  mask = model_lib.draw_bert_mask(jax.random.key(1), tokens.shape)
  np.testing.assert_array_equal(bert["position_count"], mask[:3].sum(0))


def test_fine_tuning_reads_the_held_out_split_once_for_loss_and_accuracy(tmp_path):
  cfg = CFG.replace(n_classes=3)
  params = jax.tree.map(lambda p: p + 0.05, model_lib.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, 16, (4, cfg.n_ctx), dtype=np.int32),
              "labels": rng.integers(0, 3, 4, dtype=np.int32),
              "valid": np.array([True, True, True, i == 0])} for i in range(2)]
  passes = []
  config = base.get_config()
  config.init_workdir = "/a/pretrained/run"  # fine-tuning: the loop's accuracy rides along
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  held_out, = [e for e in evaluators.build(config, cfg, None, mesh, str(tmp_path),
                                           lambda: passes.append(1) or iter(batches))
               if e.name == "held_out"]
  got = held_out.fn(params, 10)
  assert len(passes) == 1
  assert got["eval_accuracy"] == evaluators.held_out_accuracy(cfg, params, batches, mesh,
                                                               config.k_masks, config.seed + 1)
  losses = np.concatenate([steps.example_losses(cfg, params, b["tokens"], None)[b["valid"]]
                           for b in batches])  # 7 valid rows
  np.testing.assert_allclose(got["eval_loss"], losses.mean(), rtol=1e-5)


@pytest.mark.parametrize("k_masks", [1, 3])
def test_bert_held_out_loss_sees_the_mask_of_the_first_vote(monkeypatch, tmp_path, k_masks):
  """Fine-tuning a BERT model: eval_loss is computed under the mask of the first of the k_masks
  votes of eval_accuracy (with one vote: the same mask)."""
  cfg = CFG.replace(objective="bert", n_classes=5 + k_masks)  # its own: predict traces anew
  drawn, real = [], model_lib.draw_bert_mask

  def draw(rng, shape, *args, **kwargs):  # records (who drew it, the mask) as it runs
    mask, who = real(rng, shape, *args, **kwargs), inspect.stack()[1].function
    jax.debug.callback(lambda m: drawn.append((who, np.asarray(m))), mask)
    return mask
  monkeypatch.setattr(model_lib, "draw_bert_mask", draw)
  params = jax.tree.map(lambda p: p + 0.05, model_lib.init_params(cfg, jax.random.key(0)))
  batch = {"tokens": np.random.default_rng(0).integers(0, 16, (4, cfg.n_ctx), dtype=np.int32),
           "labels": np.arange(4, dtype=np.int32), "valid": np.ones(4, bool)}
  config = base.get_config()
  config.init_workdir, config.k_masks = "/a/pretrained/run", k_masks
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  held_out, = [e for e in evaluators.build(config, cfg, None, mesh, str(tmp_path),
                                           lambda: iter([batch])) if e.name == "held_out"]
  held_out.fn(params, 10)
  loss_masks = [m for who, m in drawn if who == "_logits"]  # steps: the eval step's mask
  votes = [m for who, m in drawn if who == "_classify"]
  assert len(loss_masks) == 1 and len(votes) == k_masks
  assert any(np.array_equal(loss_masks[0], v) for v in votes)
  assert len({v.tobytes() for v in votes}) == k_masks  # each vote its own mask
