"""Plans every program of a run for a TPU slice or GPU hosts from any host, with real compilers.

No accelerator is needed. libtpu (the `tpu` extra) compiles ahead of time for a named TPU slice,
and the CUDA plugin (the `gpu-plan` extra) for NVIDIA GPUs described by XLA's target configs
(`igpt_jax/gpu_targets/`): their compile-only devices take a mesh, and each program, lowered
with abstract sharded arguments over it, is the program those chips would run. The compiler
reports what each chip holds (`memory_analysis`); the TPU compiler also estimates the step's
time (`cost_analysis`'s `optimal_seconds`, an estimate, not a measurement). The GPU client has
no cost analysis: the step estimate there is `roofline_seconds`, a stated model.

Programs (`PROGRAMS`), each with the config's batch and the parameters laid out as training
lays them out over the mesh:
  train     the pretraining step (parameters, Adam state, gradients; donated)
  eval      the held-out loss (steps.make_eval_step)
  extract   the probe's features of every layer (probe.features_fn)
  sample    unconditional sampling: prefill and the KV-cache decode loop (sample.lower)
  finetune  the fine-tuning step: classifier head, L_GEN + L_CLF, fresh Adam state

FLOPs come from the model (`model.flops_per_token`), not from the compiler: with `scan_layers`
XLA's cost analysis counts the scanned block once.

  plan(config, topology, programs=PROGRAMS, slices=1) -> record   launch/plan.py prints it
  target(topology, slices=1) -> Target                             the chips and their specs
  dtype_for(config, target) -> (config, note)                      float16 before Ampere
  lower(program, config, mesh) -> (cfg, abstract arguments, lowered)
  input_needs(record, images_per_core_s=None) -> the host cores the planned step's input takes
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from igpt_jax import attention as attention_lib
from igpt_jax import chips
from igpt_jax import finetune as finetune_lib
from igpt_jax import model as model_lib
from igpt_jax import probe as probe_lib
from igpt_jax import sample as sample_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib

GIB = 2 ** 30
PROGRAMS = ("train", "eval", "extract", "sample", "finetune")
# The fine-tuning program's classifier when the config names none: ImageNet's, the widest the
# paper fine-tunes (its size barely matters next to the model).
FINETUNE_CLASSES = 1000

# The TPU generations a plan compiles for (their HBM and peaks: chips.CHIPS).
TPUS = tuple(name for name, chip in chips.CHIPS.items() if chip.platform == "tpu")
# NVIDIA GPUs: XLA's target config (in gpu_targets/; its device_memory_size is the HBM) and
# NVLink bandwidth per GPU and direction (bytes/s); their peaks are in chips.CHIPS (the V100's
# 16-bit peak is fp16: it has no bf16 units).
GPUS = {
    "h100": ("h100_sxm.txtpb", 450e9),
    "h200": ("h200.txtpb", 450e9),
    "a100": ("a100_sxm_80.txtpb", 300e9),
    "v100": ("v100.txtpb", 150e9),
}
# Between GPU hosts: one 400 Gb/s InfiniBand / RoCE NIC per GPU (the usual 8-GPU node).
NETWORK_BYTES_PER_S = 50e9
GPU_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


@dataclasses.dataclass(frozen=True)
class Target:
  """The chips a plan compiles for."""
  name: str
  devices: tuple
  platform: str  # "tpu" or "gpu"
  hbm_bytes: float
  peak_flops: float  # per chip, dense bf16
  slices: int = 1
  gpus_per_host: int = 0  # GPU only
  nvlink_bytes_per_s: float = 0.0  # GPU only
  hbm_bytes_per_s: float = 0.0  # GPU only (the target config's memory_bandwidth)


def _gpu_target(name: str, generation: str, shape: str) -> Target:
  """'h100:8' (one host of 8 GPUs) or 'h100:4x8' (4 hosts of 8)."""
  if not re.fullmatch(r"(\d+x)?\d+", shape):
    raise ValueError(f"topology {name!r}: GPUs are named <gpu>:<per host> or <gpu>:<hosts>x<per "
                     "host>, e.g. h100:8 or h100:4x8")
  hosts, per_host = (int(n) for n in (shape if "x" in shape else f"1x{shape}").split("x"))
  config_file, nvlink = GPUS[generation]
  with open(os.path.join(GPU_TARGETS, config_file)) as f:
    text = f.read()
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=text,
                                        topology=f"1x{hosts}x{per_host}")
  except (RuntimeError, NotImplementedError, ValueError) as e:  # no plugin: no "cuda" platform
    raise RuntimeError(f"GPU plans need the CUDA compiler plugin and cuDNN: pip install -e "
                       f"'.[gpu-plan]' ({type(e).__name__}: {str(e).splitlines()[0]})") from e
  field = lambda name: int(re.search(rf"{name}:\s*(\d+)", text).group(1))
  return Target(name, tuple(desc.devices), "gpu", field("device_memory_size"),
                chips.CHIPS[generation].bf16,
                gpus_per_host=per_host, nvlink_bytes_per_s=nvlink,
                hbm_bytes_per_s=field("memory_bandwidth"))


def target(topology: str, slices: int = 1) -> Target:
  """The compile-only chips of a TPU slice ('v5p:4x4x2', 'v5e:4x4'; `slices` of them joined by
  DCN) or of GPU hosts ('h100:8', 'h100:4x8', 'h200:1', 'a100:8', 'v100:8')."""
  generation, _, shape = topology.partition(":")
  if generation in GPUS:
    if slices != 1:
      raise ValueError(f"slices={slices}: GPU hosts are given as <gpu>:<hosts>x<per host>")
    return _gpu_target(topology, generation, shape)
  if generation not in TPUS or not shape:
    raise ValueError(f"topology {topology!r}: expected a TPU slice <{'|'.join(TPUS)}>:<chips> "
                     f"(v5p:4x4x2, v5e:4x4) or GPUs <{'|'.join(GPUS)}>:<per host> or "
                     "<hosts>x<per host> (h100:8, h100:4x8)")
  # libtpu takes a host-wide lock file unless told not to: a plan must not need the machine's
  # (or another process's) TPU, it only compiles.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"num_slices": slices} if slices > 1 else {}
  desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  chip = chips.CHIPS[generation]
  return Target(topology, tuple(desc.devices), "tpu", chip.hbm_gib * GIB, chip.bf16,
                slices=slices)


# -- the programs -----------------------------------------------------------------------------

def _optimizer(config):
  return steps_lib.make_optimizer(config.lr, config.total_steps, config.warmup_steps,
                                  config.grad_clip, config.schedule,
                                  dtype=model_lib.model_config(config.model).dtype)


def dtype_for(config: ml_collections.ConfigDict, tgt: Target):
  """-> (config, the line that says why, or None): bfloat16 compute becomes float16 on a GPU
  without bfloat16 tensor cores (before Ampere: V100, T4), where XLA computes bf16 matmuls in
  float32; float16 trains there with its dynamic loss scale (steps.dynamic_loss_scale)."""
  capability = attention_lib.compute_capability(tgt.devices[0])
  if (tgt.platform != "gpu" or model_lib.model_config(config.model).dtype != "bfloat16"
      or capability is None or capability >= attention_lib.CUDNN_MIN_CAPABILITY):
    return config, None
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = "float16"
  return config, (f"dtype: {tgt.devices[0].device_kind} (compute capability "
                  f"{capability[0]}.{capability[1]}) has no bfloat16 tensor cores, so this plan "
                  "is float16 with dynamic loss scaling; train so with "
                  "--config.model.dtype=float16")


def _batch(config, cfg, mesh, **extra) -> dict:
  """Abstract input batch: tokens [B, T] plus `extra` per-example fields [B], split over the
  mesh's batch axes."""
  sharding = sharding_lib.batch_sharding(mesh)
  fields = {"tokens": ((config.batch_size, cfg.n_ctx), jnp.int32),
            **{k: ((config.batch_size,), dtype) for k, dtype in extra.items()}}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in fields.items()}


