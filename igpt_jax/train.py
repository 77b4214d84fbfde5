"""The training loop, for pretraining and fine-tuning alike (behind launch/train.py, finetune.py).

  train_and_evaluate(config, workdir, started) -> the last logged scalars
  run(config, workdir)   what launch/train.py and launch/finetune.py run: console, compilation
                         cache, devices, job, the loop

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
on the config's mesh; resume from the workdir's newest checkpoint that every process reads (an
unreadable one is moved to workdir/unreadable_checkpoints/ with a warning) at the exact data
position, refused when the data stream would change (`_check_stream`); SIGTERM (or
orbax's multi-host preemption signal) saves at the next step boundary and exits; a non-finite
step stops the run naming the last good checkpoint; so does a failed async save, at the first
step after orbax reports it (`checkpoint.SaveFailed`), and a collective that fails because a
process of the job is gone (`faults.PeerLost`; docs/faults.md); process 0 writes metrics.jsonl
(`step`, `train_loss`, `eval_loss`, `eval_accuracy`, `data_skipped_files`, ...) and TensorBoard
scalars.

Periodic evaluations come from `evaluators.build` (held-out loss and accuracy, the loss by
pixel, sample grids, config.evals): each one's scalars go to metrics.jsonl, TensorBoard and the
console line. Every periodic action, training's own (log, checkpoint) and the evaluators', is
due by one rule (`due`). A row is written at every log and evaluation step, with the split of
the time since the previous row by category (igpt_jax/goodput.py: input, step, host, compile,
eval, checkpoint, ...), the step times, steps/s, tokens/s, TFLOP/s per device and MFU over the
training part of it (input, step, host), and the job's goodput; process 0 also appends it to
workdir/goodput.jsonl. A watchdog ends a run whose steps stop completing (faults.watchdog,
config.watchdog); config.profile traces chosen steps (igpt_jax/profiler.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import socket
import threading
import time
from typing import Callable
import zlib

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import chips
from igpt_jax import console
from igpt_jax import data as data_lib
from igpt_jax import evaluators as evaluators_lib
from igpt_jax import faults
from igpt_jax import finetune as finetune_lib
from igpt_jax import fit_palette as fit_palette_lib
from igpt_jax import goodput as goodput_lib
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import profiler as profiler_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib


def due(step: int, every: int, last_step: int) -> bool:
  """Whether a periodic action runs at step: every `every` steps, and always at the last."""
  return step == last_step or (every > 0 and step % every == 0)


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


@dataclasses.dataclass
class EarlyStopping:
  """Fine-tuning's record of the best held-out accuracy (checkpoints carry it as meta["loop"])."""
  best_step: int = 0
  best_eval_accuracy: float = -1.0
  stale: int = 0  # evaluations since the best one

  def update(self, step: int, accuracy: float) -> None:
    if accuracy > self.best_eval_accuracy:
      self.best_step, self.best_eval_accuracy, self.stale = step, accuracy, 0
    else:
      self.stale += 1

  def stop(self, patience: int) -> bool:
    return 0 < patience <= self.stale


@dataclasses.dataclass
class _Pending:
  """Steps dispatched but not yet fetched, (step, metrics on device); the last fetched step; the
  metrics fetched since the last log line."""
  steps: list = dataclasses.field(default_factory=list)
  synced: int = 0
  window: list = dataclasses.field(default_factory=list)

  def last_completed(self) -> int:
    return faults.last_completed(self.steps, self.synced)

  def fetch(self, mngr) -> None:
    """The host sync: every pending step must be finite before anything is logged or saved."""
    for s, m in jax.device_get(self.steps):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["update_norm"])):
        ckpt_lib.check_saves(mngr, wait=True)
        raise FloatingPointError(
            f"non-finite training step at step {s} (loss {m['loss']}, update norm "
            f"{m['update_norm']}); the last good checkpoint is step {mngr.latest_step()} "
            f"in {mngr.directory}")
      self.window.append(m)
      self.synced = s
    self.steps = []

  def drain(self) -> list[dict]:
    window, self.window = self.window, []
    return window


