"""The streaming probe: logistic regression by minibatch SGD over feature shards on disk.

The paper's ImageNet probe: SGD with momentum 0.9 and a cosine learning-rate schedule, on the
objective of the L-BFGS probe (mean cross-entropy + l2/2 |W|^2 on standardised features). A
split is never held in memory: rows are read `chunk_rows` at a time from the shards
(`features.read_shard`, by offset, local or gs://), so memory holds a chunk, a minibatch and
the classifiers, whatever the split's size.

  stream_probe(feat_dir, names, mesh=..., lrs=..., l2s=..., epochs=...) -> result record

Every (lr, l2) of the grid is trained at once in one pass over the data (the classifiers are
stacked [G, F, C]): G times the arithmetic, one read. A held-out `val_fraction` of the train
rows (drawn per shard from the seed) picks the pair of least validation cross-entropy; its
classifier, trained on the other rows, is scored on the test split. Training is data parallel
over the mesh: the global minibatch is split over its batch axes (each process reads its own
shards, `process % process_count`), the classifiers are replicated, XLA averages the
gradients. Scoring runs on each process's own rows and sums the counts over processes.

Shuffling is by shard order and within each chunk, from (seed, epoch): features of a split
written in its file order keep that order's coarse structure within a chunk.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from igpt_jax import paths
from igpt_jax import sharding as sharding_lib
from igpt_jax.probe import features as features_lib

MOMENTUM = 0.9
# Steps dispatched ahead of the device at most: each holds its minibatch, so an unbounded queue
# (a host that reads faster than the device trains) would hold the split after all.
IN_FLIGHT = 4


def _own_shards(feat_dir, split: str) -> list[dict]:
  found = features_lib.shards(feat_dir, split)
  if not found:
    raise FileNotFoundError(f"no complete feature shards of split {split!r} in {feat_dir}")
  return [s for s in found if s["process"] % jax.process_count() == jax.process_index()]


def _held_out(shard: dict, val_fraction: float, seed: int) -> np.ndarray:
  """Bool [rows]: the shard's rows held out of the fit to choose (lr, l2)."""
  rng = np.random.default_rng([seed, shard["process"], shard["shard"]])
  return rng.random(shard["rows"]) < val_fraction


def _chunks(feat_dir, split: str, names, shard: dict, chunk_rows: int) -> Iterator[tuple]:
  """(lo, x [n, F], y [n]) for consecutive row ranges of a shard."""
  labels = features_lib.read_shard(feat_dir, split, ["labels"], shard)
  for lo in range(0, shard["rows"], chunk_rows):
    hi = min(lo + chunk_rows, shard["rows"])
    yield lo, features_lib.read_shard(feat_dir, split, names, shard, lo, hi), labels[lo:hi]


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x
  return np.sum(multihost_utils.process_allgather(x), axis=0)


def _statistics(feat_dir, split: str, names, shards, masks, chunk_rows: int):
  """(mean [F], std [F], fit rows, largest label) over the fit rows of every process."""
  total = sq = None
  n, top = 0, 0
  for shard, held in zip(shards, masks):
    for lo, x, y in _chunks(feat_dir, split, names, shard, chunk_rows):
      x = np.asarray(x, np.float32)[~held[lo:lo + len(x)]]
      part, part_sq = x.sum(0, dtype=np.float64), np.einsum("nf,nf->f", x, x).astype(np.float64)
      total = part if total is None else total + part
      sq = part_sq if sq is None else sq + part_sq
      n += len(x)
      top = max(top, int(y.max(initial=0)))
  total, sq = _sum_over_processes(total), _sum_over_processes(sq)
  n = int(_sum_over_processes(np.int64(n)))
  top = int(np.max(multihost_utils.process_allgather(np.int64(top)))) if (
      jax.process_count() > 1) else top
  mean = total / n
  std = np.sqrt(np.maximum(sq / n - mean ** 2, 0.0)) + 1e-6
  return mean.astype(np.float32), std.astype(np.float32), n, top