def _key(mesh):
  key = jax.eval_shape(lambda: jax.random.key(0))  # abstract: nothing runs on the chips
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding_lib.replicated(mesh))


def lower(program: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`program` of config lowered for mesh. -> (cfg, abstract arguments, lowered)

  Nothing is allocated or run: the arguments are ShapeDtypeStructs with their shardings.
  """
  if program not in PROGRAMS:
    raise ValueError(f"program {program!r}; expected one of {PROGRAMS}")
  cfg = steps_lib.for_mesh(model_lib.model_config(config.model), mesh)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  tx = _optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
    if program in ("train", "finetune"):
      if program == "finetune":
        cfg = cfg.replace(n_classes=config.get("n_classes") or FINETUNE_CLASSES)
        loss, batch = (finetune_lib.loss_fn(cfg, config.gen_weight),
                       _batch(config, cfg, mesh, labels=jnp.int32))
      else:
        loss, batch = steps_lib.loss_fn(cfg), _batch(config, cfg, mesh)
      state = steps_lib.abstract_train_state(cfg, tx, mesh)
      step = steps_lib.make_train_step(loss, tx, steps_lib.state_shardings(cfg, tx, mesh),
                                       accum_steps=config.accum_steps, seed=config.seed)
      args = (state, batch)
      return cfg, args, step.lower(*args)
    params = steps_lib.abstract_train_state(cfg, tx, mesh).params
    if program == "eval":
      args = (params, _batch(config, cfg, mesh, valid=jnp.bool_), _key(mesh))
      return cfg, args, steps_lib.make_eval_step(cfg).lower(*args)
    if program == "extract":
      args = (params, _batch(config, cfg, mesh)["tokens"], _key(mesh))
      fn = probe_lib.features_fn(cfg, tuple(range(cfg.n_layer + 1)), "ln1")
      return cfg, args, fn.lower(*args)
    prompt = jax.ShapeDtypeStruct((config.batch_size, 0), jnp.int32,
                                  sharding=sharding_lib.batch_sharding(mesh))
    args = (params, _key(mesh), prompt)
    return cfg, args, sample_lib.lower(cfg, *args, mesh=mesh)


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The config's jitted train step lowered for `mesh`. -> (cfg, abstract state, lowered)"""
  cfg, (state, _), lowered = lower("train", config, mesh)
  return cfg, state, lowered


def bytes_per_chip(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (random keys: none)."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(abstract_tree)
             if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key))