class _Timing:
  """A run's time, as the metrics rows show it: each row's split of the interval since the
  previous row (goodput.Ledger), its step times (goodput.StepWatch), the rates and MFU over
  its training time, and the job's goodput so far; this process's goodput.jsonl record."""

  def __init__(self, config, cfg, mesh, workdir: str, ledger, watch, start: int):
    self.ledger, self.watch, self.step = ledger, watch, start
    self.tokens_per_step = config.batch_size * cfg.n_ctx
    self.flops_per_step = model_lib.flops_per_token(cfg) * self.tokens_per_step
    self.devices = mesh.size
    self.peak, where = chips.peak_flops(config.peak_flops, mesh.devices.flat[0], cfg.dtype)
    logging.info("%.3g TFLOP per step (model.flops_per_token); %s", self.flops_per_step / 1e12,
                 f"no MFU: {where}" if self.peak is None else
                 f"MFU against {self.peak / 1e12:.4g} TFLOP/s per device ({where})")
    self.record = goodput_lib.Record(workdir, active=jax.process_index() == 0)
    started = time.time() - ledger.elapsed()
    self.job_started, self.earlier = goodput_lib.job_so_far(goodput_lib.load(workdir), started,
                                                            start)
    self.record.write("start", started=started, step=start, host=socket.gethostname(),
                      pid=os.getpid(), processes=jax.process_count())
    self.first_step_s = None

  def row(self, step: int) -> dict:
    """The timing scalars of the row at step (its steps' results are fetched)."""
    parts = self.ledger.interval()
    times = self.watch.take(step)
    training = sum(parts[c] for c in goodput_lib.TRAINING)
    steps_per_s = (step - self.step) / max(training, 1e-9)
    flops_per_s = steps_per_s * self.flops_per_step / self.devices
    out = {"steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * self.tokens_per_step,
           "tflops_per_device": flops_per_s / 1e12,
           **({"mfu": flops_per_s / self.peak} if self.peak else {}),
           **{f"time_{c}_s": v for c, v in parts.items()},
           "goodput": ((self.earlier + self.ledger.totals["step"]) /
                       max(time.time() - self.job_started, 1e-9))}
    if times:
      seconds = [t for _, t in times]
      out.update(step_time_median_s=float(np.median(seconds)), step_time_max_s=max(seconds))
    first = {}
    if self.first_step_s is None and self.watch.first_done is not None:
      self.first_step_s = first["first_step_s"] = self.ledger.elapsed(self.watch.first_done)
      logging.info("first train step done %.1f s after the process started",
                   self.first_step_s)
    self.record.write("row", step=step, parts=parts, **first,
                      step_times=[[s, float(f"{t:.4g}")] for s, t in times])
    self.step = step
    return out

  def end(self, step: int) -> None:
    """After the last save: the rest of the time, and this process's whole account."""
    self.record.write("end", step=step, parts=self.ledger.interval())
    totals, wall = self.ledger.totals, self.ledger.elapsed()
    logging.info("this process: %.1f s, %s", wall, _shares(totals, wall))


def _shares(parts: dict, wall: float) -> str:
  """'step 81%, eval 12%, ...': the parts of at least 0.5% of wall, largest first."""
  shown = sorted(((v, c) for c, v in parts.items() if v >= 0.005 * wall), reverse=True)
  return ", ".join(f"{c} {100 * v / max(wall, 1e-9):.0f}%" for v, c in shown)