def _minibatches(feat_dir, split: str, names, shards, masks, batch: int, chunk_rows: int,
                 seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's fit rows as (x [batch, F], y [batch]), epoch after epoch, forever."""
  x_left = y_left = None
  for epoch in itertools.count():
    rng = np.random.default_rng([seed, epoch])
    for i in rng.permutation(len(shards)):
      for lo, x, y in _chunks(feat_dir, split, names, shards[i], chunk_rows):
        keep = np.flatnonzero(~masks[i][lo:lo + len(x)])
        keep = keep[rng.permutation(len(keep))]
        x, y = x[keep], y[keep]
        if x_left is not None:
          x, y = np.concatenate([x_left, x]), np.concatenate([y_left, y])
        full = len(x) // batch * batch
        for a in range(0, full, batch):
          yield x[a:a + batch], y[a:a + batch]
        x_left, y_left = x[full:], y[full:]


def _logits(params, x, mean, std):
  x = (x.astype(jnp.float32) - mean) / std
  return jnp.einsum("bf,gfc->gbc", x, params["w"]) + params["b"][:, None]  # [G, B, C]


def _train_step(total_steps: int):
  def step(params, momentum, x, y, t, lrs, l2s, mean, std):
    def loss(p):  # candidates are independent: the sum's gradient is each one's own
      ce = optax.softmax_cross_entropy_with_integer_labels(_logits(p, x, mean, std), y[None])
      return jnp.sum(ce.mean(-1) + 0.5 * l2s * jnp.sum(p["w"] ** 2, axis=(1, 2)))
    grads = jax.grad(loss)(params)
    lr = lrs * 0.5 * (1.0 + jnp.cos(jnp.pi * t / total_steps))  # [G]
    momentum = jax.tree.map(lambda m, g: MOMENTUM * m + g, momentum, grads)
    scale = {"w": lr[:, None, None], "b": lr[:, None]}
    params = jax.tree.map(lambda p, m, s: p - s * m, params, momentum, scale)
    return params, momentum
  return jax.jit(step, donate_argnums=(0, 1))


@jax.jit
def _scores(params, x, y, weight, mean, std):
  """Per candidate: (summed cross-entropy [G], correct rows [G]) over the weighted rows."""
  logits = _logits(params, x, mean, std)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None])
  correct = (jnp.argmax(logits, -1) == y[None]).astype(jnp.float32)
  return jnp.sum(ce * weight, -1), jnp.sum(correct * weight, -1)


def _score(params, feat_dir, split, names, shards, masks, chunk_rows, mean, std):
  """{"fit" | "val": (ce sum [G], correct [G], rows)} over the split's rows of every process
  (test: all rows count as "fit"). Runs on this process's first device, no collectives."""
  device = jax.local_devices()[0]
  params = jax.device_put(jax.device_get(params), device)
  g = params["b"].shape[0]
  sums = {k: np.zeros((3, g)) for k in ("fit", "val")}
  for shard, held in zip(shards, masks):
    for lo, x, y in _chunks(feat_dir, split, names, shard, chunk_rows):
      pad = chunk_rows - len(x)  # one compile: every chunk padded to chunk_rows
      xs = np.pad(x, ((0, pad), (0, 0)))
      ys = np.pad(np.asarray(y, np.int32), (0, pad))
      h = np.pad(held[lo:lo + len(x)], (0, pad))
      real = np.arange(chunk_rows) < len(x)
      for key, weight in (("fit", real & ~h), ("val", real & h)):
        ce, ok = _scores(params, xs, ys, weight.astype(np.float32), mean, std)
        sums[key] += np.stack([np.asarray(ce), np.asarray(ok), np.full(g, weight.sum())])
  return {k: _sum_over_processes(v) for k, v in sums.items()}