# -- step-time estimates ----------------------------------------------------------------------

def _unrolled(config: ml_collections.ConfigDict, n_layer: int) -> ml_collections.ConfigDict:
  """config with n_layer blocks, not scanned, and one microbatch per step."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.n_layer, config.model.scan_layers = n_layer, False
    config.batch_size //= config.accum_steps
    config.accum_steps = 1
  return config


def estimated_step_seconds(config: ml_collections.ConfigDict, cfg: model_lib.IGPTConfig, mesh,
                           compiled) -> tuple[float | None, str]:
  """The TPU compiler's estimate (`optimal_seconds`) of one train step on mesh. -> (seconds or
  None, where it came from or why there is none)

  A loop body counts once in XLA's cost analysis, so a scanned model or accumulated
  microbatches are estimated from two unrolled one-microbatch compiles of 1 and 2 blocks,
  extrapolated linearly to n_layer (identical blocks) and times accum_steps (the optimizer
  update is then counted accum_steps times: a slight overestimate). None when an estimate is
  not positive (libtpu 0.0.42 returns negative ones for v6e) or the two do not increase (no
  extrapolation to trust).
  """
  direct = float(compiled.cost_analysis()["optimal_seconds"])
  if direct <= 0:  # the unrolled compiles would not be trusted either
    return None, f"the compiler's estimate for the step is {direct:.4g} s (not positive): none"
  if not cfg.scan_layers and config.accum_steps == 1:
    return direct, "the compiled step's"
  one, two = (float(lower_train_step(_unrolled(config, n), mesh)[2].compile()
                    .cost_analysis()["optimal_seconds"]) for n in (1, 2))
  if not 0 < one < two:
    return None, (f"the compiler estimates {one:.4g} s for 1 block and {two:.4g} s for 2 "
                  "(unrolled): not positive and increasing, so no extrapolation")
  return (config.accum_steps * (one + (cfg.n_layer - 1) * (two - one)),
          "extrapolated from unrolled compiles of 1 and 2 blocks")


ROOFLINE = ("roofline, not a measurement: the larger of the matmul FLOPs (the model's, plus the "
            "recomputed forward under remat='full') at the GPU's peak dense 16-bit rate (bf16; "
            "fp16 on a V100) and the compiled program's HBM traffic (XLA's cost analysis of the "
            "optimised GPU module: the bytes each fusion and library call reads and writes) at "
            "the GPU's memory bandwidth, plus the step's collectives at link bandwidth (NVLink "
            "within a host, "
            "{network:.0f} GB/s per GPU between hosts), not overlapped; kernel efficiency, "
            "caches and launch overheads are left out").format(network=NETWORK_BYTES_PER_S / 1e9)


def hbm_bytes(compiled) -> float | None:
  """Bytes the compiled program reads and writes per device: XLA's HloCostAnalysis of its
  optimised module, run by the host's CPU client (the GPU client has no cost analysis)."""
  try:
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
    module = compiled.runtime_executable().hlo_modules()[0]
    return float(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
                 ["bytes accessed"])
  except (AttributeError, ImportError, KeyError, IndexError, jax.errors.JaxRuntimeError):
    return None


