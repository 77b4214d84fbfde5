"""Attention dispatch: `attention(q, k, v, causal=..., implementation=...)` runs one of the
kernels of igpt_jax/kernels.py ("blocked", "splash") or `jax.nn.dot_product_attention` ("xla",
"cudnn"); "auto" follows the platform the program is compiled for (`resolve`): splash on TPU,
cudnn on GPU (16-bit), blocked on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from igpt_jax import kernels

IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn", "splash")


def resolve(implementation: str, dtype, platform: str | None = None,
            seq_len: int | None = None) -> str:
  """The implementation for `platform` ("cpu", "gpu", "tpu"; None = jax.default_backend()).

  'auto' -> 'splash' on TPU (or 'xla' when seq_len is not a multiple of the 128-wide tiles the
  kernel needs, e.g. 8x8 images), 'cudnn' on GPU for 16-bit inputs (all it supports), 'xla' on
  GPU for float32, 'blocked' elsewhere; other names pass through. A CPU host that compiles for a
  TPU topology passes platform="tpu".
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash" if seq_len is None or seq_len % kernels.SPLASH_ALIGN == 0 else "xla"
  if platform != "gpu":
    return "blocked"
  return "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"


def attention(q, k, v, *, causal: bool, implementation: str = "auto",
              platform: str | None = None):
  """q/k/v [B, T, H, K] -> [B, T, H, K] with the named implementation (see `resolve`)."""
  impl = resolve(implementation, q.dtype, platform, seq_len=q.shape[1])
  if impl == "blocked":
    return kernels.blocked_attention(q, k, v, causal=causal)
  if impl == "splash":
    return kernels.splash_attention(q, k, v, causal=causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