def stream_probe(feat_dir: paths.PathLike, names: Sequence, *, mesh: Mesh,
                 lrs: Sequence[float] = (0.1,), l2s: Sequence[float] = (1e-4,),
                 epochs: int = 10, batch_size: int = 1024, val_fraction: float = 0.04,
                 chunk_rows: int = 8192, seed: int = 0, n_classes: int | None = None,
                 on_epoch: Callable[[int, float], object] | None = None,
                 train: str = "train", test: str = "test") -> dict:
  """Fits the probe of features `names` (concatenated along F) of the shards of split `train`
  of feat_dir (a feature set's directory, `features.feature_set`), scored on split `test`.

  batch_size: the global minibatch (divides over the processes and the mesh's batch shards).
  One epoch = the fit rows once over (every process taking batch_size / processes of its own).
  on_epoch(epoch, seconds) is called after each epoch (a progress bar, a benchmark).
  Returns the L-BFGS probe's record ({"accuracy", "l2", "val_loss" {l2: least over lrs},
  "val_accuracy" {l2: at that lr}, "chosen_val_loss", "chosen_val_accuracy",
  "train_accuracy", "iterations"}) plus "solver": "sgd",
  "lr", and "grid": [{"lr", "l2", "val_loss", "val_accuracy"}].
  """
  names = list(names)
  lrs, l2s = [float(v) for v in lrs], [float(v) for v in l2s]
  grid = list(itertools.product(lrs, l2s))
  sharding_lib.check_batch_size(batch_size, mesh)
  train_split, test_split = train, test
  train = _own_shards(feat_dir, train_split)
  test = _own_shards(feat_dir, test_split)
  masks = [_held_out(s, val_fraction, seed) for s in train]
  mean, std, n_fit, top = _statistics(feat_dir, train_split, names, train, masks, chunk_rows)
  n_classes = n_classes or top + 1
  steps_per_epoch = n_fit // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{n_fit} fit rows of {names} in {feat_dir} make no minibatch of "
                     f"{batch_size}")
  total = epochs * steps_per_epoch
  dim = len(mean)

  replicated = sharding_lib.replicated(mesh)
  zeros = {"w": np.zeros((len(grid), dim, n_classes), np.float32),
           "b": np.zeros((len(grid), n_classes), np.float32)}
  params = jax.device_put(zeros, replicated)  # host arrays: two puts are two buffers (donated)
  momentum = jax.device_put(zeros, replicated)
  constants = jax.device_put((np.array([g[0] for g in grid], np.float32),
                              np.array([g[1] for g in grid], np.float32), mean, std), replicated)
  step = _train_step(total)
  batches = _minibatches(feat_dir, train_split, names, train, masks,
                         batch_size // jax.process_count(), chunk_rows, seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
    for epoch in range(epochs):
      start = time.perf_counter()
      for t in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
        x, y = next(batches)
        batch = sharding_lib.shard_batch({"x": x, "y": np.asarray(y, np.int32)}, mesh)
        params, momentum = step(params, momentum, batch["x"], batch["y"], np.float32(t),
                                *constants)
        if t % IN_FLIGHT == 0:
          jax.block_until_ready(params)
      jax.block_until_ready(params)
      if on_epoch is not None:
        on_epoch(epoch, time.perf_counter() - start)

  on_train = _score(params, feat_dir, train_split, names, train, masks, chunk_rows, mean, std)
  on_test = _score(params, feat_dir, test_split, names, test,
                   [np.zeros(s["rows"], bool) for s in test], chunk_rows, mean, std)
  ce_sum, correct, rows = on_train["val"]
  val_loss, val_acc = ce_sum / np.maximum(rows, 1), correct / np.maximum(rows, 1)
  table = [{"lr": lr, "l2": l2, "val_loss": float(val_loss[i]), "val_accuracy": float(val_acc[i])}
           for i, (lr, l2) in enumerate(grid)]
  best = min(range(len(grid)), key=lambda i: (val_loss[i], -grid[i][1], grid[i][0]))
  by_l2 = {l2: min((r for r in table if r["l2"] == l2), key=lambda r: r["val_loss"])
           for l2 in l2s}
  fit_ce, fit_ok, fit_rows = on_train["fit"]
  _, test_ok, test_rows = on_test["fit"]
  return {"accuracy": float(test_ok[best] / test_rows[best]), "l2": grid[best][1],
          "val_loss": {l2: r["val_loss"] for l2, r in by_l2.items()},
          "val_accuracy": {l2: r["val_accuracy"] for l2, r in by_l2.items()},
          "chosen_val_loss": float(val_loss[best]), "chosen_val_accuracy": float(val_acc[best]),
          "train_accuracy": float(fit_ok[best] / fit_rows[best]), "iterations": total,
          "solver": "sgd", "lr": grid[best][0], "grid": table,
          "n_fit": int(fit_rows[best]), "n_val": int(rows[best])}


def lbfgs_bytes(n_rows: int, dim: int) -> int:
  """Memory the L-BFGS probe needs for a split of n_rows x dim: its float32 features twice
  (the split and its standardised copy)."""
  return 2 * 4 * n_rows * dim


def solver_for(solver: str, n_rows: int, dim: int, max_bytes: float) -> str:
  """"lbfgs" or "sgd": `solver` itself, or for "auto" L-BFGS while `lbfgs_bytes` <= max_bytes."""
  if solver not in ("lbfgs", "sgd", "auto"):
    raise ValueError(f"probe solver {solver!r}; expected 'lbfgs', 'sgd' or 'auto'")
  if solver != "auto":
    return solver
  return "lbfgs" if lbfgs_bytes(n_rows, dim) <= max_bytes else "sgd"

