"""Attention dispatch: `attention(q, k, v, causal=..., implementation=...)` runs one of the
kernels of igpt_jax/kernels.py ("blocked", "splash") or `jax.nn.dot_product_attention` ("xla",
"cudnn"); "auto" follows the device the program is compiled for (`resolve`): splash on TPU,
cuDNN flash attention on a GPU that can run it (`cudnn_runs`), XLA's on other GPUs, blocked on
CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from igpt_jax import kernels

IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn", "splash")
# cuDNN's flash attention (jax.nn.dot_product_attention(implementation="cudnn")) runs on
# Ampere (compute capability 8.0) and later, in bf16 or fp16, with a head dim that is a multiple
# of 8 up to 128 (256 from Hopper, 9.0). jax checks the head dim only against a GPU it can see,
# and a compile for a V100 (7.0) target succeeds without one: the device's compute capability
# decides, read from the device (a real GPU, or the target config of a compile-only one).
CUDNN_MIN_CAPABILITY = (8, 0)


def compute_capability(device) -> tuple[int, int] | None:
  """(major, minor) of an NVIDIA device's compute capability, None when it has none."""
  value = getattr(device, "compute_capability", None)
  if not value:
    return None
  major, _, minor = str(value).partition(".")
  return int(major), int(minor or 0)


def cudnn_runs(device, dtype, head_dim: int | None = None) -> bool:
  """Whether cuDNN flash attention compiles and runs on `device` for `dtype` inputs."""
  capability = compute_capability(device) if device.platform == "gpu" else None
  if capability is None or capability < CUDNN_MIN_CAPABILITY:
    return False
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  widest = 256 if capability >= (9, 0) else 128
  return head_dim is None or (head_dim % 8 == 0 and head_dim <= widest)


def resolve(implementation: str, dtype, device=None, seq_len: int | None = None,
            head_dim: int | None = None) -> str:
  """The implementation for `device` (a jax device; None = jax.devices()[0]).

  'auto' -> 'splash' on TPU (or 'xla' when seq_len is not a multiple of the 128-wide tiles the
  kernel needs, e.g. 8x8 images), 'cudnn' on a GPU where `cudnn_runs` (Ampere or later, 16 bit,
  head_dim within its limits), 'xla' on other GPUs (V100, T4, float32), 'blocked' elsewhere;
  other names pass through. A CPU host that compiles for a TPU or GPU passes one of the
  compile-only devices of the target.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  device = device or jax.devices()[0]
  if device.platform == "tpu":
    return "splash" if seq_len is None or seq_len % kernels.SPLASH_ALIGN == 0 else "xla"
  if device.platform != "gpu":
    return "blocked"
  return "cudnn" if cudnn_runs(device, dtype, head_dim) else "xla"


def attention(q, k, v, *, causal: bool, implementation: str = "auto", device=None):
  """q/k/v [B, T, H, K] -> [B, T, H, K] with the named implementation (see `resolve`)."""
  impl = resolve(implementation, q.dtype, device, seq_len=q.shape[1], head_dim=q.shape[3])
  if impl == "blocked":
    return kernels.blocked_attention(q, k, v, causal=causal)
  if impl == "splash":
    return kernels.splash_attention(q, k, v, causal=causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
