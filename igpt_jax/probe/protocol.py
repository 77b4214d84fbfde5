"""The paper's probe protocol: a table over layers, k layers concatenated, low-data subsets.

Each takes `fit(names) -> result`, a probe of the features `names` (one layer, or several
concatenated along F) by whichever solver the run chose (`run.py`), so the tables read the
same for the in-memory L-BFGS probe and the streaming SGD one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from igpt_jax.probe import logistic

LOW_DATA_SIZES = (40, 250, 4000)


BEST_LAYER_BY = ("val_loss", "val_accuracy")


def ranked_layers(records: Mapping[int, dict], by: str = "val_loss") -> list[int]:
  """The layers, best first, by how their probes did on their validation rows (held out of
  train): least cross-entropy ("val_loss") or highest accuracy ("val_accuracy"), each at the
  probe's chosen hyperparameters; ties go to the lower layer. The test split is never read."""
  if by not in BEST_LAYER_BY:
    raise ValueError(f"best_layer_by={by!r}; expected one of {BEST_LAYER_BY}")
  sign = 1 if by == "val_loss" else -1
  return sorted(records, key=lambda l: (sign * records[l][f"chosen_{by}"], l))


def best_layer(records: Mapping[int, dict], by: str = "val_loss") -> int:
  """The first of `ranked_layers`."""
  return ranked_layers(records, by)[0]


def probe_layers(fit: Callable[[list[int]], dict], layers: Iterable[int],
                 by: str = "val_loss") -> dict:
  """Probes every layer: fit([layer]) each. -> {"layers": {layer: probe result}, "best_layer"
  (chosen on validation, `best_layer`), "best_layer_by", "best_accuracy" (its test accuracy)}."""
  results = {int(l): fit([int(l)]) for l in layers}
  best = best_layer(results, by)
  return {"layers": results, "best_layer": best, "best_layer_by": by,
          "best_accuracy": results[best]["accuracy"]}


def concat_window(center: int, k: int, layers: Sequence[int]) -> list[int]:
  """k consecutive entries of the probed `layers` around `center`, shifted to lie inside."""
  layers = sorted(int(l) for l in layers)
  at = layers.index(center)
  lo = max(0, min(at - k // 2, len(layers) - k))
  return layers[lo:lo + k]


def concat_layers(fit: Callable[[list[int]], dict], center: int, k: int,
                  layers: Sequence[int]) -> dict:
  """Probe on the concatenation of k probed layers around `center` (`concat_window`)."""
  chosen = concat_window(center, k, layers)
  return {"layers": chosen, **fit(chosen)}


def label_subset(labels, size: int, seed: int, balanced: bool = True) -> np.ndarray:
  """Indices of `size` labelled examples: per-class balanced (size // classes each) or random."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  if not balanced:
    return np.sort(rng.choice(len(labels), size, replace=False))
  classes = np.unique(labels)
  per_class = size // len(classes)
  if per_class == 0:
    raise ValueError(f"{size} labels cannot cover {len(classes)} classes")
  picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
  return np.sort(np.concatenate(picks))


def low_data_probe(train_x, train_y, test_x, test_y, *, sizes: Sequence[int] = LOW_DATA_SIZES,
                   seeds: int = 5, balanced: bool = True, **probe_opts) -> dict:
  """The paper's low-data probes: {size: {"mean", "std", "accuracies"}} over `seeds` subsets.

  In memory, by L-BFGS (`logistic.linear_probe(**probe_opts)`): the subsets are small; the test
  features are one layer's.
  """
  n_classes = int(max(np.max(train_y), np.max(test_y))) + 1
  out = {}
  for size in sizes:
    if size > len(train_x):
      raise ValueError(f"low-data size {size} exceeds the {len(train_x)} training examples")
    accs = []
    for seed in range(seeds):
      idx = label_subset(train_y, size, seed, balanced)
      accs.append(logistic.linear_probe(train_x[idx], train_y[idx], test_x, test_y,
                                        n_classes=n_classes, seed=seed,
                                        **probe_opts)["accuracy"])
    out[int(size)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                      "accuracies": accs}
  return out


def spread_layers(n_layer: int) -> tuple[int, ...]:
  """Layers at a quarter, half, three quarters and all of the depth (n_layer = ln_f output)."""
  return tuple(sorted({round(f * n_layer) for f in (0.25, 0.75, 1.0)} | {n_layer // 2}))
