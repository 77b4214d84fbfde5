"""The attentive probe: a learned attention-pooling head over a layer's frozen token features.

As AIM evaluates autoregressive image models (El-Nouby et al., 2024): Q learned queries attend,
with H heads, over the frozen per-token features x [T, D] of the chosen layer (or the mean of
the k best layers' tokens, `features.token_features`), standardised per channel with the fit
rows' statistics; the heads' outputs (values projected to D) are averaged over the queries and a
linear classifier reads them. AdamW, learning rate warmed up then cosine to zero. Every (lr,
weight decay) of the grid trains at once (G heads stacked on a leading axis, one pass over the
data); the pair of least cross-entropy on the validation rows held out of train is scored on the
test split, without a refit (as the streaming linear probe).

  attentive_probe(acfg, data_cfg, splits, cfg, params, palette, layers, mesh) -> result record
  fit_heads(train, test, embed, frozen, mesh, ...)                          -> the same, on rows

Rows are read per batch shard of the mesh, not per process: shard d of S reads part d of S of a
split (`data.make_dataset(process_index=d, process_count=S)`), and each process holds the shards
of its own devices. Every global batch is then the same rows in the same places whatever the
number of processes, so 2 processes of 1 device train what 1 process of 2 devices does.

The head is fed in one of two ways (`mode`):
  "memory": each process extracts its shards' token features once and keeps them in host memory
            (rows x T x D x 4 bytes; the CIFAR demo's 15,000 x 64 x 192: 0.74 GB);
  "joint":  each train step runs the frozen model on the batch's tokens and trains the head on
            its output, in one jitted program over the mesh (host memory: rows x T x 2 bytes),
            for splits whose features do not fit;
  "auto":   "memory" while it needs at most `max_bytes` on a process.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from igpt_jax import console
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib
from igpt_jax.probe import features as features_lib

MODES = ("auto", "memory", "joint")


def init_head(key, dim: int, n_classes: int, heads: int, queries: int) -> dict:
  """One head: queries [Q, H, K], key and value maps [D, H, K] (K = D / H), a zero classifier
  w [D, C] and bias b [C]."""
  if dim % heads:
    raise ValueError(f"the attentive probe's {heads} heads do not divide the feature width {dim}")
  k = dim // heads
  kq, kk, kv = jax.random.split(key, 3)
  return {"query": 0.02 * jax.random.normal(kq, (queries, heads, k)),
          "wk": jax.random.normal(kk, (dim, heads, k)) / math.sqrt(dim),
          "wv": jax.random.normal(kv, (dim, heads, k)) / math.sqrt(dim),
          "w": jnp.zeros((dim, n_classes)), "b": jnp.zeros((n_classes,))}


def head_logits(p: dict, x) -> jax.Array:
  """Class logits [B, C] of one head on standardised token features x [B, T, D]."""
  q, h, k = p["query"].shape
  # q . (W_k x_t) = (W_k^T q) . x_t and sum_t a_t W_v x_t = W_v (sum_t a_t x_t): attending in the
  # feature space costs T x D per head and query rather than T x D x K for the keys and values.
  u = jnp.einsum("qhk,dhk->qhd", p["query"], p["wk"]) / math.sqrt(k)
  attention = jax.nn.softmax(jnp.einsum("qhd,btd->bqht", u, x), axis=-1)
  pooled = jnp.einsum("bqht,btd->bqhd", attention, x)
  out = jnp.einsum("bqhd,dhk->bqhk", pooled, p["wv"]).reshape(x.shape[0], q, h * k).mean(1)
  return out @ p["w"] + p["b"]


def _optimizer(lr, weight_decay, total_steps: int, warmup_steps: int):
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps, total_steps)
  return optax.adamw(lambda count: lr * schedule(count), weight_decay=weight_decay,
                     mask=lambda p: {k: k != "b" for k in p})


def _logits(params, x):  # stacked heads [G, ...], x [B, T, D] -> [G, B, C]
  return jax.vmap(head_logits, in_axes=(0, None))(params, x)


@functools.lru_cache(maxsize=16)
def _programs(embed: Callable, total_steps: int, warmup_steps: int):
  """(train step, row scores, row sums) jitted; embed(frozen, x) -> raw features [B, T, D]."""

  def step(params, state, frozen, x, y, mean, std, lrs, wds):
    feats = (embed(frozen, x) - mean) / std

    def loss(p):  # the heads are independent: the sum's gradient is each one's own
      ce = optax.softmax_cross_entropy_with_integer_labels(_logits(p, feats), y[None])
      return jnp.sum(ce.mean(-1))

    grads = jax.grad(loss)(params)

    def update(g, s, p, lr, wd):
      updates, s = _optimizer(lr, wd, total_steps, warmup_steps).update(g, s, p)
      return optax.apply_updates(p, updates), s
    return jax.vmap(update)(grads, state, params, lrs, wds)

  def rows_of(*xs):  # per-row outputs stay split over the batch axes, as their inputs
    return tuple(nn.with_logical_constraint(x, ("batch", None)) for x in xs)

  def scores(params, frozen, x, y, mean, std):  # per row: (CE [B, G], correct [B, G])
    logits = _logits(params, (embed(frozen, x) - mean) / std)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None])
    return rows_of(ce.T, (jnp.argmax(logits, -1) == y[None]).astype(jnp.float32).T)

  def sums(frozen, x):  # per row: sums over the tokens of f and f^2, [B, D] each
    f = embed(frozen, x)
    return rows_of(jnp.sum(f, 1), jnp.sum(f * f, 1))

  return (jax.jit(step, donate_argnums=(0, 1)), jax.jit(scores), jax.jit(sums))


# -- rows, per batch shard ---------------------------------------------------------------------

def local_shards(mesh) -> list[int]:
  """The batch shards (of `sharding.batch_shards(mesh)`) whose rows this process supplies: a
  process's rows of a global batch are the shards p * S / P .. (p + 1) * S / P - 1."""
  total, count = sharding_lib.batch_shards(mesh), jax.process_count()
  if total % count:
    raise ValueError(f"the {total} batch shards of mesh {dict(mesh.shape)} do not split over "
                     f"{count} processes")
  per = total // count
  return list(range(jax.process_index() * per, (jax.process_index() + 1) * per))


