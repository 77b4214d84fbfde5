r"""The base config: every field the training loop (igpt_jax/train.py) reads, defined once.

Experiment files start from `get_config()` and override only what differs, with the reason.

  cifar10(): the local CIFAR-10 file (`../shared/data/cifar10/train.npz` beside the checkout, for
  offline machines) when present, else the tfds name "cifar10" (downloaded on first use).
"""

import dataclasses
import os
import typing

import ml_collections
from ml_collections import config_dict

from igpt_jax import model as model_lib

LOCAL_CIFAR10 = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "..", "shared", "data", "cifar10", "train.npz"))


def cifar10() -> str:
  """The data name of CIFAR-10 on this machine: the local .npz if present, else tfds."""
  return LOCAL_CIFAR10 if os.path.exists(LOCAL_CIFAR10) else "cifar10"


def model_fields() -> ml_collections.ConfigDict:
  """config.model: `preset` and every IGPTConfig field, all unset (None) but typed, so any of
  them can be set from the command line (`--config.model.dtype=bfloat16`) on any experiment.

  Unset fields take the preset's value (model.PRESETS), else IGPTConfig's default; probe and
  fine-tuning runs take them from the checkpoint. Experiments set theirs with `c.model.update`.
  """
  types = typing.get_type_hints(model_lib.IGPTConfig)
  fields = {"preset": config_dict.placeholder(str)}
  fields.update({f.name: config_dict.placeholder(types[f.name])
                 for f in dataclasses.fields(model_lib.IGPTConfig)})
  return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # fixes the init, the data order and augmentation, the BERT masks and the samples

  # Input (igpt_jax/data.py; unset fields take data.DEFAULTS). Splits use tfds slicing syntax.
  # skip_bad_files: an image file that does not decode (truncated, empty, not an image) is
  # skipped with one warning naming it, counted in metrics.jsonl (`data_skipped_files`), and its
  # batch slot filled with a copy of another image of the batch (docs/faults.md); False: the
  # first such file stops the run, named. On, because a few broken files among a million should
  # not end a month-long run, and each one is still named.
  c.data = dict(name="", train_split="train", eval_split="test", augment="none",
                skip_bad_files=True)
  # A (k, 3) .npy of colour centres, local or gs://; empty: fit one into workdir/palette.npy.
  c.palette = ""
  c.model = model_fields()  # preset= and IGPTConfig fields; None: unset (model.model_config)
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor) within a slice; -1 takes the remaining devices
  # Multislice TPU runs: how the slices extend the mesh's axes, (data, fsdp, tensor); -1 takes
  # the slices present. The default spreads data parallelism across slices (sharding.make_mesh).
  c.dcn_mesh = (-1, 1, 1)

  # Optimisation: the paper's Adam (b1 .9, b2 .95), no weight decay.
  c.total_steps = 1000  # optimizer steps; the run ends (or resumes up to) here
  c.batch_size = 128  # global images per step; data x fsdp must divide it
  c.accum_steps = 1  # microbatches per step (same batch, less memory)
  c.lr = 1e-3  # peak learning rate
  c.schedule = "cosine"  # after warm-up: "cosine" to 0 at total_steps, or "constant"
  c.warmup_steps = 0  # linear warm-up from 0
  c.grad_clip = 0.0  # global-norm clip; 0 is off

  # The loop's schedule; every periodic action also runs at the last step (0: only there).
  c.log_every = 100  # train loss, rates -> console, metrics.jsonl, TensorBoard
  c.eval_every = 1000  # held-out loss (and accuracy when fine-tuning)
  c.eval_batches = 0  # held-out batches per evaluation; 0: the whole eval split
  c.checkpoint_every = 1000  # also on SIGTERM / preemption and at every fine-tuning evaluation
  c.keep_checkpoints = 3  # newest checkpoints kept (plus the best one when fine-tuning)
  # A resume continues the checkpoint's data stream exactly, so it refuses a config that would
  # change it: batch_size, the number of processes, seed, data name / train_split / augment /
  # shuffle_buffer, n_px or the palette (the line names each change). True resumes anyway, with
  # a warning naming them: the run goes on at batch `step` of the new stream.
  c.allow_data_change = False
  c.sample_every = 0  # PNG grid of samples and half-image completions (AR models only)

  # Watching the run (docs/training.md, "Where the time goes"; docs/faults.md, "A hang").
  # Peak FLOP/s of one device for the MFU in the log: 0 takes chips.CHIPS's for the device and
  # compute dtype (none on a CPU, so no MFU there), > 0 is that figure, -1 measures a matmul at
  # the start (chips.measured_peak).
  c.peak_flops = 0.0
  # faults.watchdog: a train step that does not complete within timeout_s seconds of the last
  # one ends the run with every thread's stack, one line and status 124 (faults.HUNG). 0: 100 x
  # the median step, at least 120 s; -1: no watchdog. A compile, an evaluation, a save, a
  # restore and the first step have phase_s instead. A step over `straggler` x the median of
  # the last 100 is logged as a straggler (0: never).
  c.watchdog = dict(timeout_s=0.0, phase_s=3600.0, straggler=5.0)
  # jax.profiler traces (igpt_jax/profiler.py) of `steps` steps from start_step (0: none), again
  # every `period` steps when > 0, on the processes listed (empty: every one), into
  # workdir/plugins/profile/ for TensorBoard, XProf and Perfetto. port > 0 also starts jax's
  # profiler server there, for captures on demand.
  c.profile = dict(start_step=0, steps=5, period=0, processes=(0,), port=0)
  # jax's persistent compilation cache, on each host's own disk (~ is that host's home): a
  # restart loads the programs its previous run compiled. "" turns it off.
  c.compilation_cache = "~/.cache/igpt_jax/xla"

  # More periodic evaluators (igpt_jax/evaluators.py), by name; the held-out loss, accuracy and
  # sample grids above are the loop's own. Each entry's `type` picks its kind and `every` its
  # period (0: never; also at the last step); the other fields are the kind's.
  c.evals = ml_collections.ConfigDict()
  # type "probe" (probe.make_evaluator): held-out linear-probe accuracy per layer during
  # pretraining, and at the layer of least validation loss (`probe_accuracy`); at eval steps,
  # workdir/probe_vs_loss.png pairs it with the held-out loss.
  c.evals.probe = dict(
      type="probe",
      every=0,
      train_split="",  # labelled images of config.data the probe fits on (a small subset)
      eval_split="",  # labelled held-out images it is scored on
      layers=(),  # empty: a quarter, half, three quarters and all of the depth
      reading="ln1",  # "ln1" (the paper's), "residual", or either + "_2x2" (quadrant means)
      l2s=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),  # L2 grid, chosen on a tenth of the fit images
  )

  # Fine-tuning: set init_workdir to train a classifier on a pretrained run.
  c.init_workdir = ""  # the run whose parameters start this one (its model and palette too)
  c.init_step = 0  # its checkpoint step; 0: the newest readable one
  c.n_classes = 0  # classifier width (labels of config.data)
  c.gen_weight = 1.0  # L = gen_weight * L_GEN + L_CLF; the paper's 1:1, 0 for L_CLF alone
  c.k_masks = 1  # BERT models: modal prediction over k random masks at evaluation
  c.patience = 0  # evaluations without a held-out accuracy gain before stopping; 0: never
  c.test_split = ""  # launch/finetune.py: the best checkpoint's accuracy on this split
  return c
