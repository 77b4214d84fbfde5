"""Fine-tuning: the sharded step lowers the classifier loss; BERT k-mask modal predictions."""

import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from igpt_jax import finetune
from igpt_jax import model as model_lib
from igpt_jax import sharding
from igpt_jax import train

BASE = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)


def _separable(n, seed):
  """Class 1 images use the upper half of the palette, class 0 the lower half."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n, dtype=np.int32) % 2
  tokens = rng.integers(0, 8, (n, BASE.n_ctx)) + 8 * labels[:, None]
  return {"tokens": tokens.astype(np.int32), "labels": labels}


def test_with_classifier_adds_a_zero_head():
  cfg, params = finetune.with_classifier(BASE, model_lib.init_params(BASE, jax.random.key(0)), 3)
  assert cfg.n_classes == 3 and not np.any(params["clf"]) and params["clf"].shape == (32, 3)
  with pytest.raises(ValueError, match="n_classes"):
    finetune.with_classifier(BASE, params, 0)


def test_sharded_steps_reduce_classifier_loss():
  cfg, params = finetune.with_classifier(BASE, model_lib.init_params(BASE, jax.random.key(0)), 2)
  mesh = sharding.make_mesh((-1, 1, 1))  # the 8 fake CPU devices
  tx = train.make_optimizer(1e-2, 10, schedule="constant")
  batch = _separable(16, 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    shardings = train.state_shardings(cfg, tx, mesh)
    params = jax.device_put(params, shardings.params)
    state = train.TrainState(step=jax.device_put(jnp.int32(0), shardings.step), params=params,
                             opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
    step = train.make_train_step(finetune.loss_fn(cfg), tx, shardings)
    losses = []
    for _ in range(8):
      state, metrics = step(state, sharding.shard_batch(batch, mesh))
      losses.append(float(metrics["clf_loss"]))
    eval_step = finetune.make_eval_step(cfg)
    held_out = _separable(16, 1)
    correct, count = eval_step(state.params, sharding.shard_batch(held_out, mesh),
                               jax.random.key(0))
  assert losses[0] == pytest.approx(np.log(2), rel=1e-4)  # zero head: uniform
  assert losses[-1] < 0.5 * losses[0]
  assert int(count) == 16 and int(correct) >= 14


def test_bert_k_mask_prediction_is_the_modal_class():
  cfg = BASE.replace(objective="bert", n_classes=3)
  params = model_lib.init_params(cfg, jax.random.key(1))
  params["clf"] = jax.random.normal(jax.random.key(2), params["clf"].shape)  # non-trivial head
  tokens = jnp.asarray(_separable(6, 2)["tokens"])
  rng, k = jax.random.key(3), 5
  got = finetune.predict(cfg, params, tokens, rng, k_masks=k)
  per_mask = np.stack([np.argmax(model_lib.IGPT(cfg).apply(
      {"params": params}, tokens, model_lib.draw_bert_mask(key, tokens.shape),
      method=model_lib.IGPT.classify)[1], -1) for key in jax.random.split(rng, k)])  # [k, B]
  modal = [np.argmax(np.bincount(col, minlength=3)) for col in per_mask.T]
  np.testing.assert_array_equal(got, modal)
  assert len({tuple(p) for p in per_mask}) > 1  # the masks do change predictions


def test_finetune_end_to_end_keeps_the_best_model(tmp_path):
  from experiments import finetune_cifar10_tiny
  from igpt_jax import checkpoint

  separable = _separable(48, 3)
  # 2x2 images whose 4 pixels are the first 4 tokens, in a palette of 16 grey levels.
  palette = np.repeat(np.linspace(-1, 1, 16, dtype=np.float32)[:, None], 3, axis=1)
  images = np.rint(127.5 * (palette[separable["tokens"][:, :4]] + 1)).astype(np.uint8)
  np.savez(tmp_path / "tiny.npz", images=images.reshape(48, 2, 2, 3), labels=separable["labels"])
  cfg = BASE.replace(n_px=2)
  checkpoint.save_params(str(tmp_path / "pre"), cfg, model_lib.init_params(cfg, jax.random.key(0)),
                         palette)
  config = finetune_cifar10_tiny.get_config()
  config.init_workdir = str(tmp_path / "pre")
  config.data = dict(name=str(tmp_path / "tiny.npz"), train_split="train[:32]",
                     eval_split="train[32:40]", augment="none")
  config.test_split = "train[40:]"
  config.update(dict(n_classes=2, batch_size=8, total_steps=6, eval_every=2, patience=5, lr=1e-2))
  results = finetune.finetune(config, str(tmp_path / "ft"))
  lines = [json.loads(l) for l in open(tmp_path / "ft" / "finetune_metrics.jsonl")]
  assert [l["step"] for l in lines] == [2, 4, 6]
  assert results["held_out_accuracy"] == max(l["held_out_accuracy"] for l in lines)
  assert 0.0 <= results["test_accuracy"] <= 1.0
  ft_cfg, params, _ = checkpoint.load(str(tmp_path / "ft"))
  assert ft_cfg.n_classes == 2 and params["clf"].shape == (cfg.n_embd, 2)