def read_shards(data_cfg, split: str, palette, n_px: int, rows: int, mesh) -> list[dict]:
  """This process's batch shards of a split: [{"x": uint16 tokens [n, T], "y" [n], "valid" [n]}]
  (n: the largest shard's rows rounded up to `rows`; padding rows not valid)."""
  from igpt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  total = sharding_lib.batch_shards(mesh)
  out = []
  for d in local_shards(mesh):
    batches = list(data_lib.make_dataset(data_cfg, split=split, batch_size=rows * total,
                                         palette=palette, n_px=n_px, train=False,
                                         process_index=d, process_count=total))
    out.append({"x": np.concatenate([b["tokens"] for b in batches]).astype(np.uint16),
                "y": np.concatenate([b["labels"] for b in batches]).astype(np.int32),
                "valid": np.concatenate([b["valid"] for b in batches]).astype(bool)})
  return out


def _chunks(shards: Sequence[dict], rows: int):
  """Global batches in order: (lo, this process's x [S_local * rows, ...]), every shard's rows
  [lo, lo + rows) side by side (all shards have the same length)."""
  n = len(shards[0]["x"])
  for lo in range(0, n, rows):
    yield lo, np.concatenate([_pad(s["x"][lo:lo + rows], rows) for s in shards])


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if (
      len(x) < rows) else x


