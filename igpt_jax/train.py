"""The training loop, for pretraining and fine-tuning alike (behind launch/train.py, finetune.py).

  train_and_evaluate(config, workdir, evaluators=()) -> the last logged scalars

Every field it reads is defined, with a comment, in experiments/base.py. Two modes:
- pretraining (config.init_workdir empty): a fresh model from config.model, trained on the
  generative loss (steps.loss_fn).
- fine-tuning (config.init_workdir names a run): that run's parameters (config.init_step, or its
  newest readable checkpoint; no optimizer state) plus a zero classifier of config.n_classes,
  trained on gen_weight * L_GEN + L_CLF (finetune.loss_fn). Held-out accuracy (BERT: modal class
  over config.k_masks masks) is evaluated with the eval loss; each evaluation saves a
  checkpoint whose orbax metric is that accuracy, so the best one stays on disk
  (`checkpoint.load(workdir, "best")`); config.patience evaluations without a gain stop the run.

Both modes share everything else: state created (or restored) directly in its sharded layout
on the config's mesh; resume from the workdir's newest readable checkpoint (an unreadable one is
moved to workdir/unreadable_checkpoints/ with a warning) at the exact data position; SIGTERM (or
orbax's multi-host preemption signal) saves at the next step boundary and exits; a non-finite
step stops the run naming the last good checkpoint; so does a failed async save, at the first
step after orbax reports it (`checkpoint.SaveFailed`), and a collective that fails because a
process of the job is gone (`faults.PeerLost`; docs/faults.md); process 0 writes metrics.jsonl
(`step`, `train_loss`, `eval_loss`, `eval_accuracy`, `data_skipped_files`, ...) and TensorBoard
scalars.

Periodic evaluations are `Evaluator(every, fn)`: fn(params, step) -> {name: float}, run every
`every` steps (0: never) and at the last step; its scalars go to metrics.jsonl, TensorBoard and
the console line. The loop builds its own (eval loss; held-out accuracy when fine-tuning) and
runs any passed in after them, e.g. an in-loop linear probe.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import threading
import time
import zlib
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import console
from igpt_jax import data as data_lib
from igpt_jax import faults
from igpt_jax import finetune as finetune_lib
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import probe as probe_lib
from igpt_jax import sample as sample_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib

LN2 = steps_lib.LN2


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A periodic evaluation: fn(params, step) -> {name: float}, every `every` steps (0: never)."""
  every: int
  fn: Callable[[Any, int], dict]


class _Preemption:
  """Records SIGTERM so the loop can checkpoint at the next step boundary and exit."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    # With several processes jax's own SIGTERM notifier (from jax.distributed.initialize) must
    # keep the signal: through it the hosts agree on the step to stop at (reached_preemption).
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def save_samples(path: str, cfg, params, palette, rng, prompts, mesh) -> None:
  """PNG grid: one row of unconditional samples, then half-image completions of `prompts`."""
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


def held_out_accuracy(cfg: model_lib.IGPTConfig, params, batches, mesh, k_masks: int,
                      seed: int) -> float:
  """Top-1 accuracy of the classifier over labelled batches (padding rows excluded)."""
  eval_step = finetune_lib.make_eval_step(cfg, k_masks)
  correct, count = 0, 0
  for i, batch in enumerate(batches):
    c, n = eval_step(params, sharding_lib.shard_batch(batch, mesh),
                     jax.random.fold_in(jax.random.key(seed), i))
    correct, count = correct + int(c), count + int(n)
  return correct / max(count, 1)


def _model(config, workdir: str):
  """-> (cfg, palette, initial params or None for a fresh init): the mode's starting point."""
  if not config.init_workdir:
    cfg = model_lib.model_config(config.model)
    return cfg, data_lib.run_palette(config, workdir, cfg.vocab_size, cfg.n_px), None
  step = config.init_step or None
  meta = ckpt_lib.read_meta(config.init_workdir, step)
  cfg = model_lib.IGPTConfig.from_dict(meta["model"])
  fields = model_lib.set_fields(config.model)
  runtime = {k: v for k, v in fields.items() if k in ckpt_lib.RUNTIME_FIELDS}
  if set(fields) - set(runtime):
    raise ValueError(f"fine-tuning takes the model of {config.init_workdir}; config.model may "
                     f"only set {ckpt_lib.RUNTIME_FIELDS}, got {sorted(fields)}")
  cfg = ckpt_lib.for_this_host(cfg, **runtime).replace(n_classes=config.n_classes)
  palette = palette_lib.check_palette(np.asarray(meta["palette"], np.float32))

  def params(mesh):  # read only for a fresh start, not on resume; sharded over mesh
    _, pretrained, _ = ckpt_lib.load(config.init_workdir, meta["step"], mesh=mesh)
    return finetune_lib.with_classifier(cfg, pretrained, config.n_classes)[1]
  return cfg, palette, params


def _skipped_files() -> dict:
  """{"data_skipped_files": n, summed over hosts} once the input has skipped unreadable files."""
  n = data_lib.skipped_files()
  if jax.process_count() > 1:
    n = int(np.sum(multihost_utils.process_allgather(np.int32(n))))
  return {"data_skipped_files": n} if n else {}


