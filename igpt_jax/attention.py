"""Causal attention in query blocks, for CPUs (and anywhere no fused kernel exists).

At T = 1024 a plain attention materialises [B, H, T, T] float32 scores and probabilities, and
its backward reads them back: the step is bound by memory traffic, and half of that work is the
masked upper triangle. Here the queries are cut into blocks of `block` rows; query block i only
meets keys [0, (i + 1) * block), so the upper triangle is never computed, neither forward nor in
the autodiff backward (every block has static shapes: the skipped part simply does not exist).
Only the diagonal tile needs a mask.

`attention(q, k, v, causal=..., implementation=...)` dispatches between this and
`jax.nn.dot_product_attention` ("xla", "cudnn"); "auto" picks cudnn on GPU (16-bit), blocked on CPU.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn")
DEFAULT_BLOCK = 128


def resolve(implementation: str, dtype, platform: str | None = None) -> str:
  """'auto' -> 'cudnn' on GPU for 16-bit inputs (all it supports), 'xla' on GPU for float32,
  'blocked' elsewhere; other names pass through.

  platform: the devices the program is built for ("cpu", "gpu", "tpu"); None is
  jax.default_backend(). An ahead-of-time compile for a TPU topology from a CPU host passes "tpu".
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  if (platform or jax.default_backend()) != "gpu":
    return "blocked"
  return "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"


def blocked_attention(q, k, v, *, causal: bool, block: int = DEFAULT_BLOCK):
  """Softmax attention, q/k/v [B, T, H, K] -> [B, T, H, K], one query block at a time.

  Scores, softmax and the sums are float32 whatever the input dtype; the output has q's dtype.
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k, v])
  b, t, h, hd = q.shape
  # Heads lead the batch dims so each score tile is a plain batched [block, keys] matmul.
  q = jnp.transpose(q * jnp.asarray(1 / math.sqrt(hd), q.dtype), (0, 2, 1, 3))  # [B, H, T, K]
  k = jnp.transpose(k, (0, 2, 1, 3))
  v = jnp.transpose(v, (0, 2, 1, 3))
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)  # the last block may be shorter
    stop = end if causal else t  # keys this query block can see
    s = jnp.einsum("bhqk,bhsk->bhqs", q[:, :, start:end], k[:, :, :stop],
                   preferred_element_type=jnp.float32)  # [B, H, end - start, stop]
    if causal:
      s = jnp.where(jnp.tril(jnp.ones((end - start, stop), bool), k=start), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("bhqs,bhsk->bhqk", p, v[:, :, :stop]))
  return jnp.transpose(jnp.concatenate(outs, axis=2), (0, 2, 1, 3))  # [B, T, H, K]


def attention(q, k, v, *, causal: bool, implementation: str = "auto"):
  """q/k/v [B, T, H, K] -> [B, T, H, K] with the named implementation (see `resolve`)."""
  impl = resolve(implementation, q.dtype)
  if impl == "blocked":
    return blocked_attention(q, k, v, causal=causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
