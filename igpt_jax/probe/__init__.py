"""Linear probes on frozen iGPT features, as in the paper, and the attentive probe (AIM's).

  features.py   extraction: one jitted program over the mesh and every process; in memory
                (`extract_features`) or streamed to resumable shards (`write_features`)
  logistic.py   the L-BFGS probe, in memory (`linear_probe`, `fit_logistic`)
  stream.py     the SGD probe over shards on disk, for splits no host holds (`stream_probe`)
  attentive.py  the attentive probe: attention pooling over a layer's frozen token features
  protocol.py   the tables: every layer, k layers concatenated, low-data subsets
  run.py        the offline probe of a checkpoint (`run`, `run_checkpoints`), launch/probe.py
  evaluator.py  the probe inside training (`make_evaluator`, config.evals.probe)
  plots.py      accuracy by layer, the paper's Figure 3 (`write_probe_vs_loss`)

Each layer's feature is the mean over positions of the block input read after ln_1 (the
paper's probe) or before it ("residual"), or with the "_2x2" readings the mean over each image
quadrant; layer n_layer is the ln_f output. docs/evaluation.md says which solver runs when.
"""

from igpt_jax.probe.attentive import attentive_probe, fit_heads
from igpt_jax.probe.evaluator import make_evaluator
from igpt_jax.probe.features import (PIXEL_KINDS, extract_features, feature_path, feature_set,
                                     featurizer, features_fn, load_feature, pixel_features,
                                     read_shard, shards, token_features, write_features)
from igpt_jax.probe.logistic import (DEFAULT_L2S, accuracy, cross_entropy, fit_logistic,
                                     fits_per_probe, linear_probe, standardise,
                                     validation_split)
from igpt_jax.probe.plots import (plot_accuracy, plot_probe_vs_loss, probe_rows, write_json,
                                  write_probe_vs_loss)
from igpt_jax.probe.protocol import (BEST_LAYER_BY, LOW_DATA_SIZES, best_layer, concat_layers,
                                     concat_window, label_subset, low_data_probe, probe_layers,
                                     ranked_layers, spread_layers)
from igpt_jax.probe.run import feature_sets, run, run_checkpoints
from igpt_jax.probe.stream import lbfgs_bytes, solver_for, stream_probe
