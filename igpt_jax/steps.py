"""The step library: optimizer, train state, losses and the jitted sharded train/eval steps.

No loop, no I/O: igpt_jax/train.py (the loop), igpt_jax/finetune.py (classifier losses) and the
benchmarks build on these.
  for_mesh(cfg, mesh) -> cfg with "auto" attention resolved for the mesh's devices
  param_shardings(cfg, mesh) -> the NamedSharding of every parameter
  make_optimizer(lr, total_steps, warmup_steps=0, grad_clip=0.0, schedule="cosine", dtype=...)
  dynamic_loss_scale(tx) -> tx with float16's loss scale in its state (make_optimizer's)
  TrainState(step, params, opt_state)
  state_shardings(cfg, tx, mesh) / create_train_state(cfg, tx, mesh, rng)
  state_from_params(params, tx, shardings) -> TrainState at step 0 (fine-tuning starts here)
  example_losses(cfg, params, tokens, rng) -> [B] nats/token
  loss_fn(cfg) -> fn(params, batch, rng) -> (loss, metrics)
  make_train_step(loss_fn, tx, shardings, accum_steps=1, seed=0) -> step(state, batch)
  make_eval_step(cfg) -> eval(params, batch, rng) -> {loss, examples, position_loss, ...}

Losses are in nats per token; bits per token = nats / ln 2.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import optax

from igpt_jax import attention as attention_lib
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib

LN2 = math.log(2.0)


def for_mesh(cfg: model_lib.IGPTConfig, mesh: jax.sharding.Mesh) -> model_lib.IGPTConfig:
  """cfg with "auto" attention resolved for the devices of mesh.

  The mesh's devices decide, not the host's default backend: a plan compiles for a TPU or a
  V100 on a CPU.
  """
  return cfg.replace(attention=attention_lib.resolve(cfg.attention, cfg.dtype,
                                                     mesh.devices.flat[0], seq_len=cfg.n_ctx,
                                                     head_dim=cfg.head_dim))


def param_shardings(cfg: model_lib.IGPTConfig, mesh: jax.sharding.Mesh):
  """NamedSharding of every parameter of the model (same tree as `init_params`)."""
  return sharding_lib.logical_shardings(model_lib.abstract_params(cfg), mesh)


# -- optimizer --------------------------------------------------------------------------------

def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "cosine") -> optax.Schedule:
  """Linear warm-up from 0 to lr over warmup_steps, then cosine to 0 at total_steps or constant."""
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps,
                                              max(total_steps, warmup_steps + 1), 0.0)
  if schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps),
                                 optax.constant_schedule(lr)], [warmup_steps])
  raise ValueError(f"schedule={schedule!r}; expected 'cosine' or 'constant'")


def make_optimizer(lr: float, total_steps: int, warmup_steps: int = 0, grad_clip: float = 0.0,
                   schedule: str = "cosine", *,
                   dtype: str = "float32") -> optax.GradientTransformation:
  """The paper's Adam (b1 .9, b2 .95: .999 spiked; no weight decay) on `make_schedule`.

  grad_clip > 0 clips the global gradient norm first. dtype: the model's compute dtype;
  "float16" adds the dynamic loss scale its backward pass needs (`dynamic_loss_scale`).
  """
  adam = optax.adam(make_schedule(lr, total_steps, warmup_steps, schedule), b1=0.9, b2=0.95)
  tx = optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam
  return dynamic_loss_scale(tx) if dtype == "float16" else tx


class LossScaleState(NamedTuple):
  """float16's dynamic loss scale around the optimizer's own state (`dynamic_loss_scale`)."""
  scale: jax.Array  # float32 scalar: the train step multiplies the loss by it
  good_steps: jax.Array  # int32 scalar: finite steps in a row since the scale last changed
  inner: Any


def dynamic_loss_scale(inner: optax.GradientTransformation, init_scale: float = 2.0 ** 15,
                       period: int = 2000) -> optax.GradientTransformation:
  """inner, for a model computing in float16: the loss scale lives in the optimizer state, so
  a checkpoint keeps it and a resumed run goes on exactly.

  float16 has 5 exponent bits: the backward pass's small cotangents (a logit's is about
  1 / (B T V)) fall below its smallest normal number, 6e-5, and lose their digits or vanish
  (measured: gradients 6% off float32's, where bfloat16's are 1% off). The train step
  (`make_train_step`) multiplies the loss by the scale before the backward pass and divides
  the gradients by it, in the parameters' dtype, after. Here a step whose gradients are not all
  finite (the scaled backward overflowed) changes nothing -- no update, inner state kept --
  and halves the scale; `period` finite steps in a row double it.
  """
  def init(params):
    return LossScaleState(jnp.float32(init_scale), jnp.int32(0), inner.init(params))

  def update(grads, state: LossScaleState, params=None):
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, inner_state = inner.update(grads, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, 0).astype(u.dtype), updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state,
                               state.inner)
    grow = finite & (state.good_steps + 1 >= period)
    scale = jnp.where(finite, jnp.where(grow, state.scale * 2, state.scale),
                      jnp.maximum(state.scale / 2, 1.0))
    good_steps = jnp.where(finite & ~grow, state.good_steps + 1, 0)
    return updates, LossScaleState(scale, good_steps.astype(jnp.int32), inner_state)

  return optax.GradientTransformation(init, update)


# -- state ------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken = batches consumed
  params: Any
  opt_state: Any


def state_shardings(cfg: model_lib.IGPTConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> TrainState:
  """NamedShardings of the train state: Adam's moments are laid out like their parameters.

  Shapes only, nothing runs: this also serves a mesh of compile-only devices (launch/plan.py),
  where any eager op (optax.tree_map_params's placeholder init, a random key) would fail.
  """
  params = param_shardings(cfg, mesh)
  treedef = jax.tree.structure(params)
  like_params = lambda x: jax.tree.structure(x) == treedef  # a moment, or an update of params
  abstract = jax.eval_shape(lambda: tx.init(model_lib.init_params(cfg, jax.random.key(0))))
  opt_state = jax.tree.map(lambda x: params if like_params(x) else sharding_lib.replicated(mesh),
                           abstract, is_leaf=like_params)
  return TrainState(step=sharding_lib.replicated(mesh), params=params, opt_state=opt_state)


def abstract_train_state(cfg, tx, mesh) -> TrainState:
  """ShapeDtypeStructs with shardings: the target that checkpoints restore into."""
  shapes = jax.eval_shape(lambda: _init_state(cfg, tx, jax.random.key(0)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, state_shardings(cfg, tx, mesh))


def _init_state(cfg, tx, rng) -> TrainState:
  params = model_lib.init_params(cfg, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def create_train_state(cfg: model_lib.IGPTConfig, tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, rng: jax.Array) -> TrainState:
  """A fresh state created directly in its sharded layout (no full copy on one device)."""
  init = jax.jit(functools.partial(_init_state, cfg, tx),
                 out_shardings=state_shardings(cfg, tx, mesh))
  return init(rng)


def state_from_params(params, tx: optax.GradientTransformation,
                      shardings: TrainState) -> TrainState:
  """Step 0 of a run that starts from given parameters: placed as `shardings`, fresh Adam."""
  params = jax.device_put(params, shardings.params)
  return TrainState(step=jax.device_put(jnp.int32(0), shardings.step), params=params,
                    opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))


# -- losses and steps -------------------------------------------------------------------------

def token_losses(logits: jax.Array, tokens: jax.Array, bert_mask: jax.Array | None = None):
  """Mean cross-entropy per example [B] in nats/token, from logits [B, T, V] of tokens [B, T].

  Without a mask (AR) over all T positions; with a BERT mask [B, T] over the masked positions
  only (an example with no masked token counts 0).
  """
  # float32 logits (the model's head returns them so): the log-sum-exp over 512 colours and the
  # mean over T tokens are where bf16 rounding would show in the loss.
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, T]
  if bert_mask is None:
    return ce.mean(axis=-1)
  return jnp.sum(ce * bert_mask, axis=-1) / jnp.maximum(jnp.sum(bert_mask, axis=-1), 1)


def _logits(cfg: model_lib.IGPTConfig, params, tokens: jax.Array, rng: jax.Array):
  """-> (logits [B, T, V], the BERT mask [B, T] drawn from rng, or None for AR)."""
  chex.assert_rank(tokens, 2)
  mask = model_lib.draw_bert_mask(rng, tokens.shape) if cfg.objective == "bert" else None
  return model_lib.IGPT(cfg).apply({"params": params}, tokens, bert_mask=mask), mask


def example_losses(cfg: model_lib.IGPTConfig, params, tokens: jax.Array,
                   rng: jax.Array) -> jax.Array:
  """The pretraining loss per example [B] (nats/token); BERT draws a fresh 15% mask from rng."""
  logits, mask = _logits(cfg, params, tokens, rng)
  return token_losses(logits, tokens, mask)


def loss_fn(cfg: model_lib.IGPTConfig) -> Callable:
  """The pretraining loss as `fn(params, batch, rng) -> (loss, metrics)` for make_train_step."""
  def fn(params, batch, rng):
    loss = jnp.mean(example_losses(cfg, params, batch["tokens"], rng))
    return loss, {"loss": loss, "bits_per_token": loss / LN2}
  return fn


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, ...: each device keeps its rows."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into accum_steps={n} microbatches")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss: Callable, tx: optax.GradientTransformation, shardings: TrainState, *,
                    accum_steps: int = 1, seed: int = 0) -> Callable:
  """Jitted `step(state, batch) -> (state, metrics)`; the state argument is donated.

  loss(params, batch, rng) -> (scalar, dict of scalars). The rng of step s is
  fold_in(key(seed), s), so a resumed run draws the same masks as an uninterrupted one.
  accum_steps > 1 averages the gradients of that many microbatches (lax.scan: one at a time
  in memory) before a single optimizer update. A tx of `dynamic_loss_scale` (float16) has
  the loss scaled by the scale in its state, and the step's metrics report it (`loss_scale`).
  """
  def scaled(params, batch, rng, scale):
    value, metrics = loss(params, batch, rng)
    return value * scale, metrics

  grad_fn = jax.value_and_grad(scaled, has_aux=True)

  def gradients(params, batch, rng, scale):
    """Gradients of loss * scale, divided by scale (1.0 unless float16's loss scale)."""
    unscale = lambda grads: jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
    if accum_steps == 1:
      (_, metrics), grads = grad_fn(params, batch, rng, scale)
      return unscale(grads), metrics

    def add(acc, xs):
      i, micro = xs
      (_, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, i), scale)
      return jax.tree.map(jnp.add, acc, (grads, metrics)), None

    micro = _microbatches(batch, accum_steps)
    (_, metrics), grads = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro),
                                         rng, scale)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads, metrics))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(accum_steps), micro))
    grads, metrics = jax.tree.map(lambda x: x / accum_steps, total)
    return unscale(grads), metrics

  def train_step(state: TrainState, batch):  # the program's name in traces: jit_train_step
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    loss_scale = isinstance(state.opt_state, LossScaleState)
    grads, metrics = gradients(state.params, batch, rng,
                               state.opt_state.scale if loss_scale else 1.0)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The update's norm shows a non-finite step before the next loss does (checkpoints hold
    # the parameters after the update). A float16 step skipped for an overflow has a zero
    # update and an infinite gradient norm.
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates)}
    if loss_scale:
      metrics["loss_scale"] = state.opt_state.scale
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, None))


def make_eval_step(cfg: model_lib.IGPTConfig) -> Callable:
  """Jitted `eval(params, batch, rng) -> sums`: `loss` (of the per-example losses), `examples`,
  and by position (raster order) `position_loss` [T] (summed token losses) and `position_count`
  [T] (the tokens counted: every valid example's under AR, the masked ones under BERT).

  Padded rows (batch["valid"] False) count for nothing.
  """
  @jax.jit
  def eval_step(params, batch, rng):
    tokens = batch["tokens"]
    logits, mask = _logits(cfg, params, tokens, rng)
    losses = token_losses(logits, tokens, mask)  # [B]
    valid = batch.get("valid", jnp.ones(losses.shape, bool)).astype(jnp.float32)
    weights = valid[:, None] * (jnp.ones(tokens.shape) if mask is None else mask)  # [B, T]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, T]
    return {"loss": jnp.sum(losses * valid), "examples": jnp.sum(valid),
            "position_loss": jnp.sum(ce * weights, axis=0),
            "position_count": jnp.sum(weights, axis=0)}
  return eval_step
