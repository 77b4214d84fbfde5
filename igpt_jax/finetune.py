"""The classifier's pieces for fine-tuning, as in the paper; the loop is igpt_jax/train.py.

The classifier reads the mean over positions of the ln_f output through a zero-initialised
linear head without bias (`IGPTConfig.n_classes`, `IGPT.classify`). The loss keeps the
generative term: L = gen_weight * L_GEN + L_CLF (1:1 in the paper; gen_weight 0 is L_CLF alone).

BERT models draw fresh masks at eval too; `k_masks` > 1 predicts the modal class over k masks.

  with_classifier(cfg, params, n_classes) -> (cfg, params)   head added, zero
  loss_fn(cfg, gen_weight) -> fn(params, batch, rng)          for steps.make_train_step
  predict(cfg, params, tokens, rng, k_masks) -> [B] classes
  mask_keys(rng, k_masks) -> [k] keys of the masks that vote (the first: rng, the loss's)
  make_eval_step(cfg, k_masks) -> eval(params, batch, rng) -> (correct, count)
"""

from __future__ import annotations

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt_jax import model as model_lib
from igpt_jax import steps as steps_lib


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


def loss_fn(cfg: model_lib.IGPTConfig, gen_weight: float = 1.0) -> Callable:
  """`fn(params, batch, rng) -> (loss, metrics)`: gen_weight * L_GEN + L_CLF (nats).

  L_GEN is the pretraining loss (AR: every position; BERT: the masked positions of each
  example), computed from the same forward pass as the class logits.
  """
  def fn(params, batch, rng):
    tokens, labels = batch["tokens"], batch["labels"]
    chex.assert_rank(tokens, 2)
    logits, class_logits, mask = _classify(cfg, params, tokens, rng)
    gen = jnp.mean(steps_lib.token_losses(logits, tokens, mask))
    clf = optax.softmax_cross_entropy_with_integer_labels(class_logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(class_logits, -1) == labels)
    loss = gen_weight * gen + clf
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
      mask_keys(rng, k_masks))  # [k, B, C]
  return jnp.argmax(votes.sum(0), -1)


def mask_keys(rng: jax.Array, k_masks: int) -> jax.Array:
  """The keys of the k masks a BERT prediction votes over [k]. The first is rng itself: the mask
  an evaluation of the loss with rng draws (steps.example_losses) is the first vote's."""
  return jnp.concatenate([rng[None], jax.random.split(rng, k_masks - 1)])


def make_eval_step(cfg: model_lib.IGPTConfig, k_masks: int = 1) -> Callable:
  """Jitted `eval(params, batch, rng) -> (correct predictions, valid examples)`."""
  @jax.jit
  def step(params, batch, rng):
    correct = predict(cfg, params, batch["tokens"], rng, k_masks) == batch["labels"]
    valid = batch.get("valid", jnp.ones(correct.shape, bool))
    return jnp.sum(correct & valid), jnp.sum(valid)
  return step
