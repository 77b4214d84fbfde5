"""Fine-tuning a pretrained iGPT as a classifier, as in the paper.

The classifier reads the mean over positions of the ln_f output through a zero-initialised
linear head without bias (`IGPTConfig.n_classes`, `IGPT.classify`). The loss keeps the
generative term: L = L_GEN + clf_weight * L_CLF (1:1 in the paper). Training reuses the
pretraining machinery of `igpt_jax.train` (optimizer, sharded state, jitted donated step); held-
out accuracy is evaluated every `eval_every` steps and training stops `patience` evaluations
after the last improvement, keeping the best parameters.

BERT models draw fresh masks at eval too; `k_masks` > 1 predicts the modal class over k masks.

  with_classifier(cfg, params, n_classes) -> (cfg, params)   head added, zero
  loss_fn(cfg, clf_weight) -> fn(params, batch, rng)          for train.make_train_step
  predict(cfg, params, tokens, rng, k_masks) -> [B] classes
  make_eval_step(cfg, k_masks) -> eval(params, batch, rng) -> (correct, count)
  finetune(config, workdir) -> results                        behind launch/finetune.py
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable

from absl import logging
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib


def with_classifier(cfg: model_lib.IGPTConfig, params, n_classes: int):
  """Pretrained (cfg, params) -> the same model with a zero classifier [D, n_classes]."""
  if n_classes <= 0:
    raise ValueError(f"n_classes must be positive, got {n_classes}")
  params = dict(params)
  if "clf" in params and params["clf"].shape != (cfg.n_embd, n_classes):
    raise ValueError(f"checkpoint has a classifier of shape {params['clf'].shape}, the config "
                     f"asks for {n_classes} classes")
  params.setdefault("clf", np.zeros((cfg.n_embd, n_classes), jnp.dtype(cfg.param_dtype)))
  return cfg.replace(n_classes=n_classes), params


def _classify(cfg, params, tokens, rng):
  """(logits [B, T, V], class_logits [B, C], bert mask [B, T] or None); BERT draws a mask."""
  mask = model_lib.draw_bert_mask(rng, tokens.shape) if cfg.objective == "bert" else None
  logits, class_logits = model_lib.IGPT(cfg).apply({"params": params}, tokens, mask,
                                                   method=model_lib.IGPT.classify)
  return logits, class_logits, mask


def loss_fn(cfg: model_lib.IGPTConfig, clf_weight: float = 1.0) -> Callable:
  """`fn(params, batch, rng) -> (loss, metrics)`: L_GEN + clf_weight * L_CLF (nats).

  L_GEN is the pretraining loss (AR: every position; BERT: the masked positions of each
  example), computed from the same forward pass as the class logits.
  """
  def fn(params, batch, rng):
    tokens, labels = batch["tokens"], batch["labels"]
    chex.assert_rank(tokens, 2)
    logits, class_logits, mask = _classify(cfg, params, tokens, rng)
    gen = jnp.mean(train_lib.token_losses(logits, tokens, mask))
    clf = optax.softmax_cross_entropy_with_integer_labels(class_logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(class_logits, -1) == labels)
    loss = gen + clf_weight * clf
    return loss, {"loss": loss, "gen_loss": gen, "clf_loss": clf, "accuracy": accuracy}
  return fn


@functools.partial(jax.jit, static_argnames=("cfg", "k_masks"))
def predict(cfg: model_lib.IGPTConfig, params, tokens, rng, k_masks: int = 1) -> jax.Array:
  """Predicted classes [B]. BERT: the modal prediction over k_masks random masks (ties go to
  the lowest class id); AR models are deterministic and ignore rng and k_masks."""
  if cfg.objective == "ar":
    return jnp.argmax(_classify(cfg, params, tokens, rng)[1], -1)
  votes = jax.lax.map(
      lambda key: jax.nn.one_hot(jnp.argmax(_classify(cfg, params, tokens, key)[1], -1),
                                 cfg.n_classes),
      jax.random.split(rng, k_masks))  # [k, B, C]
  return jnp.argmax(votes.sum(0), -1)


def make_eval_step(cfg: model_lib.IGPTConfig, k_masks: int = 1) -> Callable:
  """Jitted `eval(params, batch, rng) -> (correct predictions, valid examples)`."""
  @jax.jit
  def step(params, batch, rng):
    correct = predict(cfg, params, batch["tokens"], rng, k_masks) == batch["labels"]
    valid = batch.get("valid", jnp.ones(correct.shape, bool))
    return jnp.sum(correct & valid), jnp.sum(valid)
  return step


def finetune(config, workdir: str) -> dict:
  """Fine-tunes config.init_workdir's checkpoint; writes the best model as workdir's checkpoint.

  Returns {"best_step", "held_out_accuracy", "test_accuracy" (if config.test_split)}.
  """
  from igpt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  if not config.init_workdir:
    raise ValueError("config.init_workdir must name the pretraining run to fine-tune")
  cfg, params, palette = ckpt_lib.load(config.init_workdir)
  cfg, params = with_classifier(cfg, params, config.n_classes)
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  tx = train_lib.make_optimizer(config.lr, config.total_steps, config.warmup_steps,
                                config.grad_clip, schedule="constant")
  common = dict(palette=palette, n_px=cfg.n_px, seed=config.seed)
  train_iter = data_lib.make_dataset(config.data, split=config.data.train_split,
                                     batch_size=config.batch_size, train=True, **common)
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "finetune_metrics.jsonl"), "a")

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
    shardings = train_lib.state_shardings(cfg, tx, mesh)
    params = jax.device_put(params, shardings.params)
    state = train_lib.TrainState(
        step=jax.device_put(jnp.int32(0), shardings.step), params=params,
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
    train_step = train_lib.make_train_step(loss_fn(cfg, config.clf_weight), tx, shardings,
                                           accum_steps=config.accum_steps, seed=config.seed)
    eval_step = make_eval_step(cfg, config.k_masks)

    def accuracy(params, split):
      correct, count = 0, 0
      batches = data_lib.make_dataset(config.data, split=split, batch_size=config.batch_size,
                                      train=False, **common)
      for i, batch in enumerate(batches):
        c, n = eval_step(params, sharding_lib.shard_batch(batch, mesh),
                         jax.random.fold_in(jax.random.key(config.seed + 1), i))
        correct, count = correct + int(c), count + int(n)
      return correct / count

    best = {"step": 0, "accuracy": -1.0}
    best_params, stale = None, 0
    for step in range(1, config.total_steps + 1):
      batch = next(train_iter)
      state, metrics = train_step(state, sharding_lib.shard_batch(
          {"tokens": batch["tokens"], "labels": batch["labels"]}, mesh))
      if step % config.eval_every and step != config.total_steps:
        continue
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite fine-tuning loss at step {step}: {metrics}")
      metrics["held_out_accuracy"] = accuracy(state.params, config.data.eval_split)
      log.write(json.dumps({"step": step, **metrics}) + "\n")
      log.flush()
      logging.info("step %d: %s", step, metrics)
      if metrics["held_out_accuracy"] > best["accuracy"]:
        best = {"step": step, "accuracy": metrics["held_out_accuracy"]}
        best_params, stale = jax.tree.map(jnp.copy, state.params), 0
      else:
        stale += 1
        if stale >= config.patience:
          logging.info("early stop at step %d: no gain since step %d", step, best["step"])
          break
    results = {"best_step": best["step"], "held_out_accuracy": best["accuracy"]}
    if config.test_split:
      results["test_accuracy"] = accuracy(best_params, config.test_split)
  log.close()
  ckpt_lib.save_params(workdir, cfg, best_params, palette, step=best["step"],
                       config=ckpt_lib.to_jsonable(config))
  with open(os.path.join(workdir, "finetune_results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