def _hang_line(ledger, watch, pending: _Pending, newest: Callable[[], int | None]):
  """line(what) -> the watchdog's error line: which step hung, the newest checkpoint."""
  def line(what: str) -> str:
    done = max(watch.last_step or 0, pending.synced)
    where = (f"step {done + 1} did not complete (the last completed step is {done}; the loop "
             f"was in {ledger.current})" if ledger.current in goodput_lib.TRAINING else
             f"the {ledger.current} after step {done} did not finish")
    return (f"hung: {what}: {where}; newest checkpoint {_within(newest, 10.0)}: exiting with "
            f"status {faults.HUNG} so that a scheduler restarts the job, which resumes from it")
  return line


def _within(fn: Callable[[], int | None], seconds: float) -> str:
  """fn()'s answer as 'step N' or 'none', or why there is none: a hung run's storage may hang."""
  answer = []

  def ask():
    try:
      answer.append("none" if (step := fn()) is None else f"step {step}")
    except Exception as e:  # pylint: disable=broad-except  # the line must still be written
      answer.append(f"unknown ({type(e).__name__}: {e})")

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(seconds)
  return answer[0] if answer else f"unknown (the storage did not answer in {seconds:.0f} s)"


def _model(config, workdir: str):
  """-> (cfg, palette, initial params or None for a fresh init): the mode's starting point."""
  if not config.init_workdir:
    cfg = model_lib.model_config(config.model)
    return cfg, fit_palette_lib.run_palette(config, workdir, cfg.vocab_size, cfg.n_px), None
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


def _check_batch_size(config, mesh) -> None:
  """The batch, and each of its accum_steps microbatches, split evenly over the batch shards (a
  microbatch that does not is gathered whole and split again at every step: XLA warns of an
  "involuntary full rematerialization")."""
  sharding_lib.check_batch_size(config.batch_size, mesh)
  batch, n, shards = config.batch_size, config.accum_steps, sharding_lib.batch_shards(mesh)
  if batch % n:
    raise ValueError(f"batch_size={batch} does not split into accum_steps={n}")
  if batch // n % shards:
    raise ValueError(f"microbatches of {batch // n} rows (batch_size={batch} / accum_steps={n}) "
                     f"must divide by the {shards} batch shards (data x fsdp of mesh "
                     f"{dict(mesh.shape)})")


def _stream(config, cfg, palette) -> dict:
  """What fixes the training stream (`data.make_dataset`: batch k is a function of these and
  k), as checkpoints record it: a resume that would change it is refused (`_check_stream`)."""
  data = {**data_lib.DEFAULTS, **dict(config.data)}
  return {"batch_size": config.batch_size, "process_count": jax.process_count(),
          "seed": config.seed, "n_px": cfg.n_px, "palette": palette_lib.digest(palette),
          **{k: data[k] for k in ("name", "train_split", "augment", "shuffle_buffer")}}


def _data_record(stream: dict, step: int) -> dict:
  """A checkpoint's record of its data: the stream, and the examples each host has read of it."""
  return {"stream": stream,
          "examples_per_host": step * stream["batch_size"] // stream["process_count"]}


def _check_stream(meta: dict, stream: dict, where: str, allow: bool) -> None:
  """ValueError naming each field of the data stream where checkpoint `where` and this run
  differ, unless allow (config.allow_data_change): then a warning naming them."""
  saved = meta.get("data", {}).get("stream")
  if saved is None:
    logging.warning("checkpoint %s does not record its data stream (written before checkpoints "
                    "did): resuming it on this run's stream, unchecked", where)
    return
  now = json.loads(json.dumps(stream))  # as the checkpoint holds it
  changed = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items()
                      if saved.get(k) != v)
  if changed and not allow:
    raise ValueError(f"checkpoint {where} was trained on another data stream ({changed}): "
                     "resuming would not continue it. Rerun with the checkpoint's values, or use "
                     "another --workdir, or pass --config.allow_data_change=True to go on with "
                     "the new stream")
  if changed:
    logging.warning("config.allow_data_change: resuming checkpoint %s on another data stream "
                    "(%s), from its batch %d", where, changed, meta["step"])