def _datasets(config, cfg, palette, start_step: int):
  """(train iterator from batch start_step, fn() -> fresh eval iterator)."""
  common = dict(palette=palette, n_px=cfg.n_px, seed=config.seed)
  train = data_lib.make_dataset(config.data, split=config.data.train_split,
                                batch_size=config.batch_size, train=True, start_step=start_step,
                                **common)

  def evaluation():
    it = data_lib.make_dataset(config.data, split=config.data.eval_split,
                               batch_size=config.batch_size, train=False, **common)
    return itertools.islice(it, config.eval_batches) if config.eval_batches > 0 else it

  return train, evaluation


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluators: Sequence[Evaluator] = ()) -> dict:
  """Trains (resuming from workdir's newest readable checkpoint); -> the last logged scalars,
  plus `best_step` and `best_eval_accuracy` when fine-tuning."""
  finetuning = bool(config.init_workdir)
  configured, palette, init_params = _model(config, workdir)  # what the checkpoints record
  mesh = sharding_lib.make_mesh(config.mesh, dcn_shape=config.dcn_mesh)
  cfg = steps_lib.for_mesh(configured, mesh)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  if config.batch_size % config.accum_steps:
    raise ValueError(f"batch_size={config.batch_size} does not split into "
                     f"accum_steps={config.accum_steps}")
  tx = steps_lib.make_optimizer(config.lr, config.total_steps, config.warmup_steps,
                                config.grad_clip, config.schedule)
  mngr = ckpt_lib.manager(workdir, keep=config.keep_checkpoints,
                          best_metric=ckpt_lib.BEST_METRIC if finetuning else None)
  writer = metrics_lib.Writer(workdir, active=jax.process_index() == 0)
  tokens_per_step = config.batch_size * cfg.n_ctx
  logging.info("model %s: %.2fM parameters, mesh %s", cfg, model_lib.param_count(cfg) / 1e6,
               dict(mesh.shape))

  pending, synced = [], 0  # (step, metrics) still on device; the last step fetched
  lost_peer = faults.peer_watch(lambda: faults.last_completed(pending, synced),
                                lambda: ckpt_lib.newest_good_step(mngr.directory))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES), _Preemption() as stop, \
      lost_peer, ckpt_lib.storage_watch(mngr):
    shardings = steps_lib.state_shardings(cfg, tx, mesh)
    loop = {"best_step": 0, "best_eval_accuracy": -1.0, "stale": 0}  # early-stopping record
    start = 0
    if mngr.all_steps():
      abstract = steps_lib.abstract_train_state(cfg, tx, mesh)
      params, opt_state, meta = ckpt_lib.restore(
          mngr, abstract.params, abstract.opt_state, cfg,
          set_aside=paths.path(workdir) / "unreadable_checkpoints")
      start = meta["step"]
      if meta["data_position"] != start:
        raise ValueError(f"checkpoint {start} records data position {meta['data_position']}")
      loop.update(meta.get("loop", {}))
      state = steps_lib.TrainState(step=jax.device_put(jnp.int32(start), shardings.step),
                                   params=params, opt_state=opt_state)
      logging.info("resumed from step %d of %s", start, mngr.directory)
    # The input comes before any compile: a bad dataset or split stops the run at once.
    train_iter, eval_iters = _datasets(config, cfg, palette, start)
    if not start:
      state = (steps_lib.state_from_params(init_params(mesh), tx, shardings) if finetuning else
               steps_lib.create_train_state(cfg, tx, mesh, jax.random.key(config.seed)))
    loss = finetune_lib.loss_fn(cfg, config.gen_weight) if finetuning else steps_lib.loss_fn(cfg)
    train_step = console.first_call(
        steps_lib.make_train_step(loss, tx, shardings, accum_steps=config.accum_steps,
                                  seed=config.seed), "compiling the train step")
    eval_step = steps_lib.make_eval_step(cfg)
    batch_keys = ("tokens", "labels") if finetuning else ("tokens",)
    prompts = None  # first held-out images, for the completion rows of the sample grids

    def eval_loss(params, step):
      del step
      total, count = 0.0, 0.0
      for i, batch in enumerate(eval_iters()):
        s, c = eval_step(params, sharding_lib.shard_batch(batch, mesh),
                         jax.random.fold_in(jax.random.key(config.seed + 1), i))
        total, count = total + float(s), count + float(c)
      return {"eval_loss": total / max(count, 1.0),
              "eval_bits_per_token": total / max(count, 1.0) / LN2}

    def eval_accuracy(params, step):
      del step
      return {ckpt_lib.BEST_METRIC: held_out_accuracy(cfg, params, eval_iters(), mesh,
                                                      config.k_masks, config.seed + 1)}

    probe = None if finetuning else probe_lib.make_evaluator(config.evals.probe, config, cfg,
                                                             palette, mesh)
    evaluators = [Evaluator(config.eval_every, eval_loss),
                  *([Evaluator(config.eval_every, eval_accuracy)] if finetuning else []),
                  *([Evaluator(config.evals.probe.every, probe)] if probe else []), *evaluators]

    def due_at(every: int, step: int) -> bool:
      return step == config.total_steps or (every > 0 and step % every == 0)

    window, synced = [], start  # metrics fetched since the last log line
    last = {}
    t_log, step_log = time.perf_counter(), start
    for step in range(start + 1, config.total_steps + 1):
      batch = next(train_iter)
      if step == start + 1:  # hosts that read the same rows would each train on a copy
        logging.info("process %d of %d: batch %d has %d rows here, crc32 %08x",
                     jax.process_index(), jax.process_count(), step, len(batch["tokens"]),
                     zlib.crc32(batch["tokens"].tobytes()))
      state, metrics = train_step(state, sharding_lib.shard_batch(
          {k: batch[k] for k in batch_keys}, mesh))
      pending.append((step, metrics))
      ckpt_lib.check_saves(mngr)  # a failed async save stops the run here, not steps later
      due = {name: due_at(config[f"{name}_every"], step)
             for name in ("log", "checkpoint", "sample")}
      due["eval"] = [e for e in evaluators if due_at(e.every, step)]
      if jax.process_count() == 1:
        due["preempted"] = stop.event.is_set()
      else:  # every host must stop at the same step
        due["preempted"] = mngr.reached_preemption(step)
      if not any(due.values()):
        continue

      # Host sync: every step must be finite before anything is logged or saved.
      for s, m in jax.device_get(pending):
        if not (np.isfinite(m["loss"]) and np.isfinite(m["update_norm"])):
          ckpt_lib.check_saves(mngr, wait=True)
          raise FloatingPointError(
              f"non-finite training step at step {s} (loss {m['loss']}, update norm "
              f"{m['update_norm']}); the last good checkpoint is step {mngr.latest_step()} "
              f"in {mngr.directory}")
        window.append(m)
      pending, synced = [], step
      scalars = {}
      if due["log"] or due["preempted"]:
        steps_per_s = (step - step_log) / (time.perf_counter() - t_log)
        scalars = {f"train_{k}": float(np.mean([m[k] for m in window])) for k in window[0]
                   if k not in ("grad_norm", "update_norm")}
        scalars.update(grad_norm=float(window[-1]["grad_norm"]), steps_per_s=steps_per_s,
                       tokens_per_s=steps_per_s * tokens_per_step, **_skipped_files())
        window = []
      for evaluator in due["eval"]:
        with console.status(f"{evaluator.fn.__name__} at step {step}"):
          scalars.update(evaluator.fn(state.params, step))
      accuracy = scalars.get(ckpt_lib.BEST_METRIC)
      if accuracy is not None:
        if accuracy > loop["best_eval_accuracy"]:
          loop.update(best_step=step, best_eval_accuracy=accuracy, stale=0)
        else:
          loop["stale"] += 1
      if scalars:
        writer.write(step, scalars)
        last = scalars
      if "train_loss" in scalars:
        eta = (config.total_steps - step) / max(scalars["steps_per_s"], 1e-9)
        evals = "".join(f"  {k} {v:.4f}" for k, v in scalars.items() if k.startswith("eval_")
                        and not k.endswith("bits_per_token"))
        logging.info("step %d/%d  loss %.4f%s  %.2f steps/s  %.0f tokens/s  ETA %s", step,
                     config.total_steps, scalars["train_loss"], evals, scalars["steps_per_s"],
                     scalars["tokens_per_s"], time.strftime("%H:%M:%S", time.gmtime(eta)))
      if due["sample"]:
        if prompts is None:
          prompts = np.asarray(next(iter(eval_iters()))["tokens"][:4])
        with console.status(f"drawing samples at step {step}"):
          save_samples(paths.path(workdir) / f"samples_{step:07d}.png", cfg, state.params,
                       palette, jax.random.fold_in(jax.random.key(config.seed + 2), step),
                       prompts, mesh)
      early_stop = accuracy is not None and 0 < config.patience <= loop["stale"]
      if due["checkpoint"] or due["preempted"] or accuracy is not None:
        meta = ckpt_lib.make_meta(configured, palette, step, ckpt_lib.to_jsonable(config), loop)
        ckpt_lib.save(mngr, step, state.params, state.opt_state, meta, force=True,
                      metrics=None if accuracy is None else {ckpt_lib.BEST_METRIC: accuracy})
      if due["preempted"]:
        ckpt_lib.check_saves(mngr, wait=True, preempted=True)
        logging.warning("preempted: saved step %d, exiting", step)
        break
      if early_stop:
        logging.info("early stop at step %d: no held-out gain since step %d", step,
                     loop["best_step"])
        break
      if "train_loss" in scalars:  # evals, samples and saves stay out of the step rate
        t_log, step_log = time.perf_counter(), step

  ckpt_lib.check_saves(mngr, wait=True)
  mngr.close()
  if probe and jax.process_index() == 0:
    probe_lib.write_probe_vs_loss(workdir)
  if finetuning:
    last = {**last, "best_step": loop["best_step"],
            "best_eval_accuracy": loop["best_eval_accuracy"]}
  return last
