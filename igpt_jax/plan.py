"""Plans a pretraining run for a TPU slice from any host, with the real TPU compiler.

libtpu (the `tpu` extra) compiles ahead of time for a named topology without a TPU:
`jax.experimental.topologies.get_topology_desc("v5p:4x4x2", "tpu")` gives compile-only devices
of that slice, and the config's own jitted train step, lowered with abstract sharded arguments
over a mesh of them, is the program the slice would run. The compiler reports what each chip
holds (`memory_analysis`) and how long it expects the step to take (`cost_analysis`'s
`optimal_seconds`: an estimate, not a measurement).

FLOPs come from the model (`model.flops_per_token`), not from the compiler: with `scan_layers`
XLA's cost analysis counts the scanned block once.

  plan_train_step(config, topology) -> (record, compiled)   launch/plan.py prints the record
  lower_train_step(config, mesh) -> (cfg, abstract state, lowered step)
"""

from __future__ import annotations

import math
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib

GIB = 2 ** 30

# Public per-chip specs: HBM (GiB) and peak dense bf16 FLOP/s.
CHIPS = {
    "v4": (32, 275e12),
    "v5e": (16, 197e12),
    "v5p": (95, 459e12),
    "v6e": (32, 918e12),
}


def chip_specs(topology: str) -> tuple[float, float]:
  """(HBM GiB, peak bf16 FLOP/s) of one chip of a topology named '<generation>:<chips>'."""
  generation = topology.split(":")[0]
  if generation not in CHIPS:
    raise ValueError(f"topology {topology!r}: generation {generation!r} is not one of "
                     f"{sorted(CHIPS)} (names look like v5p:4x4x2 or v5e:4x4)")
  return CHIPS[generation]


def topology_devices(topology: str) -> list:
  """The compile-only devices of a TPU slice, e.g. 'v5p:4x4x2' (32 chips), 'v5e:2x2'."""
  # libtpu takes a host-wide lock file unless told not to: a plan must not need the machine's
  # (or another process's) TPU, it only compiles.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The config's jitted train step lowered for `mesh`. -> (cfg, abstract state, lowered)

  Nothing is allocated or run: the state and batch are ShapeDtypeStructs with their shardings.
  """
  cfg = steps_lib.for_mesh(model_lib.model_config(config.model), mesh)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  tx = steps_lib.make_optimizer(config.lr, config.total_steps, config.warmup_steps,
                                config.grad_clip, config.schedule)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
    state = steps_lib.abstract_train_state(cfg, tx, mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((config.batch_size, cfg.n_ctx), jnp.int32,
                                            sharding=sharding_lib.batch_sharding(mesh))}
    step = steps_lib.make_train_step(steps_lib.loss_fn(cfg), tx,
                                     steps_lib.state_shardings(cfg, tx, mesh),
                                     accum_steps=config.accum_steps, seed=config.seed)
    return cfg, state, step.lower(state, batch)


def bytes_per_chip(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(abstract_tree))


def _unrolled(config: ml_collections.ConfigDict, n_layer: int) -> ml_collections.ConfigDict:
  """config with n_layer blocks, not scanned, and one microbatch per step."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.n_layer, config.model.scan_layers = n_layer, False
    config.batch_size //= config.accum_steps
    config.accum_steps = 1
  return config


def estimated_step_seconds(config: ml_collections.ConfigDict, cfg: model_lib.IGPTConfig, mesh,
                           compiled) -> float | None:
  """The compiler's estimate (`optimal_seconds`) of one train step on mesh.

  A loop body counts once in XLA's cost analysis, so a scanned model or accumulated
  microbatches are estimated from two unrolled one-microbatch compiles of 1 and 2 blocks,
  extrapolated linearly to n_layer (identical blocks) and times accum_steps (the optimizer
  update is then counted accum_steps times: a slight overestimate). None when the two
  estimates are not increasing (no extrapolation to trust).
  """
  if not cfg.scan_layers and config.accum_steps == 1:
    return float(compiled.cost_analysis()["optimal_seconds"])
  one, two = (float(lower_train_step(_unrolled(config, n), mesh)[2].compile()
                    .cost_analysis()["optimal_seconds"]) for n in (1, 2))
  if not 0 < one < two:  # seen on v5e: an unrolled compile's estimate below the smaller one's
    return None
  return config.accum_steps * (one + (cfg.n_layer - 1) * (two - one))