def _restore(mngr, workdir: str, cfg, tx, mesh, shardings, check):
  """-> (state or None, its step, EarlyStopping) from the newest readable checkpoint, whose
  meta check(meta, where) may refuse (before its arrays are read)."""
  if not mngr.all_steps():
    return None, 0, EarlyStopping()
  abstract = steps_lib.abstract_train_state(cfg, tx, mesh)
  params, opt_state, meta = ckpt_lib.restore(
      mngr, abstract.params, abstract.opt_state, cfg,
      set_aside=paths.path(workdir) / "unreadable_checkpoints", check=check)
  start = meta["step"]
  state = steps_lib.TrainState(step=jax.device_put(jnp.int32(start), shardings.step),
                               params=params, opt_state=opt_state)
  logging.info("resumed from step %d of %s", start, mngr.directory)
  return state, start, EarlyStopping(**meta.get("loop", {}))


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


def _train_step(config, cfg, tx, shardings, mesh, first_step: int):
  """step(state, batch of this process's rows) -> (state, metrics), compiled at its first call,
  which logs a checksum of the rows (hosts that read the same rows would each train on a copy)."""
  finetuning = bool(config.init_workdir)
  loss = finetune_lib.loss_fn(cfg, config.gen_weight) if finetuning else steps_lib.loss_fn(cfg)
  step = console.first_call(
      steps_lib.make_train_step(loss, tx, shardings, accum_steps=config.accum_steps,
                                seed=config.seed), "compiling the train step")
  keys = ("tokens", "labels") if finetuning else ("tokens",)
  first = [True]

  def fn(state, batch):
    if first and first.pop():
      logging.info("process %d of %d: batch %d has %d rows here, crc32 %08x",
                   jax.process_index(), jax.process_count(), first_step, len(batch["tokens"]),
                   zlib.crc32(batch["tokens"].tobytes()))
    return step(state, sharding_lib.shard_batch({k: batch[k] for k in keys}, mesh))
  return fn


def _fresh_state(config, cfg, tx, mesh, shardings, init_params) -> steps_lib.TrainState:
  """Step 0: the given parameters (fine-tuning) or a fresh init, laid out as shardings."""
  if init_params is not None:
    return steps_lib.state_from_params(init_params(mesh), tx, shardings)
  return steps_lib.create_train_state(cfg, tx, mesh, jax.random.key(config.seed))


def _due(step: int, config, evaluators, stop: _Preemption, mngr):
  """(log, checkpoint, the evaluators due, preempted) at step; every host stops at one step."""
  log, save = (due(step, config[k], config.total_steps) for k in ("log_every", "checkpoint_every"))
  evals = [e for e in evaluators if due(step, e.every, config.total_steps)]
  preempted = (stop.event.is_set() if jax.process_count() == 1 else
               mngr.reached_preemption(step))
  return log, save, evals, preempted


def _skipped_files() -> dict:
  """{"data_skipped_files": n, summed over hosts} once the input has skipped unreadable files."""
  n = data_lib.skipped_files()
  if jax.process_count() > 1:
    n = int(np.sum(multihost_utils.process_allgather(np.int32(n))))
  return {"data_skipped_files": n} if n else {}


def _train_scalars(window: list[dict]) -> dict:
  """Means of the fetched steps' metrics (the last gradient norm), skipped files."""
  scalars = {f"train_{k}": float(np.mean([m[k] for m in window])) for k in window[0]
             if k not in ("grad_norm", "update_norm")}
  return {**scalars, "grad_norm": float(window[-1]["grad_norm"]), **_skipped_files()}


def _evaluate(evaluators, params, step: int) -> dict:
  scalars = {}
  for evaluator in evaluators:
    with console.status(f"{evaluator.name} at step {step}"):
      scalars.update(evaluator.fn(params, step))
  return scalars


