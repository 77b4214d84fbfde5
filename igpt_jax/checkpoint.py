"""Orbax checkpoints of a run: parameters, optimizer state, and a JSON record of the rest.

Layout: `workdir/checkpoints/<step>/{params, opt_state, meta}`. `meta` holds the model config,
the palette (so a checkpoint decodes its own samples), the step, the training config, the
loop's own state (e.g. the best held-out accuracy so far) and its data: what fixes the stream
(batch size, processes, seed, data, resolution, palette; batch k is a function of those and k,
which a resume checks: train.py) and the examples each host has read. Weights-only
checkpoints (`save_params`, converted models) have no opt_state. The workdir may be local or in
a bucket (`gs://...`): orbax gets the URI itself and commits with its object-store protocol.

The recorded model is the one configured (attention "auto"): each host that loads it resolves
the runtime fields for its own devices (`for_this_host`), so a run trained on TPUs probes,
samples and fine-tunes on a CPU or GPU, and checkpoints that recorded a resolved kernel load so too.

A save that fails (a full disk, a bucket quota, no permission) ends the run: the training loop
polls the async save (`check_saves`) at every step, and the failure is one `SaveFailed` line
naming the step, the cause, the path and the newest good checkpoint, with the partial step
removed (launch scripts exit with its status, faults.SAVE_FAILED). Rerunning the same command
once the storage is fixed resumes from that newest good checkpoint.

A checkpoint that cannot be read (a disk that filled up, a copy cut short) is skipped with a
warning that names its step and why: `load` and `restore` fall back to the newest one that
every process reads (the processes agree, `newest_readable`); none readable is one error naming
every step tried. Nothing is deleted; the training loop moves an unreadable step to
`workdir/unreadable_checkpoints/` so it neither counts as kept nor blocks a new save of that
step. A read that fails for a reason outside the checkpoint (a 5xx, a timeout: `is_unreadable`)
is tried again and then ends the run (`RestoreFailed`), never skipped.

Runs that evaluate held-out accuracy save it as the checkpoint's orbax metric: the manager
(`best_metric=`) keeps the best one on disk besides the last `keep`, and `load(workdir, "best")`
returns it.

  load(workdir, step=None, *, attention=None, dtype=None)
      -> (IGPTConfig, params, palette)                         probes, sampling, notebooks
  for_this_host(cfg, ...) -> cfg                              runtime fields for this host
  read_meta(workdir, step=None) -> dict                        what a checkpoint records
  steps(workdir) -> [step, ...]                                what is on disk, oldest first
  best_step(workdir, metric) -> step                           highest metric on disk
  save_params(workdir, cfg, params, palette, step=0)           converted weights
  manager / save / restore                                     the training loop
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import re
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from igpt_jax import attention as attention_lib
from igpt_jax import faults
from igpt_jax import hosts
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import steps as steps_lib

# Fields that change how a model runs, not what it is: a run may resume with other values, and
# a checkpoint records them as configured (attention "auto"), each host resolving them for itself.
RUNTIME_FIELDS = ("dtype", "remat", "attention")
# Kernels that run on one platform only: a checkpoint written by a run that recorded its resolved
# kernel may name one, and elsewhere "auto" picks this host's instead.
PLATFORM_KERNELS = {"splash": "tpu", "cudnn": "gpu"}


def checkpoint_dir(workdir: paths.PathLike) -> paths.epath.Path:
  """workdir/checkpoints, local (made absolute) or in a bucket (given to orbax as such)."""
  return paths.path(paths.absolute(workdir)) / "checkpoints"


BEST_METRIC = "eval_accuracy"


class UnreadableCheckpoint(Exception):
  """A checkpoint step whose files do not restore."""

  def __init__(self, step: int, cause: Exception):
    first_line = (str(cause).strip().splitlines() or [""])[0][:300]
    super().__init__(f"step {step}: {type(cause).__name__}: {first_line}")
    self.step = step


def manager(workdir: str, *, keep: int | None = 3, save_every: int = 1, read_only: bool = False,
            best_metric: str | None = None) -> ocp.CheckpointManager:
  """Async manager that keeps the last `keep` checkpoints (None: all).

  best_metric: also keep, whatever its age, the checkpoint with the highest value of that
  metric (orbax's BestN preservation; saves pass `metrics={best_metric: value}`).
  """
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  else:
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    # Ties go to the earlier step (a tie is no gain); orbax writes metrics only with a best_fn.
    best_fn = (lambda m: (m[best_metric], -m["step"])) if best_metric else None
    if best_fn:
      policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=best_fn, n=1,
                                                    keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, best_fn=best_fn, best_mode="max",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def make_meta(cfg: model_lib.IGPTConfig, palette, step: int, config: dict | None = None,
              loop: dict | None = None, data: dict | None = None) -> dict:
  """A checkpoint's JSON record; data: the training loop's record of its data stream."""
  meta = {"model": cfg.to_dict(), "palette": np.asarray(palette, np.float32).tolist(),
          "step": int(step), "config": config or {}, "loop": loop or {}}
  return {**meta, "data": data} if data is not None else meta


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict, *,
         force: bool = False, metrics: dict | None = None) -> bool:
  """Starts an async save of step (if due or forced); True when a save was started.

  metrics: scalars the manager ranks checkpoints by (see `manager(best_metric=)`); the step is
  added to them.
  """
  metrics = None if metrics is None else {**metrics, "step": int(step)}
  items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  if force or mngr.should_save(step):  # orbax then waits for the previous save: its failure
    check_saves(mngr, wait=True)  # is reported as its own
  try:
    return mngr.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)
  except Exception as e:  # pylint: disable=broad-except  # e.g. no permission to make the step dir
    if isinstance(e, OSError) or _save_cause(e) is not None:
      raise _save_failed(mngr, step, e) from e
    raise


class SaveFailed(faults.Fault):
  """A checkpoint that could not be written (the run's one error line says which and why)."""
  status = faults.SAVE_FAILED


# (errnos, words in the error's text) -> the cause as the line names it. Tensorstore reports
# the OS error inside its message ("[os_error_code='28']"), GCS an HTTP status.
_CAUSES = (
    ((errno.ENOSPC,), ("no space left on device", "os_error_code='28'"), "no space left on device"),
    ((errno.EDQUOT,), ("quota exceeded", "quotaexceeded", "ratelimitexceeded",
                       "response code: 429", "os_error_code='122'"), "storage quota exceeded"),
    ((errno.EROFS,), ("read-only file system", "os_error_code='30'"), "read-only file system"),
    ((errno.EACCES, errno.EPERM), ("permission denied", "permission_denied",
                                   "response code: 403", "os_error_code='13'"),
     "permission denied"),
    ((errno.EFBIG,), ("file too large", "os_error_code='27'"), "file too large (a size limit)"),
)


def _save_cause(error: BaseException | None) -> str | None:
  """The known storage failure behind error (or an error it was raised from), else None."""
  while error is not None:
    text = str(error).lower()
    for codes, words, cause in _CAUSES:
      if getattr(error, "errno", None) in codes or any(w in text for w in words):
        return cause
    error = error.__cause__ or error.__context__
  return None


def _failed_path(error: BaseException, directory: paths.epath.Path, step: int) -> str:
  """The file the error names under the checkpoint directory (deepest), else the step's dir."""
  quoted = re.findall(r"[\"']([^\"']+)[\"']", str(error)) + [getattr(error, "filename", None)]
  named = [p for p in quoted if p and str(p).startswith(str(directory))]
  return max(named, key=len) if named else str(directory / str(step))


def _remove_partial(directory: paths.epath.Path, step: int, settle_s: float = 1.0,
                    patience_s: float = 10.0) -> list[str]:
  """Removes what a failed save of step left (its `<step>.orbax-checkpoint-tmp*` folder, or an
  unfinalized `<step>` one on a bucket), freeing the space it took; -> the paths removed.

  orbax reports the first failed write while TensorStore still finishes the save's other writes
  (measured: a 110 KB params file recreated the folder after it had been removed), so removal
  repeats until the folders stay gone for settle_s, for up to patience_s; what still remains is
  left, with a warning naming it.
  """
  if jax.process_index() != 0 or not directory.exists():
    return []
  finalized = set(ocp.path.step.checkpoint_steps(directory))
  partial = [p for p in directory.iterdir()
             if p.name.startswith(f"{step}.orbax-checkpoint-tmp") or
             (p.name == str(step) and step not in finalized)]
  deadline = time.monotonic() + patience_s
  while True:
    for path in partial:
      try:
        if path.exists():
          path.rmtree()
      except OSError:
        pass  # refilled while being removed: the next round takes it
    time.sleep(settle_s)
    left = [p for p in partial if p.exists()]
    if not left or time.monotonic() > deadline:
      break
  for path in left:
    logging.warning("could not remove the partial checkpoint %s", path)
  return [str(p) for p in partial if p not in left]


def newest_good_step(directory) -> int | None:
  """The newest finalized checkpoint step on disk (what a rerun resumes from), or None."""
  return max(ocp.path.step.checkpoint_steps(paths.path(directory)), default=None)


def _save_failed(mngr: ocp.CheckpointManager, step: int | None, error: BaseException,
                preempted: bool = False) -> SaveFailed:
  """The SaveFailed of step's save (its partial files removed first)."""
  directory = paths.path(mngr.directory)
  cause = _save_cause(error) or (
      f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}")
  path = _failed_path(error, directory, step)
  removed = _remove_partial(directory, step) if step is not None else []
  return SaveFailed(
      f"{f'preempted at step {step}, and ' if preempted else ''}checkpoint step {step} was not "
      f"saved: {cause} ({path}); {'removed its partial files; ' if removed else ''}"
      f"{_resume_hint(directory)}")


def _resume_hint(directory: paths.epath.Path) -> str:
  good = newest_good_step(directory)
  if good is None:
    return f"no checkpoint of this run is in {directory}: a rerun starts from step 0"
  return (f"the newest good checkpoint is step {good} in {directory}: fix the storage and rerun "
          "the same command to resume from it")


@contextlib.contextmanager
def storage_watch(mngr: ocp.CheckpointManager):
  """A write of the run (metrics.jsonl, a sample grid) that fails for lack of space, quota or
  permission ends the run as one SaveFailed line too: the in-flight save's own failure when it
  failed as well (a full disk is usually filled by it), else the file's."""
  try:
    yield
  except OSError as e:
    cause = _save_cause(e)
    if cause is None:
      raise
    check_saves(mngr, wait=True)
    raise SaveFailed(f"could not write {e.filename}: {cause}; "
                     f"{_resume_hint(paths.path(mngr.directory))}") from e


def check_saves(mngr: ocp.CheckpointManager, *, wait: bool = False,
                preempted: bool = False) -> None:
  """Raises SaveFailed when the newest async save has failed.

  Without wait, returns at once while a save is still being written (cheap: call it every
  step); with wait, blocks until it is done (a process of the job lost meanwhile ends the wait:
  faults.pulse_watch). preempted: the line says the run was preempted.
  """
  if not wait and mngr.is_saving_in_progress():
    return
  step = mngr.latest_step()  # a failed save is dropped from orbax's list only once waited on
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  # tensorstore, OS and GCS errors alike
    raise _save_failed(mngr, step, e, preempted) from e


# A read that fails for a reason outside the checkpoint (the storage answering 5xx, a timeout,
# a lost connection, memory) is tried RESTORE_TRIES times in all, waiting RESTORE_WAIT_S, then
# twice that, ... in between (5 + 10 + 20 s); then RestoreFailed, with nothing set aside.
RESTORE_TRIES = 4
RESTORE_WAIT_S = 5.0

# A checkpoint itself at fault: TensorStore's codes for missing, cut or corrupt data, orbax's
# words for a missing item, an unfinished step, a tree or shapes other than the target's.
_UNREADABLE = re.compile(r"\b(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE): |was not found in the checkpoint|"
                         r"Found incomplete checkpoint|tree structures do not match|"
                         r"is not compatible with the stored shape")
# Passing failures, whatever else the error says. An error in neither list counts as passing
# too: a checkpoint is set aside only when it is known to be bad.
_PASSING = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED)\b|"
                      r"response code: (5\d\d|429)")


