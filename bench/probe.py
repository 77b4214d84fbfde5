"""The JAX linear probe against scikit-learn's LogisticRegression(solver="lbfgs"), same features.

  python -m bench.probe --workdir W              # features a `launch.probe` run wrote to W/probe
  python -m bench.probe --n 20000 --dim 512      # synthetic class-dependent features

Both sides fit the same objective (mean cross-entropy + l2/2 |W|^2, i.e. sklearn's C = 1 / (l2 N))
on the same standardised features, each to its own default tolerance, from scratch. Ours is
timed after one warm-up fit (compile; reported separately as `ours_first_fit_seconds`), the peer
as it runs. `ratio` = peer seconds / our seconds; `accuracy_gap` = ours - peer in points.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import os
import time

from absl import app, flags
import numpy as np
from sklearn.linear_model import LogisticRegression

from bench import common
from igpt_jax import console
from igpt_jax import paths
from igpt_jax import probe

flags.DEFINE_string("workdir", None, "a run probed by launch.probe (reads W/probe/features)")
flags.DEFINE_integer("layer", None, "layer to probe (default: the run's best layer)")
flags.DEFINE_float("l2", None, "penalty (default: the one the run's probe chose, else 1e-3)")
flags.DEFINE_integer("n", 20000, "synthetic: training rows (the test set is a quarter)")
flags.DEFINE_integer("dim", 512, "synthetic: feature width")
flags.DEFINE_integer("classes", 10, "synthetic: classes")
FLAGS = flags.FLAGS


def run_features(workdir: str, layer: int | None):
  """-> (train_x, train_y, test_x, test_y, layer, l2 the run chose) from a probed run."""
  root = os.path.join(workdir, "probe")
  results = paths.read_json(os.path.join(root, "results.json"))
  layer = results["pretrained"]["best_layer"] if layer is None else layer
  feats, sets = probe.feature_sets(root)
  arrays = [probe.load_feature(feats, sets[split], name) for split in ("train", "test")
            for name in (f"layer{layer:02d}", "labels")]
  return (*arrays, layer, results["pretrained"]["layers"][str(layer)]["l2"])


def synthetic_features(n: int, dim: int, classes: int):
  """Gaussian classes whose means differ in a few directions: neither trivial nor hopeless."""
  rng = np.random.default_rng(0)
  means = rng.normal(size=(classes, dim)) * (rng.random(dim) < 0.05) * 0.3
  def draw(rows):
    y = rng.integers(0, classes, rows)
    return (means[y] + rng.normal(size=(rows, dim))).astype(np.float32), y.astype(np.int32)
  return (*draw(n), *draw(n // 4))


def main(_):
  console.setup()  # as the launch scripts: keeps libtpu from starting on a CPU host
  load_before = common.load()
  if FLAGS.workdir:
    train_x, train_y, test_x, test_y, layer, l2 = run_features(FLAGS.workdir, FLAGS.layer)
    source = f"{FLAGS.workdir} layer {layer}"
  else:
    train_x, train_y, test_x, test_y = synthetic_features(FLAGS.n, FLAGS.dim, FLAGS.classes)
    source, l2 = "synthetic", 1e-3
  l2 = FLAGS.l2 if FLAGS.l2 is not None else l2
  n_classes = int(max(train_y.max(), test_y.max())) + 1
  train_x, test_x = probe.standardise(train_x, test_x)

  start = time.perf_counter()
  probe.fit_logistic(train_x, train_y, l2, n_classes)
  first = time.perf_counter() - start
  start = time.perf_counter()
  params, iterations = probe.fit_logistic(train_x, train_y, l2, n_classes)
  ours = time.perf_counter() - start

  peer_model = LogisticRegression(C=1.0 / (l2 * len(train_x)), max_iter=1000)
  start = time.perf_counter()
  peer_model.fit(train_x, train_y)
  peer = time.perf_counter() - start

  ours_acc = probe.accuracy(params, test_x, test_y)
  peer_acc = probe.accuracy({"w": peer_model.coef_.T, "b": peer_model.intercept_}, test_x,
                            test_y)
  print(f"{source}: {train_x.shape} train, {test_x.shape} test, l2 {l2:g}", flush=True)
  print(f"ours: {ours:.2f} s ({iterations} L-BFGS steps), accuracy {ours_acc:.2%}; sklearn: "
        f"{peer:.2f} s ({int(peer_model.n_iter_[0])} steps), accuracy {peer_acc:.2%}", flush=True)
  common.emit(dict(
      bench="probe", device=common.device_name(), source=source, n_train=len(train_x),
      n_test=len(test_x), dim=train_x.shape[1], n_classes=n_classes, l2=l2,
      ours_seconds=round(ours, 3), ours_first_fit_seconds=round(first, 3),
      ours_iterations=iterations, ours_accuracy=round(ours_acc, 4),
      peer="sklearn LogisticRegression(lbfgs)", peer_seconds=round(peer, 3),
      peer_iterations=int(peer_model.n_iter_[0]), peer_accuracy=round(peer_acc, 4),
      ratio=round(peer / ours, 2), accuracy_gap=round(100 * (ours_acc - peer_acc), 2),
      load_before=round(load_before, 2), load_after=round(common.load(), 2)))


if __name__ == "__main__":
  app.run(main)
