"""Shared pieces of the bench scripts: model FLOPs, the device's matmul peak, timing, output."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# The FLOPs formula lives with the model and the matmul peak with the chips (the plan tool and
# the training loop use them too); benches read them from here.
from igpt_jax.chips import measured_peak as peak_flops  # pylint: disable=unused-import
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


def hf_peer(cfg: IGPTConfig, batch: int, dtype: str = "float32"):
  """Hugging Face's ImageGPTForCausalImageModeling built as iGPT is, and the settings it runs with.

  iGPT has no dropout and neither has our model, so the peer's default dropout (0.1 on
  embeddings, residuals and attention) is turned off: with it the peer does extra work ours does
  not. Same shape, batch and dtype; torch uses every core through its threads. -> (model,
  settings): settings names every peer setting for the bench's JSON.
  """
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  hf_cfg = transformers.ImageGPTConfig(
      vocab_size=cfg.vocab_size + 1, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
      n_layer=cfg.n_layer, n_head=cfg.n_head, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
  model = transformers.ImageGPTForCausalImageModeling(hf_cfg).to(getattr(torch, dtype))
  settings = dict(
      peer="transformers ImageGPTForCausalImageModeling", peer_version=transformers.__version__,
      peer_torch=torch.__version__, peer_threads=torch.get_num_threads(), peer_dtype=dtype,
      peer_batch=batch, peer_n_ctx=cfg.n_ctx, peer_n_layer=cfg.n_layer, peer_n_embd=cfg.n_embd,
      peer_n_head=cfg.n_head, peer_attn_pdrop=hf_cfg.attn_pdrop,
      peer_resid_pdrop=hf_cfg.resid_pdrop, peer_embd_pdrop=hf_cfg.embd_pdrop,
      peer_attention=model.config._attn_implementation, peer_tokens="random_tokens(seed 0)")
  return model, settings


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