class RestoreFailed(faults.Fault):
  """A checkpoint that could not be read for a reason outside it (the run's one error line)."""
  status = faults.RESTORE_FAILED


def _first_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def is_unreadable(error: BaseException) -> bool:
  """Whether a failed read says the checkpoint is bad (missing or corrupt files, bad JSON, a
  tree or shapes other than the target's) rather than the storage or the host failing."""
  chain = []
  while error is not None and len(chain) < 16:  # the error, what it was raised from, ...
    chain.append(error)
    error = error.__cause__ or error.__context__
  if any(isinstance(e, (TimeoutError, ConnectionError, MemoryError)) or _PASSING.search(str(e))
         for e in chain):
    return False
  return any(isinstance(e, (FileNotFoundError, json.JSONDecodeError)) or
             _UNREADABLE.search(str(e)) for e in chain)


@functools.cache  # one per process, as a manager keeps its own
def _reader() -> ocp.Checkpointer:
  """Reads for this process alone. orbax's own restore ends in a barrier of every process, where
  a process that failed to read leaves the others waiting (and, once it has read an older step,
  meets them there); `newest_readable` has the processes agree instead."""
  alone = ocp.options.MultiprocessingOptions(primary_host=None,
                                             active_processes={jax.process_index()})
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=alone)),
                          multiprocessing_options=alone)


