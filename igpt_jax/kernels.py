"""Attention kernels, q/k/v [B, T, H, K] -> [B, T, H, K]; attention.py dispatches to them.

blocked_attention: causal attention in query blocks, for CPUs (and anywhere no fused kernel
exists). At T = 1024 a plain attention materialises [B, H, T, T] float32 scores and
probabilities, and its backward reads them back: the step is bound by memory traffic, and half
of that work is the masked upper triangle. Here the queries are cut into blocks of `block` rows;
query block i only meets keys [0, (i + 1) * block), so the upper triangle is never computed,
neither forward nor backward (every block has static shapes: the skipped part simply does not
exist). The backward is written out (flash attention's: it recomputes the probabilities from the
saved log-sum-exp, one key block against the queries that see it), which forms fewer tiles than
autodiff of the softmax and stores none between the passes, and the heads run one at a time so
the tiles stay in cache. (With heads split over a `tensor` mesh axis that loop gathers them: the
blocked kernel is for CPUs, where meshes split the batch.)

splash_attention: on TPUs the same problem has a fused answer, Pallas' splash attention (flash
attention with a block-sparse mask: causal tiles above the diagonal are skipped), which never
writes the [T, T] scores to HBM, forward or backward. It is a Mosaic kernel, which XLA cannot
partition, so it runs under `jax.shard_map`: each device gets its slice of the batch and of the
heads, over the mesh axes the logical axis rules in effect map `batch` and `heads` to (flax's
`nn.logical_axis_rules`: ours, sharding.RULES, or a caller's own over a mesh of their own
names), which is how the model shards q/k/v anyway, so no data moves. The Pallas TPU module is
imported on the first splash call, not with this module: a GPU or CPU process never loads it.
"""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 128
SPLASH_BLOCK = 512  # widest splash tile edge (q and kv); see splash_block
SPLASH_ALIGN = 128  # splash tiles are multiples of the MXU's 128 lanes


def _query_blocks(t: int, block: int, causal: bool):
  """(start, end, stop) per query block: rows [start, end) see keys [0, stop)."""
  for start in range(0, t, block):
    end = min(start + block, t)  # the last block may be shorter
    yield start, end, (end if causal else t)


def _key_blocks(t: int, block: int, causal: bool):
  """(start, end, first) per key block: keys [start, end) are seen by queries [first, t)."""
  for start in range(0, t, block):
    yield start, min(start + block, t), (start if causal else 0)