def _report(writer, step: int, total_steps: int, scalars: dict) -> None:
  """scalars (and PNG images) -> metrics.jsonl and TensorBoard, and the console line."""
  images = {k: v for k, v in scalars.items() if isinstance(v, bytes)}
  scalars = {k: v for k, v in scalars.items() if k not in images}
  writer.write(step, scalars, images)
  eta = (total_steps - step) / max(scalars["steps_per_s"], 1e-9)
  evals = "".join(f"  {k} {v:.4f}" for k, v in scalars.items()
                  if k.startswith("eval_") and not k.endswith("bits_per_token"))
  mfu = f"  MFU {100 * scalars['mfu']:.1f}%" if "mfu" in scalars else ""
  parts = {k[len("time_"):-len("_s")]: v for k, v in scalars.items() if k.startswith("time_")}
  logging.info("step %d/%d  loss %.4f%s  %.2f steps/s  %.0f tokens/s  %.3g TFLOP/s/device%s  "
               "[%s]  goodput %.0f%%  ETA %s", step, total_steps, scalars["train_loss"], evals,
               scalars["steps_per_s"], scalars["tokens_per_s"], scalars["tflops_per_device"],
               mfu, _shares(parts, sum(parts.values())), 100 * scalars["goodput"],
               time.strftime("%H:%M:%S", time.gmtime(eta)))


def _save(mngr, step: int, state, accuracy: float | None, meta: dict) -> None:
  """A forced async save; fine-tuning ranks it by held-out accuracy (the best stays on disk)."""
  ckpt_lib.save(mngr, step, state.params, state.opt_state, meta, force=True,
                metrics=None if accuracy is None else {ckpt_lib.BEST_METRIC: accuracy})


def _end_early(mngr, step: int, preempted: bool, record: EarlyStopping) -> None:
  if preempted:
    ckpt_lib.check_saves(mngr, wait=True, preempted=True)
    logging.warning("preempted: saved step %d, exiting", step)
  else:
    logging.info("early stop at step %d: no held-out gain since step %d", step, record.best_step)


