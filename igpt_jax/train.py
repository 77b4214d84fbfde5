"""Pretraining: optimizer, losses, the sharded train/eval steps and the training loop.

Reusable pieces (fine-tuning and the benchmarks build on them):
  make_optimizer(lr, total_steps, warmup_steps=0, grad_clip=0.0, schedule="cosine")
  model_config(config.model) -> IGPTConfig
  TrainState(step, params, opt_state)
  state_shardings(cfg, tx, mesh) / create_train_state(cfg, tx, mesh, rng)
  example_losses(cfg, params, tokens, rng) -> [B] nats/token;  loss_fn(cfg) -> fn(params, batch, rng)
  make_train_step(loss_fn, tx, shardings, accum_steps=1, seed=0) -> step(state, batch)
  make_eval_step(cfg) -> eval(params, batch, rng) -> (sum of losses, number of examples)
  train_and_evaluate(config, workdir) - the loop behind launch/train.py

Losses are in nats per token; bits per token = nats / ln 2.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import sharding as sharding_lib

LN2 = math.log(2.0)


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
                   schedule: str = "cosine") -> optax.GradientTransformation:
  """The paper's Adam (b1 .9, b2 .95: .999 spiked; no weight decay) on `make_schedule`.

  grad_clip > 0 clips the global gradient norm first.
  """
  adam = optax.adam(make_schedule(lr, total_steps, warmup_steps, schedule), b1=0.9, b2=0.95)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam


def model_config(model: ml_collections.ConfigDict | dict) -> model_lib.IGPTConfig:
  """`config.model` -> IGPTConfig: `preset` (igpt_s|m|l|xl) plus overrides, or all fields."""
  fields = dict(model)
  name = fields.pop("preset", None)
  return model_lib.preset(name, **fields) if name else model_lib.IGPTConfig.from_dict(fields)


# -- state ------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken = batches consumed
  params: Any
  opt_state: Any


def state_shardings(cfg: model_lib.IGPTConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> TrainState:
  """NamedShardings of the train state: Adam's moments are laid out like their parameters."""
  params = sharding_lib.param_shardings(cfg, mesh)
  abstract = jax.eval_shape(lambda: tx.init(model_lib.init_params(cfg, jax.random.key(0))))
  opt_state = optax.tree_map_params(
      tx, lambda _, s: s, abstract, params,
      transform_non_params=lambda _: sharding_lib.replicated(mesh))
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


# -- losses and steps -------------------------------------------------------------------------

