"""Shared pieces of the bench scripts: model FLOPs, the device's matmul peak, timing, output."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# The FLOPs formula lives with the model (the plan tool uses it too); benches read it from here.
from igpt_jax.model import IGPTConfig, flops_per_token, matmul_params  # pylint: disable=unused-import


def best_seconds(fn, reps: int) -> float:
  """Fastest of `reps` timed calls of fn, after one untimed call (compile, first allocations)."""
  fn()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def peak_flops(dtype: str = "float32", n: int | None = None, reps: int = 5) -> float:
  """FLOP/s of the best of `reps` jitted [n, n] @ [n, n] matmuls on the default device.

  n defaults to 2048 on CPU (already at the BLAS plateau) and 8192 on accelerators.
  """
  n = n or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jnp.ones((n, n), dtype)
  mm = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / best_seconds(lambda: mm(a).block_until_ready(), reps)


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
  """Bytes/s of the best of `reps` jitted sums over a float32 array of `gib` GiB.

  1 GiB is far beyond any cache, so this is the device's streaming read bandwidth: the ceiling
  of a step that must read every weight and the whole KV cache (a decode step).
  """
  x = jnp.ones(int(gib * 2**30) // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  return x.nbytes / best_seconds(lambda: total(x).block_until_ready(), reps)


def random_tokens(cfg: IGPTConfig, batch: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.n_ctx), np.int32)


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind} x{jax.device_count()} ({os.cpu_count()} host cores)"


def peak_memory_gib() -> float | None:
  """Peak device memory of this process (GPU/TPU); None where the backend keeps no stats (CPU)."""
  stats = jax.devices()[0].memory_stats()
  return round(stats["peak_bytes_in_use"] / 2**30, 2) if stats else None


def load() -> float:
  """1-minute load average (other jobs on a shared CPU skew timings)."""
  return os.getloadavg()[0]


def emit(record: dict) -> None:
  """The bench contract: one JSON object as the last line of stdout."""
  print(json.dumps(record, sort_keys=True), flush=True)
