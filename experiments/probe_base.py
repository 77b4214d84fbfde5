r"""The base probe config: every field the offline probe (igpt_jax/probe/run.py) reads, once.

  python launch/probe.py --config experiments/probe_cifar10.py --workdir RUN [--baselines]

Probe experiments start from `get_config()` and override what differs, with the reason, as
training configs start from experiments/base.py. Run on every host of a slice for a pod (each
extracts its own slice of the splits); docs/evaluation.md says which solver runs when.
"""

import ml_collections

from experiments import base


def get_config():
  c = ml_collections.ConfigDict()
  # Labelled splits of a tfds dataset or a local source (igpt_jax/data.py): the probe fits on
  # train_split (holding out val_fraction of it to choose the hyperparameters) and scores on
  # eval_split. Images are resized to the checkpoint's n_px.
  c.data = dict(name="cifar10", train_split="train", eval_split="test")
  # Unset: the checkpoint's. `attention` / `dtype` override how it runs here (checkpoint.load);
  # architecture fields set must match the checkpoint.
  c.model = base.model_fields()
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor) over every device of the job; (1, -1, 1) splits
  # the parameters over them (iGPT-L / XL on 16 GB chips)

  # Extraction (probe.write_features): features of every layer to workdir/probe/features.
  c.layers = ()  # empty: all, 0..n_layer
  c.reading = "ln1"  # or "residual" (the pre-norm block input), either + "_2x2" (quadrants)
  c.batch_size = 512  # global extraction batch
  c.feature_dtype = "float32"  # or "bfloat16": half the disk and the read time
  c.shard_batches = 64  # batches per process per shard: the unit that a rerun skips when done
  c.k_masks = 0  # BERT models: average over this many 15%-masked passes; 0: read unmasked

  # The probe: logistic regression, mean cross-entropy + l2 / 2 |W|^2 on standardised features.
  c.solver = "auto"  # "lbfgs" (in memory), "sgd" (streamed from disk), or "auto": L-BFGS while
  c.lbfgs_max_bytes = 8 * 2 ** 30  # its memory (probe.lbfgs_bytes: 8 bytes x rows x F) fits
  c.l2s = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # chosen on the held-out rows
  c.val_fraction = 0.1
  # SGD, momentum 0.9, cosine from lr to 0 (stream.py): every (lr, l2) trained in one pass.
  c.sgd = dict(lrs=(0.1, 0.3, 1.0), epochs=10, batch_size=1024, chunk_rows=8192)

  # The best layer: of least validation cross-entropy ("val_loss") or highest validation
  # accuracy ("val_accuracy"), on the held-out val_fraction of train; the test split only scores.
  c.best_layer_by = "val_loss"
  c.concat_k = 5  # the concatenation of k layers around the best (1: none)
  # Low-data probes on the best layer (per-class balanced subsets, mean +- std over seeds;
  # L-BFGS in memory).
  c.low_data = dict(sizes=(), seeds=5, balanced=True)
  c.random_init_seed = 0  # --baselines: the random-init model

  # The attentive probe (probe/attentive.py, as AIM evaluates): `queries` learned queries attend
  # with `heads` heads (0: the model's n_head) over the frozen token features [T, D] (ln_1
  # outputs) of the k_layers layers of least linear-probe validation loss, averaged; then a
  # linear classifier. AdamW, warm-up then cosine; every (lr, weight decay) trained at once and
  # chosen on the held-out val_fraction of train. mode: "memory" keeps each process's token
  # features in host memory, "joint" trains through a frozen forward pass each step, "auto"
  # keeps them while they need at most max_bytes. batch_size: global, for all three passes.
  c.attentive = dict(k_layers=0,  # 0: no attentive probe
                     queries=1, heads=0, lrs=(1e-3, 3e-3), weight_decays=(0.01, 0.1), epochs=10,
                     batch_size=256, warmup_fraction=0.1, mode="auto", max_bytes=8 * 2 ** 30)
  return c