def _gathered(x: np.ndarray) -> np.ndarray:
  """[P, ...]: every process's x (int64 or float64), stacked in process order. Sent as raw
  32-bit words: without jax_enable_x64, 64-bit values would arrive cut to 32 bits."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  words = multihost_utils.process_allgather(np.ascontiguousarray(x).view(np.uint32))
  return np.asarray(words, np.uint32).view(x.dtype)


def _job_max(value: int) -> int:
  return int(np.max(_gathered(np.array([value], np.int64))))


def _over_shards(per_shard: np.ndarray) -> np.ndarray:
  """Sums [S_local, ...] per-shard sums over every shard of the job, in shard order (float64):
  the same additions whatever the number of processes."""
  stacked = _gathered(np.asarray(per_shard, np.float64))
  return np.sum(stacked.reshape(-1, *stacked.shape[2:]), axis=0)


def extract_tokens(shards: list[dict], cfg: model_lib.IGPTConfig, params, layers, mesh,
                   rows: int, on_rows: Callable[[int], object] | None = None) -> list[dict]:
  """The shards with their tokens replaced by token features float32 [n, T, D] (in memory)."""
  params = jax.device_put(params, steps_lib.param_shardings(cfg, mesh))
  fn = jax.jit(functools.partial(features_lib.token_features, cfg, layers=tuple(layers)))
  parts = [[] for _ in shards]

  def run(item):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
      return fn(params, sharding_lib.shard_batch({"t": item[1].astype(np.int32)}, mesh)["t"])

  for (lo, _), feats in features_lib.pipelined(run, _chunks(shards, rows)):
    for part, shard, f in zip(parts, shards, np.split(feats, len(shards))):
      part.append(f[:len(shard["x"][lo:lo + rows])])
    if on_rows is not None:
      on_rows(int(sum(s["valid"][lo:lo + rows].sum() for s in shards)))
  return [{**s, "x": np.concatenate(p)} for s, p in zip(shards, parts)]


# -- training ---------------------------------------------------------------------------------

def fit_heads(train: list[dict], test: list[dict], embed: Callable, frozen, mesh, *,
              n_classes: int, dim: int, heads: int, queries: int = 1,
              lrs: Sequence[float] = (1e-3,), weight_decays: Sequence[float] = (0.05,),
              epochs: int = 10, batch_size: int = 256, warmup_fraction: float = 0.1,
              val_fraction: float = 0.1, seed: int = 0, desc: str = "attentive probe") -> dict:
  """Trains the (lr, weight decay) grid of heads on this process's batch shards of train.

  train, test: `read_shards`-like lists, one per local shard (`local_shards(mesh)`), "x" rows
  that embed(frozen, x [B, ...]) turns into token features [B, T, D] inside the jitted programs
  (identity on stored features; the frozen model on tokens). frozen: what embed reads, laid out
  on mesh (None for stored features). batch_size: the global minibatch (its share per shard:
  batch_size / S). A held-out val_fraction of each shard's train rows (drawn from (seed,
  shard)) chooses the pair. desc: the progress line's. Returns {"accuracy" (test, chosen
  pair), "lr", "weight_decay", "chosen_val_loss", "chosen_val_accuracy", "train_accuracy" (fit
  rows), "grid": [{"lr", "weight_decay", "val_loss", "val_accuracy"}], "n_fit", "n_val",
  "n_test", "steps"}.
  """
  total_shards = sharding_lib.batch_shards(mesh)
  sharding_lib.check_batch_size(batch_size, mesh)
  ids = local_shards(mesh)
  rows = batch_size // total_shards
  held = [np.random.default_rng([seed, d]).random(len(s["y"])) < val_fraction for d, s in
          zip(ids, train)]
  fit = [s["valid"] & ~h for s, h in zip(train, held)]
  val = [s["valid"] & h for s, h in zip(train, held)]
  grid = list(itertools.product([float(v) for v in lrs], [float(v) for v in weight_decays]))
  fewest = -_job_max(-min(int(f.sum()) for f in fit))
  steps_per_epoch = fewest // rows
  if steps_per_epoch < 1:
    raise ValueError(f"a batch shard holds {fewest} fit rows: no minibatch of {rows} per shard "
                     f"(batch_size {batch_size} over {total_shards} shards)")
  total = epochs * steps_per_epoch
  step, scores, sums = _programs(embed, total, max(1, round(warmup_fraction * total)))
  replicated = sharding_lib.replicated(mesh)

  def on_mesh(x):
    return sharding_lib.shard_batch({"x": x}, mesh)["x"]

  def per_row(fn, shards, *args):  # (lo, [outputs split by shard]) for every global batch
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
      for lo, x in _chunks(shards, rows):
        y = np.concatenate([_pad(s["y"][lo:lo + rows], rows) for s in shards])
        out = features_lib.local_rows(fn(x, on_mesh(y)))
        yield lo, [[np.asarray(o)[i * rows:(i + 1) * rows] for o in out]
                   for i in range(len(shards))]

  # Per-channel statistics of the fit rows' tokens (BatchNorm without its affine, frozen).
  moments = np.zeros((len(train), 3, dim))
  for lo, parts in per_row(lambda x, y: sums(frozen, on_mesh(x)), train):
    for i, (s, s2) in enumerate(parts):
      w = _pad(fit[i][lo:lo + rows], rows).astype(np.float64)
      moments[i, 0] += w @ s.astype(np.float64)
      moments[i, 1] += w @ s2.astype(np.float64)
      moments[i, 2] += w.sum() * train[i]["x"].shape[1]  # tokens counted
  s, s2, n = _over_shards(moments)
  mean = s / n
  std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0)) + 1e-6
  mean, std = jax.device_put((mean.astype(np.float32), std.astype(np.float32)), replicated)

  one = init_head(jax.random.key(seed), dim, n_classes, heads, queries)
  params = jax.device_put(jax.tree.map(lambda a: np.stack([np.asarray(a)] * len(grid)), one),
                          replicated)
  state = jax.device_put(jax.vmap(_optimizer(1.0, 0.0, total, 1).init)(params), replicated)
  hyper = jax.device_put((np.array([g[0] for g in grid], np.float32),
                          np.array([g[1] for g in grid], np.float32)), replicated)
  bar = console.progress(desc=f"{desc}: {len(grid)} heads at once", total=total, unit="step")
  with bar, jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
    for epoch in range(epochs):
      order = [np.random.default_rng([seed, epoch, d]).permutation(np.flatnonzero(f))
               for d, f in zip(ids, fit)]
      for t in range(steps_per_epoch):
        picks = [o[t * rows:(t + 1) * rows] for o in order]
        x = np.concatenate([s["x"][p] for s, p in zip(train, picks)])
        y = np.concatenate([s["y"][p] for s, p in zip(train, picks)])
        batch = sharding_lib.shard_batch({"x": x, "y": y}, mesh)
        params, state = step(params, state, frozen, batch["x"], batch["y"], mean, std, *hyper)
        bar.update(1)

  def totals(shards, masks):  # [3, G]: summed CE, correct rows, rows, over every shard
    out = np.zeros((len(shards), 3, len(grid)))
    fn = lambda x, y: scores(params, frozen, on_mesh(x), y, mean, std)
    for lo, parts in per_row(fn, shards):
      for i, (ce, ok) in enumerate(parts):
        w = _pad(masks[i][lo:lo + rows], rows).astype(np.float64)
        out[i] += np.stack([w @ ce, w @ ok, np.full(len(grid), w.sum())])
    return _over_shards(out)

  val_ce, val_ok, n_val = totals(train, val)
  _, fit_ok, n_fit = totals(train, fit)
  _, test_ok, n_test = totals(test, [s["valid"] for s in test])
  val_loss, val_acc = val_ce / np.maximum(n_val, 1), val_ok / np.maximum(n_val, 1)
  best = min(range(len(grid)), key=lambda i: (val_loss[i], i))
  return {"accuracy": float(test_ok[best] / n_test[best]), "lr": grid[best][0],
          "weight_decay": grid[best][1], "chosen_val_loss": float(val_loss[best]),
          "chosen_val_accuracy": float(val_acc[best]),
          "train_accuracy": float(fit_ok[best] / n_fit[best]),
          "grid": [{"lr": lr, "weight_decay": wd, "val_loss": float(val_loss[i]),
                    "val_accuracy": float(val_acc[i])} for i, (lr, wd) in enumerate(grid)],
          "n_fit": int(n_fit[best]), "n_val": int(n_val[best]), "n_test": int(n_test[best]),
          "steps": total}


def _stored(frozen, x):
  del frozen
  return x.astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _frozen_forward(cfg: model_lib.IGPTConfig, layers: tuple[int, ...]) -> Callable:
  def embed(frozen, tokens):
    return features_lib.token_features(cfg, frozen, tokens.astype(jnp.int32), layers)
  return embed


def memory_bytes(shards: Sequence[dict], dim: int) -> int:
  """Host memory the "memory" mode holds for these shards' token features (float32)."""
  return sum(s["x"].shape[0] * s["x"].shape[1] * dim * 4 for s in shards)