def train_step_bytes(config, cfg: model_lib.IGPTConfig, mesh, compiled) -> float | None:
  """`hbm_bytes` of one whole train step: a loop body counts once in the cost analysis, so a
  scanned model or accumulated microbatches are extrapolated from unrolled one-microbatch
  compiles of 1 and 2 blocks, as `estimated_step_seconds` does."""
  if not cfg.scan_layers and config.accum_steps == 1:
    return hbm_bytes(compiled)
  one, two = (hbm_bytes(lower_train_step(_unrolled(config, n), mesh)[2].compile())
              for n in (1, 2))
  if one is None or two is None or not 0 < one < two:
    return None
  return config.accum_steps * (one + (cfg.n_layer - 1) * (two - one))


def roofline_seconds(config: ml_collections.ConfigDict, cfg: model_lib.IGPTConfig, mesh,
                     tgt: Target, step_bytes: float | None) -> float:
  """The GPU train step's time under `ROOFLINE`'s model (step_bytes: `train_step_bytes`, the
  memory term; None leaves it out).

  Collectives per GPU per step, with P parameters and the mesh (data d, fsdp f, tensor t):
  fsdp all-gathers the parameters for the forward and again for the backward of every
  microbatch and reduce-scatters the gradients, (2 accum_steps + 1) (f-1)/f P/t param bytes;
  data all-reduces the gradients, 2 (d-1)/d P/(f t) param bytes; tensor all-reduces each
  block's attention and MLP outputs forward and backward, 8 L (t-1)/t B/(d f) T D compute
  bytes. An axis whose devices all lie on one host uses NVLink, else the network.
  """
  d, f, t = (mesh.shape[a] for a in sharding_lib.MESH_AXES)
  tokens = config.batch_size * cfg.n_ctx
  flops = model_lib.flops_per_token(cfg) * tokens
  if cfg.remat == "full":
    flops += model_lib.flops_per_token(cfg, backward=False) * tokens
  p, pbytes = model_lib.param_count(cfg), jnp.dtype(cfg.param_dtype).itemsize
  moved = {
      "fsdp": (2 * config.accum_steps + 1) * (f - 1) / f * p / t * pbytes,
      "data": 2 * (d - 1) / d * p / (f * t) * pbytes,
      "tensor": (8 * cfg.n_layer * (t - 1) / t * tokens / (d * f) * cfg.n_embd
                 * jnp.dtype(cfg.dtype).itemsize),
  }
  sizes = dict(zip(sharding_lib.MESH_AXES, (d, f, t)))
  seconds = max(flops / (len(tgt.devices) * tgt.peak_flops),
                (step_bytes or 0.0) / tgt.hbm_bytes_per_s)
  for i, axis in enumerate(sharding_lib.MESH_AXES):
    within_host = math.prod(list(sizes.values())[i:]) <= tgt.gpus_per_host
    seconds += moved[axis] / (tgt.nvlink_bytes_per_s if within_host else NETWORK_BYTES_PER_S)
  return seconds


# -- the plan ---------------------------------------------------------------------------------

def advice(program: str, cfg: model_lib.IGPTConfig, config: ml_collections.ConfigDict, mesh,
           argument_bytes: float, hbm_bytes: float) -> str:
  """The knob that lowers what fills a chip: the arguments (parameters, Adam state), or the
  program's activations."""
  what = "parameters and Adam state" if program in ("train", "finetune") else "parameters"
  # Arguments over half the HBM leave too little for gradients and temporaries.
  if argument_bytes >= hbm_bytes / 2:
    return (f"{what} take {argument_bytes / GIB:.2f} GiB per chip: split them over more chips "
            f"(a larger fsdp axis, now {mesh.shape['fsdp']}, or tensor, now "
            f"{mesh.shape['tensor']})")
  if program not in ("train", "finetune"):
    return (f"activations dominate: a smaller batch for {program} (now {config.batch_size}) or "
            "a larger fsdp axis")
  knobs = [] if cfg.remat == "full" else [f"remat='full' (now {cfg.remat!r})"]
  knobs.append(f"accum_steps={2 * config.accum_steps} (now {config.accum_steps}: fewer images' "
               "activations at a time)")
  return "activations dominate: try " + " or ".join(knobs)


