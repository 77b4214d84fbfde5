"""The linear probe as a periodic evaluator of the training loop (`config.evals.probe`)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax.probe import features as features_lib
from igpt_jax.probe import logistic
from igpt_jax.probe import protocol
from igpt_jax.probe import run as run_lib


def make_evaluator(ecfg, config, cfg: model_lib.IGPTConfig, palette, mesh) -> Callable | None:
  """fn(params, step) -> scalars, the probe of the current parameters; None when ecfg.every 0.

  ecfg (config.evals.probe; fields in experiments/base.py): every, train_split / eval_split
  (splits of config.data: a small labelled subset, read once here, config.batch_size rows per
  batch), layers (empty: `protocol.spread_layers`), reading, l2s. Returns scalars
  `probe_accuracy` (held-out, at the layer of least validation loss: `protocol.best_layer`, on
  rows held out of train_split), `probe_layer`, `probe_accuracy_layerNN` per layer,
  `probe_seconds`, and `probe_time_fraction` (of the wall time since the previous call, this
  one included). Call it under the training mesh: every process extracts its rows of each
  batch with the params where they lie (`features.features_fn`, the extraction program of
  every probe), the features are gathered, and every process fits the same L-BFGS probes
  (process 0 logs).
  """
  if not ecfg.every:
    return None
  layers = tuple(ecfg.layers) or protocol.spread_layers(cfg.n_layer)
  model_lib.check_layers(cfg, layers)
  l2s = tuple(ecfg.l2s)
  splits = {name: list(run_lib.checked_batches(config.data, split, palette, cfg.n_px,
                                               config.batch_size))
            for name, split in (("train", ecfg.train_split), ("test", ecfg.eval_split))}
  fn = features_lib.features_fn(cfg, layers, ecfg.reading)
  key = jax.random.key(0)  # BERT models are read unmasked here: the key is not used

  def extract(params, batches):  # -> ({layer: [N, D]}, labels [N]), valid rows of every process
    # All batches are dispatched before any is fetched (a subset's features are small); the
    # gather is collective, so every process takes part.
    outs = [fn(params, sharding_lib.shard_batch({"tokens": b["tokens"]}, mesh)["tokens"], key)
            for b in batches]
    local = [{"layers": features_lib.local_rows(o), "labels": b["labels"], "valid": b["valid"]}
             for o, b in zip(outs, batches)]
    if jax.process_count() > 1:
      local = multihost_utils.process_allgather(local, tiled=True)
    valid = np.concatenate([o["valid"] for o in local]).astype(bool)
    return ({l: np.concatenate([o["layers"][l] for o in local])[valid] for l in layers},
            np.concatenate([o["labels"] for o in local])[valid])

  last_end = [time.perf_counter()]

  def evaluate(params, step: int) -> dict:
    start = time.perf_counter()
    (train_x, train_y), (test_x, test_y) = (extract(params, splits[s]) for s in ("train", "test"))
    records = {l: logistic.linear_probe(train_x[l], train_y, test_x[l], test_y, l2s=l2s)
               for l in layers}
    acc = {l: r["accuracy"] for l, r in records.items()}
    best = protocol.best_layer(records)
    end = time.perf_counter()
    scalars = {"probe_accuracy": acc[best], "probe_layer": best,
               **{f"probe_accuracy_layer{l:02d}": a for l, a in acc.items()},
               "probe_seconds": end - start,
               "probe_time_fraction": (end - start) / (end - last_end[0])}
    last_end[0] = end
    if jax.process_index() == 0:
      logging.info("step %d probe: best layer %d %.2f%% (%s) in %.1f s, %.0f%% of the time",
                   step, best, 100 * acc[best],
                   " ".join(f"{l}:{100 * a:.1f}" for l, a in acc.items()), end - start,
                   100 * scalars["probe_time_fraction"])
    return scalars

  return evaluate