def _read(mngr: ocp.CheckpointManager, step: int, **items):
  """The named items of step, read by this process alone.

  UnreadableCheckpoint when the checkpoint is at fault (`is_unreadable`); any other failure is
  tried again (RESTORE_TRIES, RESTORE_WAIT_S), then is a RestoreFailed.
  """
  directory = paths.path(mngr.directory) / str(step)
  for attempt in range(1, RESTORE_TRIES + 1):
    try:
      return _reader().restore(directory, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  # tensorstore, json, OS, GCS errors...
      if is_unreadable(e):
        raise UnreadableCheckpoint(step, e) from e
      if attempt == RESTORE_TRIES:
        where = f" on process {jax.process_index()}" if jax.process_count() > 1 else ""
        raise RestoreFailed(
            f"checkpoint {directory} could not be read{where}, {RESTORE_TRIES} tries "
            f"({_first_line(e)}); nothing was set aside: rerun the same command once the storage "
            "answers") from e
      wait = RESTORE_WAIT_S * 2 ** (attempt - 1)
      logging.warning("reading checkpoint %s failed (%s); try %d of %d in %.1f s", directory,
                      _first_line(e), attempt + 1, RESTORE_TRIES, wait)
      time.sleep(wait)


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return _read(mngr, step, meta=ocp.args.JsonRestore())["meta"]


def newest_readable(mngr: ocp.CheckpointManager, read: Callable[[int], Any],
                    set_aside: str | None = None):
  """-> (step, read(step)) for the newest step that every process of the job reads.

  Called by every process. Each tries the newest step not yet ruled out and tells the others
  (`hosts.share`) whether it could: a step one of them cannot read (UnreadableCheckpoint) is
  skipped by all, with a warning naming it, the process and why. Once a step reads everywhere,
  the newer ones skipped are moved into the folder `set_aside` if given, once. Any other
  failure of a read (RestoreFailed after its tries, a checkpoint of another model) stops every
  process, nothing moved. With none readable, one FileNotFoundError naming every step tried and
  why (nothing moved).
  """
  n = jax.process_count()
  who = lambda i: f" by process {i} of {n}" if n > 1 else ""
  failures = []
  for step in sorted(set().union(*hosts.share("checkpoint steps", mngr.all_steps())),
                     reverse=True):
    result, error, told = None, None, {}
    try:
      result = read(step)
    except UnreadableCheckpoint as e:
      told = {"unreadable": str(e)}
    except Exception as e:  # pylint: disable=broad-except  # raised below, once told
      error, told = e, {"error": str(e) if isinstance(e, RestoreFailed) else (
          f"process {jax.process_index()} of {n} stopped reading checkpoint "
          f"{mngr.directory}/{step}: {_first_line(e)}")}
    outcomes = hosts.share(f"read checkpoint {step}", told)
    if error is not None:
      raise error
    for outcome in outcomes:  # another process's failure: the same line here
      if "error" in outcome:
        raise RestoreFailed(outcome["error"])
    bad = [(i, o["unreadable"]) for i, o in enumerate(outcomes) if "unreadable" in o]
    for i, why in bad:
      logging.warning("checkpoint %s/%d cannot be read%s, skipping it (%s)", mngr.directory,
                      step, who(i), why)
    if bad:
      failures.append((step, "; ".join(f"{why}{who(i)}" for i, why in bad)))
      continue
    for bad_step, _ in failures if set_aside else ():
      logging.warning("moved unreadable checkpoint %d to %s", bad_step,
                      _set_aside(mngr, bad_step, set_aside))
    return step, result
  raise FileNotFoundError(f"no readable checkpoint in {mngr.directory}: " + (
      "; ".join(why for _, why in failures) if failures else "no steps present"))


def _set_aside(mngr: ocp.CheckpointManager, step: int, folder: str) -> str:
  """Moves step's directory into folder: process 0 moves it, the others wait; -> where to."""
  def move() -> str:
    dest, n = paths.path(folder) / str(step), 1
    while dest.exists():  # the same step may go bad twice
      dest, n = paths.path(folder) / f"{step}.{n}", n + 1
    paths.move(paths.path(mngr.directory) / str(step), dest)
    return str(dest)
  dest = hosts.from_process_0(f"set aside checkpoint {step}", move)
  mngr.reload()
  return dest


def check_compatible(saved: dict, cfg: model_lib.IGPTConfig, where: str) -> None:
  """ValueError naming every architecture field where the checkpoint and cfg disagree, or a
  switch into or out of float16 (whose optimizer state differs: steps.dynamic_loss_scale)."""
  want = cfg.to_dict()
  diff = {k: (saved.get(k), want[k]) for k in want
          if k not in RUNTIME_FIELDS and saved.get(k) != want[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"checkpoint {where} was trained with a different model ({lines}); "
                     "use another --workdir or the checkpoint's model config")
  if (saved.get("dtype") == "float16") != (cfg.dtype == "float16"):
    raise ValueError(f"checkpoint {where} was trained with dtype={saved.get('dtype')!r}, this "
                     f"run computes in {cfg.dtype!r}: a float16 run's optimizer state holds its "
                     "loss scale, the others' do not; resume with "
                     f"--config.model.dtype={saved.get('dtype')} (float32 and bfloat16 runs "
                     "may resume in either)")


def restore(mngr: ocp.CheckpointManager, abstract_params, abstract_opt_state,
            cfg: model_lib.IGPTConfig, step: int | None = None, set_aside: str | None = None,
            check: Callable[[dict, str], None] | None = None):
  """-> (params, opt_state, meta) of step (default: the newest readable one; see
  `newest_readable`), placed like the abstract targets.

  abstract_*: trees of jax.ShapeDtypeStruct with shardings, so arrays land sharded directly.
  A checkpoint of another model is a ValueError, never skipped; so is one that check(meta,
  where) refuses (it runs before the arrays are read).
  """
  def read(step):
    meta = _read_meta(mngr, step)
    check_compatible(meta["model"], cfg, f"{mngr.directory}/{step}")
    if check is not None:
      check(meta, f"{mngr.directory}/{step}")
    out = _read(mngr, step, params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state))
    return out["params"], out["opt_state"], meta

  if step is not None:
    return read(step)
  return newest_readable(mngr, read, set_aside)[1]


def _params_target(cfg: model_lib.IGPTConfig, mesh: jax.sharding.Mesh | None):
  """Where `load` puts the parameters: sharded over mesh, or on the first local device."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, _abstract_params(cfg))
  else:
    shardings = steps_lib.param_shardings(cfg, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      _abstract_params(cfg), shardings)


def _abstract_params(cfg: model_lib.IGPTConfig):
  """Unboxed ShapeDtypeStructs of the parameters (no logical constraints applied).

  The key is made inside the traced function: nothing runs eagerly, so this also works under a
  mesh of compile-only devices (ahead-of-time plans).
  """
  return jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))


def _open(workdir: str, step: int | str | None):
  """-> (read-only manager, step: the given one, the best (step="best") or None for newest)."""
  if not checkpoint_dir(workdir).is_dir():
    raise FileNotFoundError(f"no checkpoints in {workdir} (expected {checkpoint_dir(workdir)})")
  mngr = manager(workdir, read_only=True)
  steps = mngr.all_steps()
  if step == "best":
    step = _best_step(mngr, BEST_METRIC)
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                            f"{checkpoint_dir(workdir)}; steps present: {sorted(steps)}")
  return mngr, step


def _best_step(mngr: ocp.CheckpointManager, metric: str) -> int:
  scored = [(m[metric], s) for s in mngr.all_steps()
            if (m := mngr.metrics(s)) is not None and metric in m]
  if not scored:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory} records {metric!r}")
  return max(scored, key=lambda ms: (ms[0], -ms[1]))[1]  # ties: the earlier step, as BestN


def steps(workdir: str) -> list[int]:
  """The checkpoint steps on disk, oldest first (readable or not: `load` finds out)."""
  mngr, _ = _open(workdir, None)
  on_disk = sorted(mngr.all_steps())
  mngr.close()
  return on_disk


def best_step(workdir: str, metric: str = BEST_METRIC) -> int:
  """The step of the checkpoint with the highest `metric` (what the manager keeps as best)."""
  mngr, _ = _open(workdir, None)
  step = _best_step(mngr, metric)
  mngr.close()
  return step


def _read_one(mngr, step: int | None, read: Callable[[int], Any]):
  return read(step) if step is not None else newest_readable(mngr, read)[1]


def read_meta(workdir: str, step: int | str | None = None) -> dict:
  """The JSON record of a checkpoint: model, palette, step, config, loop and (training loop)
  data: {"stream": what fixes the data stream, "examples_per_host": read of it so far}."""
  mngr, step = _open(workdir, step)
  meta = _read_one(mngr, step, lambda s: _read_meta(mngr, s))
  mngr.close()
  return meta


def for_this_host(cfg: model_lib.IGPTConfig, *, attention: str | None = None,
                  dtype: str | None = None, remat: str | None = None,
                  device=None) -> model_lib.IGPTConfig:
  """A saved model's config with its runtime fields set for this host's devices.

  Given fields replace the saved ones. A saved attention kernel that cannot run on `device`
  (default: jax's first device here) -- splash off a TPU, cudnn where `attention.cudnn_runs`
  says no (off a GPU, before Ampere, outside 16 bit) -- becomes "auto", which the model
  resolves for the devices it runs on. The saved dtype is kept unless given: bfloat16 and
  float16 compute run on every platform, only more slowly on a CPU.
  """
  given = {k: v for k, v in dict(attention=attention, dtype=dtype, remat=remat).items() if v}
  cfg = cfg.replace(**given)
  device = device or jax.devices()[0]
  runs_here = PLATFORM_KERNELS.get(cfg.attention) in (None, device.platform) and (
      cfg.attention != "cudnn" or attention_lib.cudnn_runs(device, cfg.dtype, cfg.head_dim))
  if not runs_here and attention is None:
    cfg = cfg.replace(attention="auto")
  return cfg


def load(workdir: paths.PathLike, step: int | str | None = None, *, attention: str | None = None,
         dtype: str | None = None, mesh: jax.sharding.Mesh | None = None):
  """-> (IGPTConfig, params, palette float32 [k, 3]) of a run's checkpoint, local or gs://.

  step: an int, "best" (highest held-out accuracy) or None (the newest readable one).
  attention, dtype: runtime overrides (see `for_this_host`; the saved values otherwise, with a
  kernel this host cannot run replaced by "auto"). Parameters only (no optimizer state), on the
  first local device, or with `mesh` (a `sharding.make_mesh` mesh) restored straight into their
  training layout over it (`steps.param_shardings`): no device ever holds all of a model too
  big for one.
  """
  mngr, step = _open(workdir, step)

  def read(step):
    meta = _read_meta(mngr, step)
    cfg = for_this_host(model_lib.IGPTConfig.from_dict(meta["model"]), attention=attention,
                        dtype=dtype)
    params = _read(mngr, step, params=ocp.args.StandardRestore(_params_target(cfg, mesh)))
    return cfg, params["params"], meta

  cfg, params, meta = _read_one(mngr, step, read)
  mngr.close()
  return cfg, params, palette_lib.check_palette(np.asarray(meta["palette"], np.float32))


def save_params(workdir: str, cfg: model_lib.IGPTConfig, params, palette, step: int = 0,
                config: dict | None = None) -> None:
  """Writes a weights-only checkpoint (no optimizer state) that `load` reads; blocks until done."""
  palette = palette_lib.check_palette(palette)
  abstract = _abstract_params(cfg)
  got, want = jax.tree.structure(params), jax.tree.structure(abstract)
  if got != want:
    raise ValueError(f"params do not match the model config: tree {got} vs expected {want}")
  bad = [(jax.tree_util.keystr(k), np.shape(p), a.shape) for (k, p), a in
         zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(abstract))
         if np.shape(p) != a.shape]
  if bad:
    raise ValueError(f"parameter shapes do not match the model config: {bad}")
  mngr = manager(workdir, keep=None)
  save(mngr, step, jax.tree.map(np.asarray, params), None,
       make_meta(cfg, palette, step, config), force=True)
  mngr.wait_until_finished()
  mngr.close()


def to_jsonable(config: Any) -> dict:
  """A ConfigDict (or dict) as plain JSON types, for the checkpoint's record of its run."""
  return json.loads(config.to_json_best_effort() if hasattr(config, "to_json_best_effort")
                    else json.dumps(config, default=str))
