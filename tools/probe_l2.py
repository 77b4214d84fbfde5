"""How much held-out accuracy a probe's L2 selection rule gives up, on a probed run's features.

  python -m tools.probe_l2 --workdir W        # every feature W/probe/results.json was probed on

For each feature set (layers, baselines) the probe's own validation split (a tenth of train,
seed 0) scores every L2 of a half-decade grid by accuracy and by cross-entropy, and a refit on
all of train at every L2 gives its test accuracy. A rule picks on the validation scores, from
the whole grid (`half`) or its whole decades (`decade`); its `gap` is the test accuracy of the
grid's best L2 in hindsight minus that of its pick, in points (mean and max over feature sets).
`probe.linear_probe` uses `ce_half` when given the half-decade grid: an analysis of the L-BFGS
probe's selection rule on one run, not a benchmark. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import numpy as np

from igpt_jax import console
from igpt_jax import probe

flags.DEFINE_string("workdir", None, "a run probed by launch.probe (reads W/probe/features)")
flags.DEFINE_float("lo", -3.0, "log10 of the grid's smallest L2")
flags.DEFINE_float("hi", 0.0, "log10 of the grid's largest L2")
flags.DEFINE_float("val_fraction", 0.1, "held-out fraction of train that scores each L2")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def feature_names(feat_dir: str, split: str) -> list[str]:
  return sorted(n for n in probe.shards(feat_dir, split)[0]["names"] if n != "labels")


def sweep(train_x, train_y, test_x, test_y, grid, val_fraction: float) -> dict:
  """{l2: {"val_accuracy", "val_loss", "test_accuracy"}} along the regularisation path."""
  val, fit = probe.validation_split(len(train_x), val_fraction, seed=0)
  fx, vx = probe.standardise(train_x[fit], train_x[val])
  tx, sx = probe.standardise(train_x, test_x)
  n_classes = int(max(train_y.max(), test_y.max())) + 1
  rows, on_fit, on_all = {}, None, None
  for l2 in sorted(grid, reverse=True):
    on_fit, _ = probe.fit_logistic(fx, train_y[fit], l2, n_classes, init=on_fit)
    on_all, _ = probe.fit_logistic(tx, train_y, l2, n_classes, init=on_all)
    rows[l2] = {"val_accuracy": probe.accuracy(on_fit, vx, train_y[val]),
                "val_loss": probe.cross_entropy(on_fit, vx, train_y[val]),
                "test_accuracy": probe.accuracy(on_all, sx, test_y)}
  return rows


def picks(rows: dict) -> dict:
  """Test accuracy of each rule's pick; ties go to the stronger penalty, as in linear_probe."""
  decade = [l for l in rows if abs(np.log10(l) - round(np.log10(l))) < 1e-6]
  out = {}
  for grid_name, grid in (("decade", decade), ("half", list(rows))):
    by_acc = max(grid, key=lambda l: (rows[l]["val_accuracy"], l))
    by_ce = min(grid, key=lambda l: (rows[l]["val_loss"], -l))
    out[f"accuracy_{grid_name}"] = rows[by_acc]["test_accuracy"]
    out[f"ce_{grid_name}"] = rows[by_ce]["test_accuracy"]
  return out


def main(_):
  console.setup()
  feat_dir, sets = probe.feature_sets(os.path.join(FLAGS.workdir, "probe"))
  load = lambda split, name: probe.load_feature(feat_dir, sets[split], name)
  labels = {s: load(s, "labels") for s in ("train", "test")}
  grid = [float(l) for l in 10.0 ** np.arange(FLAGS.lo, FLAGS.hi + 0.01, 0.5)]
  gaps, per_set = {}, {}
  for name in feature_names(feat_dir, sets["train"]):
    rows = sweep(load("train", name), labels["train"], load("test", name), labels["test"], grid,
                 FLAGS.val_fraction)
    best = max(r["test_accuracy"] for r in rows.values())
    chosen = picks(rows)
    for rule, acc in chosen.items():
      gaps.setdefault(rule, []).append(100 * (best - acc))
    per_set[name] = {"best_in_hindsight": best, **chosen}
    print(name, " ".join(f"{k} {100 * v:.2f}" for k, v in per_set[name].items()), flush=True)
  print(json.dumps(dict(
      tool="probe_l2", workdir=FLAGS.workdir, grid=[float(f"{l:.3g}") for l in grid],
      val_fraction=FLAGS.val_fraction, n_train=len(labels["train"]), n_test=len(labels["test"]),
      feature_sets=per_set,
      mean_gap={k: round(float(np.mean(v)), 3) for k, v in gaps.items()},
      max_gap={k: round(float(np.max(v)), 2) for k, v in gaps.items()}), sort_keys=True))


if __name__ == "__main__":
  app.run(main)