def _blocked_fwd(q, k, v, causal, block):
  """q/k/v [N, T, K] (q pre-scaled) -> (out [N, T, K], residuals with lse [N, T] float32).

  Per query block: e = exp(s - rowmax) [N, q, stop], and the output is divided by its row sums
  after the value matmul ([q, K], not the [q, stop] probabilities). Only the log-sum-exp is kept
  for the backward, which recomputes the probabilities (flash attention's trade: one more
  q k^T matmul instead of storing [T, T / 2] per head and reading it back).
  """
  outs, lses = [], []
  for start, end, stop in _query_blocks(q.shape[1], block, causal):
    s = jnp.einsum("nqk,nsk->nqs", q[:, start:end], k[:, :stop],
                   preferred_element_type=jnp.float32)  # [N, end - start, stop]
    if causal:  # only the last key tile crosses the diagonal, but one select is one pass
      s = jnp.where(jnp.tril(jnp.ones((end - start, stop), bool), k=start), s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)  # masked entries: exactly 0
    l = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("nqs,nsk->nqk", e.astype(v.dtype), v[:, :stop],
                   preferred_element_type=jnp.float32) / l
    outs.append(o.astype(q.dtype))
    lses.append((m + jnp.log(l))[..., 0])
  out = jnp.concatenate(outs, axis=1)
  return out, (q, k, v, out, jnp.concatenate(lses, axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_core(q, k, v, causal, block):
  return _blocked_fwd(q, k, v, causal, block)[0]


def _blocked_bwd(causal, block, res, dout):
  """Flash attention's backward, one key block at a time, on transposed [keys, queries] tiles.

  With p = exp(s - lse) and delta = rowsum(dout * out): dv = p^T dout, ds = p * (dp - delta),
  dk = ds^T q, dq = ds k. Holding p^T and ds^T (keys on rows) makes dv and dk plain matmuls
  and dq^T = k^T ds^T one too: XLA CPU runs a matmul that contracts the rows of a large tile
  several times slower, and transposing the tile costs more still. A key block's dk and dv are
  complete after its one tile; only dq^T [N, K, T] accumulates.
  """
  q, k, v, out, lse = res
  f32 = jnp.float32
  n, t, hd = q.shape
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)  # [N, T]
  dq_t, dk, dv = jnp.zeros((n, hd, t), f32), [], []
  for start, end, first in _key_blocks(t, block, causal):
    q_seen, do_seen = q[:, first:], dout[:, first:]  # the queries these keys meet
    s_t = jnp.einsum("nsk,nqk->nsq", k[:, start:end], q_seen,
                     preferred_element_type=f32)  # [N, end - start, t - first]
    if causal:  # key start + i is seen by query first + j = start + j iff i <= j
      s_t = jnp.where(jnp.triu(jnp.ones((end - start, t - first), bool)), s_t, -jnp.inf)
    p_t = jnp.exp(s_t - lse[:, None, first:])
    dp_t = jnp.einsum("nsk,nqk->nsq", v[:, start:end], do_seen, preferred_element_type=f32)
    ds_t = (p_t * (dp_t - delta[:, None, first:])).astype(q.dtype)
    dv.append(jnp.einsum("nsq,nqk->nsk", p_t.astype(v.dtype), do_seen,
                         preferred_element_type=f32))
    dk.append(jnp.einsum("nsq,nqk->nsk", ds_t, q_seen, preferred_element_type=f32))
    dq_t = dq_t.at[:, :, first:].add(jnp.einsum("nsk,nsq->nkq", k[:, start:end], ds_t,
                                                preferred_element_type=f32))
  cat = lambda parts, like: jnp.concatenate(parts, axis=1).astype(like.dtype)
  return jnp.swapaxes(dq_t, 1, 2).astype(q.dtype), cat(dk, k), cat(dv, v)


_blocked_core.defvjp(lambda q, k, v, causal, block: _blocked_fwd(q, k, v, causal, block),
                     _blocked_bwd)


def blocked_attention(q, k, v, *, causal: bool, block: int = DEFAULT_BLOCK):
  """Softmax attention, q/k/v [B, T, H, K] -> [B, T, H, K], one query block at a time.

  Scores, softmax and the sums are float32 whatever the input dtype; the output has q's dtype.
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k, v])
  b, t, h, hd = q.shape
  # One head at a time (lax.map over H, the batch inside): each step's [B, block, keys] score
  # tiles stay in cache between the matmul, the softmax and the next matmul.
  heads = lambda x: jnp.transpose(x, (2, 0, 1, 3))  # [B, T, H, K] -> [H, B, T, K]
  q = q * jnp.asarray(1 / math.sqrt(hd), q.dtype)
  out = jax.lax.map(lambda x: _blocked_core(*x, causal, block), (heads(q), heads(k), heads(v)))
  return jnp.transpose(out, (1, 2, 0, 3))  # [H, B, T, K] -> [B, T, H, K]


def splash_block(t: int, largest: int = SPLASH_BLOCK) -> int:
  """The splash tile edge for sequence length t: the widest multiple of 128 up to `largest`
  that divides t (512 at T = 1024 and 4096, 384 at 48x48's T = 2304, T itself below 512)."""
  fits = [b for b in range(SPLASH_ALIGN, min(largest, t) + 1, SPLASH_ALIGN) if t % b == 0]
  if not fits:
    raise ValueError(f"splash attention needs a sequence length that is a multiple of "
                     f"{SPLASH_ALIGN}, got {t} (attention='xla' takes any length)")
  return fits[-1]


def _splash_local(q, k, v, *, causal: bool, block: int, interpret: bool):
  """Splash attention on one device's shard, q/k/v [b, T, h, K] -> [b, T, h, K]."""
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  _, t, h, hd = q.shape
  block = splash_block(t, block)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block,
                            block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.CausalMask((t, t)) if causal else splash.FullMask((t, t))
  kernel = splash.make_splash_mha_single_device(
      splash.MultiHeadMask([mask] * h), block_sizes=sizes, interpret=interpret)
  # The kernel takes one example, heads leading ([h, T, K]), and does not scale the scores.
  heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [b, T, h, K] <-> [b, h, T, K]
  q = q * jnp.asarray(1 / math.sqrt(hd), q.dtype)
  return heads_first(jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v)))


def splash_spec(mesh) -> jax.sharding.PartitionSpec:
  """How splash splits q/k/v [B, T, H, K] over mesh: batch and heads as the logical axis rules
  in effect map them (axes the mesh lacks left out), T and K whole."""
  spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  present = lambda axes: tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
                               if a in mesh.axis_names) or None
  return jax.sharding.PartitionSpec(present(spec[0]), None, present(spec[2]), None)


def splash_attention(q, k, v, *, causal: bool, block: int = SPLASH_BLOCK, interpret: bool = False):
  """Pallas splash attention (TPU), q/k/v [B, T, H, K] -> [B, T, H, K], on any mesh.

  Under a mesh (`jax.set_mesh`) the kernel runs per device inside `jax.shard_map`, with the batch
  and the heads split as the logical axis rules in effect say (`splash_spec`; without rules
  every device computes all of it); T must then be whole on each device. `block` is the widest
  tile edge (see `splash_block`). interpret=True runs the kernel's Pallas interpreter (any
  backend; slow; for tests).
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k, v])
  local = functools.partial(_splash_local, causal=causal, block=block, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v)
  spec = splash_spec(mesh)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