def _close(mngr, evaluators, ledger) -> None:
  """Waits for the last save (a failure raises), then lets the evaluators finish."""
  with ledger.phase("checkpoint"):
    ckpt_lib.check_saves(mngr, wait=True)
    mngr.close()
  with ledger.phase("eval"):
    for evaluator in evaluators:
      if evaluator.finish:
        evaluator.finish()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       started: float | None = None) -> dict:
  """Trains (resuming from workdir's newest readable checkpoint); -> the last logged scalars,
  plus `best_step` and `best_eval_accuracy` when fine-tuning. started: the unix time where this
  process's time account begins (`run`: the process's start; default: now)."""
  ledger = goodput_lib.Ledger(time.time() if started is None else started)
  finetuning, total = bool(config.init_workdir), config.total_steps
  configured, palette, init_params = _model(config, workdir)  # what the checkpoints record
  mesh = sharding_lib.make_mesh(config.mesh, dcn_shape=config.dcn_mesh)
  cfg = steps_lib.for_mesh(configured, mesh)
  _check_batch_size(config, mesh)
  tx = steps_lib.make_optimizer(config.lr, total, config.warmup_steps, config.grad_clip,
                                config.schedule, dtype=cfg.dtype)
  mngr = ckpt_lib.manager(workdir, keep=config.keep_checkpoints,
                          best_metric=ckpt_lib.BEST_METRIC if finetuning else None)
  writer = metrics_lib.Writer(workdir, active=jax.process_index() == 0)
  logging.info("model %s: %.2fM parameters, mesh %s", cfg, model_lib.param_count(cfg) / 1e6,
               dict(mesh.shape))
  pending = _Pending()
  newest = lambda: ckpt_lib.newest_good_step(mngr.directory)
  watch = goodput_lib.StepWatch(config.watchdog.straggler)
  hung = lambda: goodput_lib.hang_deadline(ledger, watch, config.watchdog.timeout_s,
                                            config.watchdog.phase_s)
  with faults.pulse_watch(lambda: max(watch.last_step or 0, pending.synced), newest), \
      faults.watchdog(hung, _hang_line(ledger, watch, pending, newest)), watch, \
      jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES), _Preemption() as stop, \
      faults.peer_watch(pending.last_completed, newest), ckpt_lib.storage_watch(mngr):
    shardings = steps_lib.state_shardings(cfg, tx, mesh)
    stream = _stream(config, cfg, palette)
    with ledger.phase("restore"):
      state, start, record = _restore(mngr, workdir, cfg, tx, mesh, shardings, lambda meta, where:
                                      _check_stream(meta, stream, where, config.allow_data_change))
    # The input comes before any compile: a bad dataset or split stops the run at once.
    train_iter, eval_batches = _datasets(config, cfg, palette, start)
    if state is None:
      state = _fresh_state(config, cfg, tx, mesh, shardings, init_params)
    train_step = _train_step(config, cfg, tx, shardings, mesh, first_step=start + 1)
    evaluators = evaluators_lib.build(config, cfg, palette, mesh, workdir, eval_batches)
    timing = _Timing(config, cfg, mesh, workdir, ledger, watch, start)
    profile = profiler_lib.Profiler(config.profile, workdir, total, ledger)
    pending.synced, last, step = start, {}, start
    ledger.switch("host")
    for step in range(start + 1, total + 1):
      with ledger.phase("input"):
        batch = next(train_iter)
      profile.before(step)
      with ledger.phase("compile" if step == start + 1 else "step"):
        state, metrics = train_step(state, batch)
      watch.dispatched(step, metrics)
      pending.steps.append((step, metrics))
      profile.after(step, metrics)
      ckpt_lib.check_saves(mngr)  # a failed async save stops the run here, not steps later
      log, save, evals, preempted = _due(step, config, evaluators, stop, mngr)
      if not (log or save or evals or preempted):
        continue
      with ledger.phase("step"):
        pending.fetch(mngr)
      scalars = {}
      if log or evals or preempted:  # a row, of the steps since the previous one
        scalars = _train_scalars(pending.drain())
        with ledger.phase("eval"):
          scalars.update(_evaluate(evals, state.params, step))
        scalars.update(timing.row(step))
        _report(writer, step, total, scalars)
        last = {k: v for k, v in scalars.items() if not isinstance(v, bytes)}
      accuracy = scalars.get(ckpt_lib.BEST_METRIC)
      if accuracy is not None:
        record.update(step, accuracy)
      if save or preempted or accuracy is not None:
        with ledger.phase("checkpoint"):
          _save(mngr, step, state, accuracy, ckpt_lib.make_meta(
              configured, palette, step, ckpt_lib.to_jsonable(config), dataclasses.asdict(record),
              _data_record(stream, step)))
      if preempted or (accuracy is not None and record.stop(config.patience)):
        with ledger.phase("checkpoint"):
          _end_early(mngr, step, preempted, record)
        break
    profile.close()
    _close(mngr, evaluators, ledger)
    timing.end(step)
  best = dict(best_step=record.best_step, best_eval_accuracy=record.best_eval_accuracy)
  return {**last, **best} if finetuning else last


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The launch scripts' run: console, compilation cache, devices and the multi-process job,
  then the loop; a failed save, a lost peer or a hang ends it with one line and a documented
  status (faults.py)."""
  started = goodput_lib.process_start()
  console.setup()
  console.compilation_cache(config.compilation_cache)
  if -1 in tuple(config.mesh):  # an explicit mesh names its own device count
    sharding_lib.use_one_cpu_device_per_core(config.batch_size // config.accum_steps)
  sharding_lib.maybe_initialize_distributed()
  profiler_lib.start_server(config.profile.port)
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  with faults.exit_on_fault():
    return train_and_evaluate(config, workdir, started)
