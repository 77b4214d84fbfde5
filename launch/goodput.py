r"""Where a run's time went: `python -m launch.goodput --workdir W` (W local or gs://).

Reads W/goodput.jsonl (written by the training loop, igpt_jax/goodput.py) over every process
that ran in W (restarts included) and prints the job's wall time, goodput, badput by cause, the
median and worst steps and each process's part, then the same as one JSON object (the last
line). Draws W/goodput.png (or --out): the wall time by cause, each metrics row's split over
the job's time, and the step times by step.
"""

import json

from absl import app
from absl import flags

from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

from igpt_jax import goodput
from igpt_jax import paths

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir, local or gs://.")
_OUT = flags.DEFINE_string("out", None, "Where the PNG goes; default <workdir>/goodput.png.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  processes = goodput.load(_WORKDIR.value)
  summary = goodput.summarize(processes)
  out = _OUT.value or str(paths.path(_WORKDIR.value) / "goodput.png")
  goodput.plot(processes, summary, out)
  print(goodput.describe(summary))
  print(f"plots: {out}")
  print(json.dumps({"workdir": _WORKDIR.value, "plot": out, **summary}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
