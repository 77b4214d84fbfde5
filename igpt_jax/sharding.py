"""Device mesh, logical-to-mesh axis rules and sharded placement of parameters and batches.

The mesh has three axes:
  data   - pure data parallelism (parameters replicated),
  fsdp   - data parallelism whose parameters and optimizer state are split along `embed`,
  tensor - Megatron-style split of heads / MLP hidden units / vocabulary.
The batch is split over data x fsdp. The model only names logical axes (see model.py); RULES
maps them onto the mesh, so one config line (`mesh = (data, fsdp, tensor)`) picks the layout.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from igpt_jax import faults

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Unlisted logical axes would raise in flax, so every name the
# model uses appears here; None means replicated along that dimension.
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("classes", None),
)


# A plain multi-host launch names the job itself; jax reads the first from the environment but
# not the other two, so all three are passed to `jax.distributed.initialize` explicitly.
PROCESS_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Set by clusters whose layout jax detects on its own: SLURM, Cloud TPU on GKE, multislice.
CLUSTER_VARIABLES = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                     "MEGASCALE_COORDINATOR_ADDRESS")


def _tpu_chips() -> int:
  """TPU chips attached to this host (from the PCI bus; no backend is started)."""
  from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
  return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def launch_kind(env=None) -> str | None:
  """How this process joins a multi-process job: "explicit" (the PROCESS_VARIABLES), "cluster"
  (jax detects the layout itself) or None (one process on its own).

  A Cloud TPU VM made with `gcloud compute tpus tpu-vm create` (or a queued resource) sets no
  variable: its worker number and the slice's hosts are in the VM's metadata, which jax's GCE
  TPU cluster reads. So a host with TPU chips is a "cluster" unless TPU_SKIP_MDS_QUERY (jax's own
  switch) says there is no metadata to ask; a one-host slice then becomes a job of one process.
  Without the distributed client a multi-host slice still trains, but orbax's
  `reached_preemption` stays False and a preempted pod never saves.
  """
  env = os.environ if env is None else env
  given = [k for k in PROCESS_VARIABLES if k in env]
  if given:
    if len(given) < len(PROCESS_VARIABLES):
      missing = [k for k in PROCESS_VARIABLES if k not in env]
      raise ValueError(f"a multi-process launch sets all of {', '.join(PROCESS_VARIABLES)}; "
                       f"{', '.join(given)} set but {', '.join(missing)} missing")
    return "explicit"
  if any(k in env for k in CLUSTER_VARIABLES):
    return "cluster"
  if "TPU_SKIP_MDS_QUERY" not in env and _tpu_chips():
    return "cluster"
  return None


def maybe_initialize_distributed() -> None:
  """Joins the multi-process job when this host is part of one (see `launch_kind`).

  Cloud TPU slices (VM metadata, GKE, multislice) and SLURM clusters are detected by jax itself;
  a plain multi-host launch sets JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. IGPT_HEARTBEAT_TIMEOUT_S sets the heartbeat timeout
  (`_heartbeat`).
  """
  env = os.environ
  kind = launch_kind(env)
  if kind == "explicit":
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]), **_heartbeat())
  elif kind == "cluster":
    jax.distributed.initialize(**_heartbeat())
  else:
    return
  faults.start_pulse()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _heartbeat() -> dict:
  """IGPT_HEARTBEAT_TIMEOUT_S, when set: seconds without a heartbeat after which the job's
  coordination service declares a process dead and ends every other one (jax's default: 100).
  A process that dies mid-collective is usually noticed sooner (docs/faults.md)."""
  value = os.environ.get("IGPT_HEARTBEAT_TIMEOUT_S")
  return {} if value is None else {"heartbeat_timeout_seconds": int(value)}


def require_one_process(script: str) -> None:
  """Joins the job like `maybe_initialize_distributed`, then refuses to run on several processes.

  For scripts whose outputs are written by every process or whose programs span local devices
  only: on a pod they must run on one host, outside the multi-process job.
  """
  maybe_initialize_distributed()
  if jax.process_count() > 1:
    raise SystemExit(f"{script} runs as one process, not {jax.process_count()}: start it on one "
                     f"host without {' / '.join(PROCESS_VARIABLES + CLUSTER_VARIABLES)} (e.g. "
                     "on one TPU VM worker, or outside srun)")


def use_one_cpu_device_per_core(batch_size: int | None = None) -> None:
  """Makes XLA expose one CPU device per host core; call before jax first touches a device.

  An XLA CPU program runs many of its operations on about one core: all of a small-batch decode
  step (a chain of matrix-vector products bound by memory bandwidth) and a good part of a small
  train step. With one device per core and the batch split over a mesh of them, every core works
  on its own rows. With `batch_size`, the count is the largest power of two up to the core count
  that splits it evenly (so the batch, and the 8-image sample grids of training, split over the
  devices). A device count already in XLA_FLAGS is kept; on accelerator hosts only the host
  platform changes, so this is harmless there.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  if jax._src.xla_bridge.backends_are_initialized():  # pylint: disable=protected-access
    raise RuntimeError("use_one_cpu_device_per_core must run before jax touches a device")
  cores = os.cpu_count() or 1
  if batch_size is not None:
    cores = max(2**i for i in range(cores.bit_length()) if batch_size % 2**i == 0)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={cores}").strip()


def data_mesh(batch_size: int) -> Mesh | None:
  """A data-parallel mesh over the most devices that split `batch_size` evenly (None for one)."""
  n = max(k for k in range(1, jax.device_count() + 1) if batch_size % k == 0)
  return make_mesh((n, 1, 1), jax.devices()[:n]) if n > 1 else None


def mesh_shape(shape: Sequence[int], n_devices: int, what: str = "devices",
               name: str = "mesh") -> tuple[int, int, int]:
  """Resolves one -1 entry of (data, fsdp, tensor) so the product is n_devices (or slices)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"{name} must have {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{name} sizes must be positive with at most one -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"{name} {shape}: {n_devices} {what} do not divide by {known}")
    shape = tuple(n_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ValueError(f"{name} {shape} needs {math.prod(shape)} {what}, {n_devices} present")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None, *,
              dcn_shape: Sequence[int] = (-1, 1, 1)) -> Mesh:
  """Mesh over all (or the given) devices with axes (data, fsdp, tensor).

  shape lays out the devices of one slice (or of all devices where there are no slices: CPUs,
  GPUs); dcn_shape lays out the slices of a multislice TPU job (devices with several
  `slice_index` values), joined over the data-centre network: the mesh's axes are the
  products, e.g. shape (1, 16, 2) and dcn_shape (2, 1, 1) on two 32-chip slices make a
  (2, 16, 2) mesh whose data axis crosses slices, so only the gradients' all-reduce uses DCN.
  -1 takes the devices (or slices) left.

  Devices are placed by `mesh_utils`: on TPUs the axes follow the physical torus, splitting a
  physical axis where the shape asks for it (a 16-way fsdp axis on a 4x8 slice), which
  `jax.make_mesh` refuses outside v5e. Axis types are Auto: linen's logical constraints
  (`nn.with_logical_constraint`) are rejected on Explicit axes, which `jax.make_mesh` now
  defaults to.
  """
  devices = jax.devices() if devices is None else list(devices)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  dcn = mesh_shape(dcn_shape, len(slices), "slices", "dcn_mesh")
  if len(devices) % len(slices):
    raise ValueError(f"{len(devices)} devices do not split evenly over {len(slices)} slices")
  per_slice = mesh_shape(shape, len(devices) // len(slices),
                         "devices per slice" if len(slices) > 1 else "devices")
  if len(slices) > 1:
    placed = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices,
                                                  allow_split_physical_axes=True)
  else:
    placed = mesh_utils.create_device_mesh(per_slice, devices, allow_split_physical_axes=True)
  return Mesh(placed, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. abstract_params)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, ...] arrays: the batch split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of a global batch -> global jax.Arrays split over data x fsdp."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """ValueError unless the global batch splits evenly over processes and batch shards."""
  shards = batch_shards(mesh)
  if batch_size % shards or batch_size % jax.process_count():
    raise ValueError(f"batch_size={batch_size} must divide by the {shards} batch shards "
                     f"(data x fsdp of mesh {dict(mesh.shape)}) and {jax.process_count()} "
                     "processes")