def _compile(program: str, config, mesh, tgt: Target) -> tuple[dict, object, object]:
  """Compiles one program. -> (its record, cfg, compiled or None when it does not fit)."""
  t0 = time.perf_counter()
  cfg, args, lowered = lower(program, config, mesh)
  argument_bytes = bytes_per_chip(args)
  rec = dict(attention=cfg.attention, argument_gib=round(argument_bytes / GIB, 3))
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    temp = re.search(r"temporaries \(([\d.]+)G\)", str(e))
    rec.update(temp_gib=float(temp.group(1)) if temp else None, per_device_gib=None,
               fits=False, compile_s=round(time.perf_counter() - t0, 1),
               reason=(f"the compiler refuses: {str(e).splitlines()[0]}; " +
                       advice(program, cfg, config, mesh, argument_bytes, tgt.hbm_bytes)))
    return rec, cfg, None
  mem = compiled.memory_analysis()
  # A donated argument is also an output; aliased bytes are held once.
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  rec.update(temp_gib=round(mem.temp_size_in_bytes / GIB, 3), per_device_gib=round(total / GIB, 3),
             fits=total <= tgt.hbm_bytes, compile_s=round(time.perf_counter() - t0, 1))
  if not rec["fits"]:
    rec["reason"] = (f"needs {total / GIB:.2f} GiB per chip, more than the "
                     f"{tgt.hbm_bytes / GIB:.1f} GiB of HBM; " +
                     advice(program, cfg, config, mesh, argument_bytes, tgt.hbm_bytes))
  return rec, cfg, compiled


def _compile_with_fallback(program: str, config, mesh, tgt: Target):
  """`_compile`; on a GPU whose cuDNN attention fails to compile, again with XLA's attention
  (the record's `attention_fallback` says why). -> (record, cfg, compiled, the config used)"""
  try:
    return (*_compile(program, config, mesh, tgt), config)
  except Exception as e:  # pylint: disable=broad-except
    cfg = steps_lib.for_mesh(model_lib.model_config(config.model), mesh)
    if tgt.platform != "gpu" or cfg.attention != "cudnn":
      raise
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.attention = "xla"
    rec, cfg, compiled = _compile(program, config, mesh, tgt)
    rec["attention_fallback"] = (f"cudnn did not compile ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); planned with xla")
    return rec, cfg, compiled, config


def plan(config: ml_collections.ConfigDict, topology: str,
         programs=PROGRAMS, slices: int = 1) -> dict:
  """Compiles config's `programs` for `topology` (see `target`). -> record

  record: the target, mesh and model; per program (`programs`) its attention, per-chip
  arguments, temporaries and total against the chip's HBM, fits (and `reason` with the knob
  that helps when not) and compile seconds; overall `fits`, the largest program and its
  memory, the total compile seconds, analytic FLOPs per train step, and the train step's
  estimate (`estimate` says whose: the TPU compiler's, or the GPU roofline) with the tokens/s
  and MFU it implies.
  """
  programs = tuple(programs)
  unknown = [p for p in programs if p not in PROGRAMS]
  if unknown or not programs:
    raise ValueError(f"programs {unknown or list(programs)}: expected some of {PROGRAMS}")
  tgt = target(topology, slices)
  config, dtype_note = dtype_for(config, tgt)
  mesh = sharding_lib.make_mesh(config.mesh, tgt.devices, dcn_shape=config.dcn_mesh)
  cfg = steps_lib.for_mesh(model_lib.model_config(config.model), mesh)
  tokens = config.batch_size * cfg.n_ctx
  record = dict(
      topology=topology, slices=slices, chips=len(tgt.devices),
      device_kind=tgt.devices[0].device_kind, mesh=dict(mesh.shape),
      model=config.model.get("preset") or "explicit", n_px=cfg.n_px,
      params=model_lib.param_count(cfg), batch=config.batch_size,
      hosts=len({d.process_index for d in tgt.devices}),
      accum_steps=config.accum_steps, dtype=cfg.dtype, remat=cfg.remat,
      scan_layers=cfg.scan_layers, attention=cfg.attention,
      hbm_gib=round(tgt.hbm_bytes / GIB, 2),
      flops_per_step=model_lib.flops_per_token(cfg) * tokens, programs={})
  if dtype_note:
    record["dtype_note"] = dtype_note
  compiled = {}
  for program in programs:
    rec, program_cfg, compiled[program], used = _compile_with_fallback(program, config, mesh,
                                                                       tgt)
    record["programs"][program] = rec
    if program == "train":  # the estimate compiles what the train step compiled
      cfg, train_config = program_cfg, used
  record["fits"] = all(r["fits"] for r in record["programs"].values())
  largest = max(record["programs"], key=lambda p: (not record["programs"][p]["fits"],
                                                   record["programs"][p]["per_device_gib"] or 0))
  record.update(largest_program=largest,
                per_device_gib=record["programs"][largest]["per_device_gib"],
                compile_s=round(sum(r["compile_s"] for r in record["programs"].values()), 1))
  if not record["fits"]:
    record["reason"] = "; ".join(f"{p}: {r['reason']}" for p, r in record["programs"].items()
                                 if not r["fits"])
  est = None
  if compiled.get("train") is not None:
    t0 = time.perf_counter()
    if tgt.platform == "tpu":
      est, how = estimated_step_seconds(train_config, cfg, mesh, compiled["train"])
      record["estimate"] = ("the TPU compiler's (cost_analysis optimal_seconds), not a "
                            f"measurement; {how}")
    else:
      step_bytes = train_step_bytes(train_config, cfg, mesh, compiled["train"])
      record["estimate"] = ROOFLINE + ("" if step_bytes else "; the HBM traffic was not "
                                       "available, so the memory term is left out")
      record["hbm_gib_per_step"] = round(step_bytes / GIB, 3) if step_bytes else None
      est = roofline_seconds(train_config, cfg, mesh, tgt, step_bytes)
    record["estimate_s"] = round(time.perf_counter() - t0, 1)
  record.update(est_step_s=float(f"{est:.4g}") if est else None,
                est_tokens_per_s=round(tokens / est) if est else None,
                est_mfu=(round(record["flops_per_step"] / (est * len(tgt.devices) * tgt.peak_flops),
                               4) if est else None))
  return record