def token_losses(logits: jax.Array, tokens: jax.Array, bert_mask: jax.Array | None = None):
  """Mean cross-entropy per example [B] in nats/token, from logits [B, T, V] of tokens [B, T].

  Without a mask (AR) over all T positions; with a BERT mask [B, T] over the masked positions
  only (an example with no masked token counts 0).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, T]
  if bert_mask is None:
    return ce.mean(axis=-1)
  return jnp.sum(ce * bert_mask, axis=-1) / jnp.maximum(jnp.sum(bert_mask, axis=-1), 1)


def example_losses(cfg: model_lib.IGPTConfig, params, tokens: jax.Array,
                   rng: jax.Array) -> jax.Array:
  """The pretraining loss per example [B] (nats/token); BERT draws a fresh 15% mask from rng."""
  chex.assert_rank(tokens, 2)
  mask = model_lib.draw_bert_mask(rng, tokens.shape) if cfg.objective == "bert" else None
  logits = model_lib.IGPT(cfg).apply({"params": params}, tokens, bert_mask=mask)  # [B, T, V]
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
  in memory) before a single optimizer update.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def gradients(params, batch, rng):
    if accum_steps == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
      return grads, metrics

    def add(acc, xs):
      i, micro = xs
      (_, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, acc, (grads, metrics)), None

    micro = _microbatches(batch, accum_steps)
    (_, metrics), grads = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro),
                                         rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads, metrics))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(accum_steps), micro))
    return jax.tree.map(lambda x: x / accum_steps, total)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    grads, metrics = gradients(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The update's norm shows a non-finite step before the next loss does (checkpoints hold
    # the parameters after the update).
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))


def make_eval_step(cfg: model_lib.IGPTConfig) -> Callable:
  """Jitted `eval(params, batch, rng) -> (sum of per-example losses, valid examples)`.

  Padded rows (batch["valid"] False) count for nothing.
  """
  @jax.jit
  def step(params, batch, rng):
    losses = example_losses(cfg, params, batch["tokens"], rng)
    valid = batch.get("valid", jnp.ones(losses.shape, bool)).astype(jnp.float32)
    return jnp.sum(losses * valid), jnp.sum(valid)
  return step


# -- the loop ---------------------------------------------------------------------------------

def _datasets(config, cfg, palette, start_step: int):
  """(train iterator from batch start_step, fn() -> fresh eval iterator)."""
  from igpt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  common = dict(palette=palette, n_px=cfg.n_px, seed=config.seed)
  train = data_lib.make_dataset(config.data, split=config.data.train_split,
                                batch_size=config.batch_size, train=True, start_step=start_step,
                                **common)

  def evaluation():
    it = data_lib.make_dataset(config.data, split=config.data.eval_split,
                               batch_size=config.batch_size, train=False, **common)
    return itertools.islice(it, config.eval_batches) if config.eval_batches > 0 else it

  return train, evaluation


def load_run_palette(config, workdir: str) -> np.ndarray:
  """The palette named by config.palette, else the one fitted into workdir/palette.npy."""
  path = config.palette or os.path.join(workdir, "palette.npy")
  if not os.path.exists(path):
    raise FileNotFoundError(f"palette file {path} not found (launch/train.py fits one into the "
                            "workdir when config.palette is empty)")
  return palette_lib.load_palette(path, k=model_config(config.model).vocab_size)


class _Preemption:
  """Records SIGTERM so the loop can checkpoint at the next step boundary and exit."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Writer:
  """metrics.jsonl + TensorBoard scalars, written by process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(workdir)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    self.tb.flush()

  def close(self):
    if self.active:
      self.tb.close()
      self.jsonl.close()


def save_samples(path: str, cfg, params, palette, rng, prompts, mesh) -> None:
  """PNG grid: one row of unconditional samples, then half-image completions of `prompts`."""
  from igpt_jax import sample as sample_lib  # pylint: disable=import-outside-toplevel
  n = sharding_lib.batch_shards(mesh)
  uncond = sample_lib.sample(cfg, params, rng, batch_size=max(8, n), mesh=mesh)
  prefix = sample_lib.prefix_length(cfg, fraction=0.5)
  done = sample_lib.complete(cfg, params, jax.random.fold_in(rng, 1), prompts, prefix,
                             samples=max(2, n), mesh=mesh)
  uncond, done = multihost_utils.process_allgather((uncond, done), tiled=True)
  if jax.process_index() == 0:
    rows = [palette_lib.dequantize(np.asarray(uncond), palette, cfg.n_px)]
    rows += sample_lib.completion_rows(prompts, np.asarray(done), prefix, palette, cfg.n_px)
    sample_lib.save_grid(path, rows, scale=4)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and returns the last logged metrics."""
  cfg = model_config(config.model)
  palette = load_run_palette(config, workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  if config.batch_size % config.accum_steps:
    raise ValueError(f"batch_size={config.batch_size} does not split into "
                     f"accum_steps={config.accum_steps}")
  tx = make_optimizer(config.lr, config.total_steps, config.warmup_steps, config.grad_clip)
  mngr = ckpt_lib.manager(workdir, keep=config.keep_checkpoints)
  writer = _Writer(workdir)
  tokens_per_step = config.batch_size * cfg.n_ctx
  logging.info("model %s: %.2fM parameters, mesh %s", cfg, model_lib.param_count(cfg) / 1e6,
               dict(mesh.shape))

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES), _Preemption() as stop:
    # The input comes first: a bad dataset or split stops the run before any compile.
    start = mngr.latest_step() or 0
    train_iter, eval_iters = _datasets(config, cfg, palette, start)
    shardings = state_shardings(cfg, tx, mesh)
    if start:
      abstract = abstract_train_state(cfg, tx, mesh)
      params, opt_state, meta = ckpt_lib.restore(mngr, abstract.params, abstract.opt_state, cfg)
      if meta["data_position"] != start:
        raise ValueError(f"checkpoint {start} records data position {meta['data_position']}")
      state = TrainState(step=jax.device_put(jnp.int32(start), shardings.step), params=params,
                         opt_state=opt_state)
      logging.info("resumed from step %d of %s", meta["step"], mngr.directory)
    else:
      state = create_train_state(cfg, tx, mesh, jax.random.key(config.seed))
    train_step = make_train_step(loss_fn(cfg), tx, shardings, accum_steps=config.accum_steps,
                                 seed=config.seed)
    eval_step = make_eval_step(cfg)
    prompts = None  # first held-out images, for the completion rows of the sample grids

    def evaluate(params):
      total, count = 0.0, 0.0
      for i, batch in enumerate(eval_iters()):
        s, c = eval_step(params, sharding_lib.shard_batch(batch, mesh),
                         jax.random.fold_in(jax.random.key(config.seed + 1), i))
        total, count = total + float(s), count + float(c)
      return total / max(count, 1.0)

    pending, window = [], []  # metrics still on device; fetched ones since the last log line
    last = {}
    t_log, step_log = time.perf_counter(), start
    for step in range(start + 1, config.total_steps + 1):
      batch = next(train_iter)
      state, metrics = train_step(state, sharding_lib.shard_batch({"tokens": batch["tokens"]},
                                                                  mesh))
      pending.append((step, metrics))
      due = {name: step == config.total_steps or (config[f"{name}_every"] > 0 and
                                                  step % config[f"{name}_every"] == 0)
             for name in ("log", "eval", "checkpoint", "sample")}
      if jax.process_count() == 1:
        due["preempted"] = stop.event.is_set()
      else:  # every host must stop at the same step
        due["preempted"] = mngr.reached_preemption(step)
      if not any(due.values()):
        continue

      # Host sync: every step must be finite before anything is logged or saved.
      for s, m in jax.device_get(pending):
        if not (np.isfinite(m["loss"]) and np.isfinite(m["update_norm"])):
          mngr.wait_until_finished()
          raise FloatingPointError(
              f"non-finite training step at step {s} (loss {m['loss']}, update norm "
              f"{m['update_norm']}); the last good checkpoint is step {mngr.latest_step()} "
              f"in {mngr.directory}")
        window.append(m)
      pending = []
      scalars = {}
      if due["log"] or due["preempted"]:
        steps_per_s = (step - step_log) / (time.perf_counter() - t_log)
        loss = float(np.mean([m["loss"] for m in window]))
        scalars = {"train_loss": loss, "train_bits_per_token": loss / LN2,
                   "grad_norm": float(window[-1]["grad_norm"]), "steps_per_s": steps_per_s,
                   "tokens_per_s": steps_per_s * tokens_per_step}
        window = []
      if due["eval"]:
        scalars["eval_loss"] = evaluate(state.params)
        scalars["eval_bits_per_token"] = scalars["eval_loss"] / LN2
      if scalars:
        writer.write(step, scalars)
        last = scalars
      if "train_loss" in scalars:
        eta = (config.total_steps - step) / max(scalars["steps_per_s"], 1e-9)
        logging.info("step %d/%d  loss %.4f (%.3f bits/token)%s  %.2f steps/s  %.0f tokens/s  "
                     "ETA %s", step, config.total_steps, scalars["train_loss"],
                     scalars["train_bits_per_token"],
                     f"  eval {scalars['eval_loss']:.4f}" if "eval_loss" in scalars else "",
                     scalars["steps_per_s"], scalars["tokens_per_s"],
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
      if due["sample"]:
        if prompts is None:
          prompts = np.asarray(next(iter(eval_iters()))["tokens"][:4])
        save_samples(os.path.join(workdir, f"samples_{step:07d}.png"), cfg, state.params, palette,
                     jax.random.fold_in(jax.random.key(config.seed + 2), step), prompts, mesh)
      if due["checkpoint"] or due["preempted"]:
        meta = ckpt_lib.make_meta(cfg, palette, step, ckpt_lib.to_jsonable(config))
        ckpt_lib.save(mngr, step, state.params, state.opt_state, meta, force=True)
      if due["preempted"]:
        logging.warning("preempted: saved step %d, exiting", step)
        break
      if "train_loss" in scalars:  # eval, samples and saves stay out of the step rate
        t_log, step_log = time.perf_counter(), step

  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  return last
