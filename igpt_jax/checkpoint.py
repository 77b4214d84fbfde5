"""Orbax checkpoints of a run: parameters, optimizer state, and a JSON record of the rest.

Layout: `workdir/checkpoints/<step>/{params, opt_state, meta}`. `meta` holds the model config,
the palette (so a checkpoint decodes its own samples), the step, the data position (the number
of batches consumed: the input pipeline is a pure function of (seed, position)) and the
training config. Weights-only checkpoints (`save_params`, converted models) have no opt_state.

  load(workdir, step=None) -> (IGPTConfig, params, palette)   probes, sampling, notebooks
  read_meta(workdir, step=None) -> dict                        what a checkpoint records
  save_params(workdir, cfg, params, palette, step=0)           converted weights
  manager / save / restore                                     the training loop
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib


class _QuietOrbax(logging.Filter):
  """Passes orbax's warnings and errors, not its INFO line for every save and restore."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs(handler: logging.Handler) -> None:
  """Keeps orbax's per-save / per-restore INFO chatter out of a console log (e.g. absl's)."""
  handler.addFilter(_QuietOrbax())

# Fields that change how a model runs, not what it is: a run may resume with other values.
RUNTIME_FIELDS = ("dtype", "remat", "attention")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, keep: int | None = 3, save_every: int = 1,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Async manager that keeps the last `keep` checkpoints (None: all)."""
  if read_only:
    keep, save_every = None, 0
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                         create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def make_meta(cfg: model_lib.IGPTConfig, palette, step: int, config: dict | None = None) -> dict:
  return {"model": cfg.to_dict(), "palette": np.asarray(palette, np.float32).tolist(),
          "step": int(step), "data_position": int(step), "config": config or {}}


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict, *,
         force: bool = False) -> bool:
  """Starts an async save of step (if due or forced); True when a save was started."""
  items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def check_compatible(saved: dict, cfg: model_lib.IGPTConfig, where: str) -> None:
  """ValueError naming every architecture field where the checkpoint and cfg disagree."""
  want = cfg.to_dict()
  diff = {k: (saved.get(k), want[k]) for k in want
          if k not in RUNTIME_FIELDS and saved.get(k) != want[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"checkpoint {where} was trained with a different model ({lines}); "
                     "use another --workdir or the checkpoint's model config")


def restore(mngr: ocp.CheckpointManager, abstract_params, abstract_opt_state,
            cfg: model_lib.IGPTConfig, step: int | None = None):
  """-> (params, opt_state, meta) of step (default latest), placed like the abstract targets.

  abstract_*: trees of jax.ShapeDtypeStruct with shardings, so arrays land sharded directly.
  """
  step = mngr.latest_step() if step is None else step
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_compatible(meta["model"], cfg, f"{mngr.directory}/{step}")
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state)))
  return out["params"], out["opt_state"], meta


def _single_device_target(cfg: model_lib.IGPTConfig):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                      _abstract_params(cfg))


def _abstract_params(cfg: model_lib.IGPTConfig):
  """Unboxed ShapeDtypeStructs of the parameters (no logical constraints applied)."""
  return jax.eval_shape(model_lib.init_params, cfg, jax.random.key(0))


def _open(workdir: str, step: int | None):
  """-> (read-only manager, step: the given one, or the latest)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {workdir} (expected {checkpoint_dir(workdir)})")
  mngr = manager(workdir, read_only=True)
  steps = mngr.all_steps()
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                            f"{checkpoint_dir(workdir)}; steps present: {sorted(steps)}")
  return mngr, max(steps) if step is None else step


def read_meta(workdir: str, step: int | None = None) -> dict:
  """The JSON record of a checkpoint: model, palette, step, data_position, config."""
  mngr, step = _open(workdir, step)
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return meta


def load(workdir: str, step: int | None = None):
  """-> (IGPTConfig, params, palette float32 [k, 3]) of a run's checkpoint (default latest).

  Parameters only (no optimizer state), on the first local device.
  """
  mngr, step = _open(workdir, step)
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  cfg = model_lib.IGPTConfig.from_dict(meta["model"])
  params = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_single_device_target(cfg))))["params"]
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