def attentive_probe(acfg, data_cfg, splits: dict, cfg: model_lib.IGPTConfig, params, palette,
                    layers: Sequence[int], mesh, *, val_fraction: float = 0.1) -> dict:
  """The attentive probe of the mean token features of `layers` (config.attentive, fields in
  experiments/probe_base.py) on splits {"train": split, "test": split} of data_cfg.

  params: the model's (laid out over mesh by `checkpoint.load(..., mesh=)`, or put there).
  Returns `fit_heads`'s record plus "layers", "mode" and "memory_bytes_per_process" (what
  "memory" needs, or holds, on the process of most rows).
  """
  if acfg.mode not in MODES:
    raise ValueError(f"attentive.mode {acfg.mode!r}; expected one of {MODES}")
  sharding_lib.check_batch_size(acfg.batch_size, mesh)
  rows = acfg.batch_size // sharding_lib.batch_shards(mesh)
  data = {role: read_shards(data_cfg, split, palette, cfg.n_px, rows, mesh)
          for role, split in splits.items()}
  need = _job_max(sum(memory_bytes(s, cfg.n_embd) for s in data.values()))  # all agree
  mode = acfg.mode if acfg.mode != "auto" else (
      "memory" if need <= acfg.max_bytes else "joint")
  layers = tuple(sorted(int(l) for l in layers))
  named = ", ".join(map(str, layers))
  params = jax.device_put(params, steps_lib.param_shardings(cfg, mesh))
  if mode == "memory":
    embed, frozen = _stored, None
    for role, shards in data.items():
      images = int(_over_shards(np.array([s["valid"].sum() for s in shards])))
      with console.progress(desc=f"token features of {role} ({splits[role]}, layers "
                                 f"{named})", unit="img", total=images) as bar:
        data[role] = extract_tokens(shards, cfg, params, layers, mesh, rows, on_rows=bar.update)
  else:
    embed, frozen = _frozen_forward(cfg, layers), params
  n_classes = 1 + _job_max(max(int(s["y"][s["valid"]].max(initial=0))
                               for shards in data.values() for s in shards))
  record = fit_heads(data["train"], data["test"], embed, frozen, mesh, n_classes=n_classes,
                     dim=cfg.n_embd, heads=acfg.heads or cfg.n_head, queries=acfg.queries,
                     lrs=tuple(acfg.lrs), weight_decays=tuple(acfg.weight_decays),
                     epochs=acfg.epochs, batch_size=acfg.batch_size,
                     warmup_fraction=acfg.warmup_fraction, val_fraction=val_fraction,
                     desc=f"attentive probe of layers {named} ({mode})")
  return {**record, "layers": list(layers), "mode": mode, "memory_bytes_per_process": need}