# -- the input a plan needs -------------------------------------------------------------------

# Each host's CPUs (vCPUs) with the machine they are counted on and where that is published: a
# host's input pipeline (igpt_jax/data.py) must turn its share of every batch into tokens within
# the step. TPU hosts are the 4-chip VMs of multi-host slices (libtpu's hosts); GPU hosts the
# Google Cloud 8-GPU machines (AWS p5 / p5e have 192 vCPUs, p4d 96; a DGX H100 has 112 cores).
HOST_CPUS = {
    "v4": (240, "ct4p-hightpu-4t", "cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus"),
    "v5e": (112, "ct5lp-hightpu-4t", "cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus"),
    "v5p": (208, "ct5p-hightpu-4t", "cloud.google.com/tpu/docs/v5p"),
    "v6e": (180, "ct6e-standard-4t", "cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus"),
    "h100": (208, "a3-highgpu-8g", "cloud.google.com/compute/docs/accelerator-optimized-machines"),
    "h200": (224, "a3-ultragpu-8g", "cloud.google.com/compute/docs/accelerator-optimized-machines"),
    "a100": (96, "a2-highgpu-8g", "cloud.google.com/compute/docs/accelerator-optimized-machines"),
    "v100": (96, "n1-standard-96 with 8 V100", "cloud.google.com/compute/docs/gpus"),
}
# Images/s one host core turns into tokens by resolution: `python -m bench.data --threads 1
# --imagenet ...` on 1,000 ImageNet JPEGs with the ImageNet augmentation (docs/performance.md).
INPUT_IMAGES_PER_CORE_S = {32: 724, 48: 672, 64: 632}


def input_needs(record: dict, images_per_core_s: float | None = None) -> dict:
  """The input one host must deliver for a plan's estimated train step. -> {} without an
  estimate, else its images/s per host (the batch over the hosts, each step), the cores that
  takes at images_per_core_s (default: INPUT_IMAGES_PER_CORE_S at the nearest resolution), and
  the host's vCPUs (HOST_CPUS; None for a machine not listed) with `input_fits`."""
  if not record.get("est_step_s"):
    return {}
  n_px = min(INPUT_IMAGES_PER_CORE_S, key=lambda n: abs(n - record["n_px"]))
  rate = images_per_core_s or INPUT_IMAGES_PER_CORE_S[n_px]
  per_host = record["batch"] / record["hosts"] / record["est_step_s"]
  cpus, machine, _ = HOST_CPUS.get(record["topology"].partition(":")[0], (None, None, None))
  return dict(input_images_per_s_per_host=round(per_host), input_images_per_core_s=rate,
              input_cores_per_host=round(per_host / rate, 2), host_cpus=cpus,
              host_machine=machine, input_fits=None if cpus is None else per_host / rate <= cpus)
