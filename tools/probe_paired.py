"""Is one layer's probe better than another's on the same test images? A paired comparison.

  python -m tools.probe_paired --workdir W --layers 8,12

Refits each layer's probe at the L2 the run's `launch.probe` chose (W/probe/results.json), or
at the two given by --l2, on its cached features and compares the two on the same test images:
the accuracy difference, the images only one gets right (b: only the first, c: only the
second), McNemar's z = (b - c) / sqrt(b + c) with its two-sided p, and a 95% bootstrap
interval of the difference (2,000 resamples of the test images). Two figures that each carry
0.5 points of binomial noise differ with much less when the images are shared. An analysis of
one run's probes, not a benchmark. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags
import numpy as np

from igpt_jax import console
from igpt_jax import paths
from igpt_jax import probe

flags.DEFINE_string("workdir", None, "a run probed by launch.probe (reads W/probe)")
flags.DEFINE_list("layers", None, "the two layers to compare, e.g. 8,12")
flags.DEFINE_string("probe_dir", "probe", "the folder of W that launch.probe wrote (moved aside)")
flags.DEFINE_list("l2", None, "the two layers' L2s (default: those launch.probe chose)")
flags.mark_flags_as_required(["workdir", "layers"])
FLAGS = flags.FLAGS


def correct(root: str, layer: int, l2: float) -> np.ndarray:
  """[M] bool: which test images the layer's probe, refitted at l2 on all of train, gets right
  (the features the probe in root used)."""
  feat_dir, sets = probe.feature_sets(root)
  load = lambda split, name: probe.load_feature(feat_dir, sets[split], name)
  train_y, test_y = load("train", "labels"), load("test", "labels")
  name = f"layer{layer:02d}"
  tx, sx = probe.standardise(load("train", name), load("test", name))
  n_classes = int(max(train_y.max(), test_y.max())) + 1
  params, _ = probe.fit_logistic(tx, train_y, l2, n_classes)
  return np.argmax(sx @ params["w"] + params["b"], -1) == test_y


def main(_):
  console.setup()
  first, second = (int(l) for l in FLAGS.layers)
  root = os.path.join(FLAGS.workdir, FLAGS.probe_dir)
  table = paths.read_json(os.path.join(root, "results.json"))["pretrained"]["layers"]
  l2s = ({l: table[str(l)]["l2"] for l in (first, second)} if FLAGS.l2 is None
         else dict(zip((first, second), map(float, FLAGS.l2), strict=True)))
  right_1, right_2 = (correct(root, l, l2s[l]) for l in (first, second))
  only_first, only_second = int(np.sum(right_1 & ~right_2)), int(np.sum(~right_1 & right_2))
  z = (only_first - only_second) / math.sqrt(max(only_first + only_second, 1))
  p = math.erfc(abs(z) / math.sqrt(2))
  rng = np.random.default_rng(0)
  n = len(right_1)
  diffs = [np.mean(right_1[i]) - np.mean(right_2[i])
           for i in (rng.integers(0, n, n) for _ in range(2000))]
  low, high = np.percentile(diffs, [2.5, 97.5])
  print(f"layer {first} {100 * right_1.mean():.2f}% vs layer {second} "
        f"{100 * right_2.mean():.2f}% on {n} images: only {first} right {only_first}, "
        f"only {second} right {only_second}, "
        f"z {z:.2f}, p {p:.3g}, 95% interval of the difference {100 * low:.2f} .. "
        f"{100 * high:.2f} points", flush=True)
  print(json.dumps(dict(
      tool="probe_paired", workdir=FLAGS.workdir, probe_dir=FLAGS.probe_dir,
      layers=[first, second], l2=[l2s[first], l2s[second]], n_test=n,
      accuracy=[round(float(right_1.mean()), 4), round(float(right_2.mean()), 4)],
      difference_points=round(100 * float(right_1.mean() - right_2.mean()), 2),
      only_first_right=only_first, only_second_right=only_second,
      mcnemar_z=round(z, 2), p_two_sided=float(f"{p:.3g}"),
      bootstrap_95_points=[round(100 * float(low), 2), round(100 * float(high), 2)]),
      sort_keys=True))


if __name__ == "__main__":
  app.run(main)
