"""Facts about accelerator chips, in one place: peak dense matmul FLOP/s and TPU HBM.

  CHIPS: {generation: Chip}            the TPU and GPU generations the planner (plan.py) knows
  find(device_kind) -> (generation, Chip) or None    by jax's `device.device_kind`
  peak_flops(setting, device, dtype) -> (FLOP/s or None, where it came from)   the loop's MFU
  measured_peak(dtype, n, reps) -> FLOP/s of a jitted matmul on the default device (benches)

Peaks are per chip (a GPU, or a TPU chip as jax counts devices: one per chip from v4 on), dense
(no sparsity), from the vendors' data sheets. `bf16` is the 16-bit matmul rate (bfloat16 or
float16). `fp32` is what a float32 matmul reaches at jax's default precision: on TPU one bf16
pass of the MXU (the bf16 rate); on A100 / H100 / H200 TensorFloat-32 on the tensor cores (half
the bf16 rate); on V100, which has neither bf16 nor TF32 units, the CUDA cores' fp32 rate (its
`bf16` entry is the fp16 tensor-core rate). A GPU's HBM is in its XLA target config
(gpu_targets/, read by plan.py).

MFU everywhere (the plan's estimate, the loop's log, the benches) is model FLOPs
(`model.flops_per_token`, which counts causal attention in full) over time x devices x peak.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Chip:
  platform: str  # "tpu" or "gpu"
  kinds: str  # regular expression over jax's device_kind
  bf16: float  # peak dense FLOP/s of 16-bit matmuls
  fp32: float  # peak dense FLOP/s of float32 matmuls at jax's default precision
  hbm_gib: float | None = None  # TPU only (a GPU's is in its target config)

  def peak(self, dtype: str) -> float:
    """The rate for matmuls computed in dtype (the model's compute dtype)."""
    return self.fp32 if dtype == "float32" else self.bf16


CHIPS = {
    "v4": Chip("tpu", r"TPU v4", 275e12, 275e12, 32),
    "v5e": Chip("tpu", r"TPU v5 ?(lite|e)", 197e12, 197e12, 16),
    "v5p": Chip("tpu", r"TPU v5p?$", 459e12, 459e12, 95),
    "v6e": Chip("tpu", r"TPU v6 ?(lite|e)", 918e12, 918e12, 32),
    "h100": Chip("gpu", r"H100", 989e12, 494.5e12),
    "h200": Chip("gpu", r"H200", 989e12, 494.5e12),
    "a100": Chip("gpu", r"A100", 312e12, 156e12),
    "v100": Chip("gpu", r"V100", 125e12, 15.7e12),
}


def find(device_kind: str) -> tuple[str, Chip] | None:
  """The generation whose pattern matches a device_kind ('TPU v5 lite', 'NVIDIA H100 80GB
  HBM3'), or None (a CPU, a chip not in the table)."""
  for name, chip in CHIPS.items():
    if re.search(chip.kinds, device_kind):
      return name, chip
  return None


def measured_peak(dtype: str = "float32", n: int | None = None, reps: int = 5) -> float:
  """FLOP/s of the best of `reps` jitted [n, n] @ [n, n] matmuls on the default device.

  n defaults to 2048 on CPU (already at the BLAS plateau) and 8192 on accelerators.
  """
  n = n or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jnp.ones((n, n), dtype)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()  # compile, first allocations
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def peak_flops(setting: float, device, dtype: str) -> tuple[float | None, str]:
  """The peak FLOP/s of one device for MFU: `setting` (config.peak_flops) when > 0; measured
  with `measured_peak` when < 0; else the table's for device's kind (None on a CPU or a chip
  it lacks). -> (peak or None, where it came from, in words)."""
  if setting > 0:
    return float(setting), "config.peak_flops"
  if setting < 0:
    return measured_peak(dtype), f"a {dtype} matmul measured on {device.device_kind} at start"
  found = find(device.device_kind)
  if found is None:
    return None, (f"no peak for {device.device_kind!r} in chips.CHIPS; config.peak_flops sets "
                  "one (-1 measures a matmul at start)")
  name, chip = found
  return chip.peak(dtype), f"chips.CHIPS[{name!r}], {dtype}"
