r"""Linear probes of a pretrained run at every layer, as in the paper.

  python -m launch.probe --config experiments/probe_cifar10_tiny.py --workdir W [--baselines]

Reads the latest checkpoint of W, streams the train and test splits of `config.data` (tfds names
or local sources) through an extraction pass over the job's devices (`config.mesh`; the
parameters restored in their training layout over it) into feature shards under
W/probe/features/ (one set per split, keyed by what it holds: a rerun reuses the complete sets
and resumes the others), then probes every layer (L-BFGS in memory or SGD streamed from the
shards, `config.solver`), the concatenation of `concat_k` layers around the best one (chosen on
the validation rows held out of train), and low-data subsets.
Writes W/probe/results.json and W/probe/accuracy_by_layer.png. --baselines adds, through the same
probe code, raw palette pixels (colour histogram, dequantized RGB) and a randomly initialised
model of the same shape.

  python -m launch.probe --config experiments/probe_cifar10_tiny.py --workdir W --checkpoints all

probes every checkpoint on disk (or the steps listed, `--checkpoints 300,600`) into
W/probe/step_NNNNNNN/ and draws the paper's Figure 3, held-out probe accuracy by layer against
the run's held-out loss at those steps, into W/probe/probe_vs_loss.png (rows in
W/probe/checkpoints.json). Keep the steps with `config.keep_checkpoints` when training.

On a pod, run the same command on every host, as launch/train.py (docs/evaluation.md): each
host reads its own slice of the splits and writes its own shards; W must be a bucket (gs://)
that every host sees. Process 0 writes the results.
"""

# pylint: disable=wrong-import-position
from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from igpt_jax import checkpoint
from igpt_jax import probe
from igpt_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Probe config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding the checkpoint.")
_BASELINES = flags.DEFINE_bool("baselines", False,
                               "Also probe raw pixels and a random-init model of the same shape.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", None, "'all' or comma-separated steps: probe each, then draw probe accuracy "
    "against held-out loss (W/probe/probe_vs_loss.png).")


def checkpoint_steps(workdir: str, spec: str) -> list[int]:
  """The steps --checkpoints names ('all' or '300,600'), each checked against the disk."""
  on_disk = checkpoint.steps(workdir)
  if spec.strip() == "all":
    return on_disk
  try:
    wanted = sorted({int(s) for s in spec.split(",") if s.strip()})
  except ValueError:
    raise app.UsageError(
        f"--checkpoints takes 'all' or steps like 300,600, not {spec!r}") from None
  absent = [s for s in wanted if s not in on_disk]
  if absent or not wanted:
    raise app.UsageError(f"--checkpoints {spec!r}: no checkpoint at {absent or spec!r} in "
                         f"{workdir}; on disk: {on_disk}")
  return wanted


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  sharding.maybe_initialize_distributed()
  report = print if jax.process_index() == 0 else lambda _: None
  if _CHECKPOINTS.value is None:
    results = probe.run(_CONFIG.value, _WORKDIR.value, baselines=_BASELINES.value,
                        step=_STEP.value)
    report(json.dumps(results["summary"]))
    return
  if _STEP.value is not None or _BASELINES.value:
    raise app.UsageError("--checkpoints probes the run's own features at each step: run --step "
                         "or --baselines (which do not change over training) on their own")
  steps = checkpoint_steps(_WORKDIR.value, _CHECKPOINTS.value)
  rows = probe.run_checkpoints(_CONFIG.value, _WORKDIR.value, steps)
  report(json.dumps(rows))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