def advice(cfg: model_lib.IGPTConfig, config: ml_collections.ConfigDict, mesh,
           state_bytes: float, hbm_bytes: float) -> str:
  """The knob that lowers what fills a chip: the train state, or the step's activations."""
  # A state over half the HBM leaves too little for its gradients and the step's temporaries.
  if state_bytes >= hbm_bytes / 2:
    return (f"parameters and Adam state take {state_bytes / GIB:.2f} GiB per chip: split them "
            f"over more chips (a larger fsdp axis, now {mesh.shape['fsdp']}, or tensor, now "
            f"{mesh.shape['tensor']})")
  knobs = [] if cfg.remat == "full" else [f"remat='full' (now {cfg.remat!r})"]
  knobs.append(f"accum_steps={2 * config.accum_steps} (now {config.accum_steps}: fewer images' "
               "activations at a time)")
  return "activations dominate: try " + " or ".join(knobs)


def plan_train_step(config: ml_collections.ConfigDict, topology: str):
  """Compiles config's train step for the TPU slice `topology`. -> (record, compiled or None)

  record: topology, chips, mesh, per-chip memory (state, temporaries, total) against the chip's
  HBM, fits (and `reason` when not: the compiler refuses a program larger than HBM, and then
  there is no compiled step), compile seconds, analytic FLOPs per step, and the compiler's
  step-time estimate with the tokens/s and MFU it implies.
  """
  hbm_gib, peak = chip_specs(topology)
  devices = topology_devices(topology)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  t0 = time.perf_counter()
  cfg, state, lowered = lower_train_step(config, mesh)
  tokens = config.batch_size * cfg.n_ctx
  state_bytes = bytes_per_chip(state)
  record = dict(
      topology=topology, chips=len(devices), device_kind=devices[0].device_kind,
      mesh=dict(mesh.shape), model=config.model.get("preset", "explicit"), n_px=cfg.n_px,
      params=model_lib.param_count(cfg), batch=config.batch_size,
      accum_steps=config.accum_steps, dtype=cfg.dtype, remat=cfg.remat,
      scan_layers=cfg.scan_layers, attention=cfg.attention, hbm_gib=hbm_gib,
      state_gib=round(state_bytes / GIB, 3),
      flops_per_step=model_lib.flops_per_token(cfg) * tokens)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    temp = re.search(r"temporaries \(([\d.]+)G\)", str(e))
    record.update(temp_gib=float(temp.group(1)) if temp else None, per_device_gib=None,
                  fits=False, compile_s=round(time.perf_counter() - t0, 1), est_step_s=None,
                  est_tokens_per_s=None, est_mfu=None,
                  reason=(f"the TPU compiler refuses: {str(e).splitlines()[0]}; " +
                          advice(cfg, config, mesh, state_bytes, hbm_gib * GIB)))
    return record, None
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  # The donated state is both argument and output; aliased bytes are held once.
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  est = estimated_step_seconds(config, cfg, mesh, compiled)
  record.update(
      temp_gib=round(mem.temp_size_in_bytes / GIB, 3), per_device_gib=round(total / GIB, 3),
      fits=total <= hbm_gib * GIB, compile_s=round(compile_s, 1),
      est_step_s=float(f"{est:.4g}") if est else None,
      est_tokens_per_s=round(tokens / est) if est else None,
      est_mfu=round(record["flops_per_step"] / (est * len(devices) * peak), 4) if est else None)
  if not record["fits"]:
    record["reason"] = (f"needs {total / GIB:.2f} GiB per chip, more than the {hbm_gib} GiB of "
                        "HBM; " + advice(cfg, config, mesh, state_bytes, hbm_gib * GIB))
  return record, compiled
