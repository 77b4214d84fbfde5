r"""One process of a two-process jax job on localhost, for tests that need each process to see
something different (conftest's `run_pair` starts two of them):

  python tests/pair_process.py restore WORKDIR [--unreadable_on=1 --unreadable_step=6]
      [--transient_on=0 --transient_step=6 --transient_times=2]
  python tests/pair_process.py palette WORKDIR --data=IMAGES.npz
  python tests/pair_process.py silent WORKDIR

`restore` restores the newest readable train state of WORKDIR (local or gs://) as the training
loop does (checkpoint.restore), onto a mesh over both processes. A fault is injected below orbax, in
StandardCheckpointHandler.restore, on one process only: `unreadable` raises what TensorStore
raises for a truncated array file, `transient` what it raises for a GCS 503, the first
`transient_times` reads of that step. `palette` gets the run's palette (train's recipe) with
none saved, recording whether this process fitted one. `silent`: process 1 vanishes while
process 0 waits for it in a barrier (`silent` below).

The last line printed is JSON: what this process ended with.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from igpt_jax import checkpoint
from igpt_jax import faults
from igpt_jax import fit_palette
from igpt_jax import model as model_lib
from igpt_jax import paths
from igpt_jax import sharding
from igpt_jax import steps
from conftest import PAIR_MODEL

CFG = model_lib.IGPTConfig(**PAIR_MODEL)

# What TensorStore raises, as measured here: a truncated array file, and a GCS 503.
TRUNCATED = ('OUT_OF_RANGE: Error opening "cast" driver: Error opening "zarr" driver: Error '
             'reading "wte/.zarray" in OCDBT database at local file "{dir}/": Error reading '
             'Byte range [0, 5082) of local file "{dir}/d/d57d04ffc5a21add0665f114006e9c05"')
UNAVAILABLE = ('UNAVAILABLE: Error opening "zarr" driver: Error reading "gs://b/{dir}/'
               'manifest.ocdbt": HTTP response code: 503 with body: Service Unavailable')


def inject(args) -> None:
  """Makes reads of one step fail on one process, below orbax."""
  real = ocp.StandardCheckpointHandler.restore
  failed = []

  def restore(self, directory, *a, **kw):
    me, step = jax.process_index(), int(os.path.basename(os.path.dirname(str(directory))))
    if me == args.unreadable_on and step == args.unreadable_step:
      raise ValueError(TRUNCATED.format(dir=directory))
    if (me == args.transient_on and step == args.transient_step and
        len(failed) < args.transient_times):
      failed.append(step)
      raise ValueError(UNAVAILABLE.format(dir=directory))
    return real(self, directory, *a, **kw)
  ocp.StandardCheckpointHandler.restore = restore


def restore(args) -> dict:
  checkpoint.RESTORE_WAIT_S = 0.1
  inject(args)
  mesh = sharding.make_mesh((1, 2, 1))
  tx = steps.make_optimizer(1e-3, 10)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    abstract = steps.abstract_train_state(CFG, tx, mesh)
    mngr = checkpoint.manager(args.workdir)
    aside = paths.path(args.workdir) / "unreadable_checkpoints"
    try:
      params, _, meta = checkpoint.restore(mngr, abstract.params, abstract.opt_state, CFG,
                                           set_aside=aside)
    except Exception as e:  # pylint: disable=broad-except  # the outcome is the JSON line
      return {"error": f"{type(e).__name__}: {e}"}
    wte = params["wte"].addressable_shards[0].data
  return {"step": meta["step"], "steps": mngr.all_steps(),
          "set_aside": sorted(p.name for p in aside.iterdir()) if aside.is_dir() else [],
          "wte_sum": float(np.asarray(wte, np.float64).sum())}


def palette(args) -> dict:
  fitted = []
  real = fit_palette.fit_split_palette
  fit_palette.fit_split_palette = lambda *a, **kw: fitted.append(1) or real(*a, **kw)
  config = {"palette": "", "seed": 0, "data": {"name": args.data, "train_split": "train"}}
  got = fit_palette.run_palette(ml_collections.ConfigDict(config), args.workdir, k=8, n_px=4)
  return {"fitted": bool(fitted), "palette": np.asarray(got).tolist()}


def silent(args) -> dict:
  """Process 1 leaves at once, without a word; process 0 waits for it in a barrier (as orbax's
  save does) under the loop's pulse watch, which must end it with the lost-process status."""
  del args
  faults.SILENT_S = 4.0
  if jax.process_index() == 1:
    os._exit(0)  # pylint: disable=protected-access
  with faults.pulse_watch(lambda: 7, lambda: None):
    faults._client().wait_at_barrier("pair_silent", 300_000)  # pylint: disable=protected-access
  return {"barrier": "passed"}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["restore", "palette", "silent"])
  parser.add_argument("workdir")
  parser.add_argument("--data")
  for fault in ("unreadable", "transient"):
    parser.add_argument(f"--{fault}_on", type=int, default=-1)
    parser.add_argument(f"--{fault}_step", type=int, default=-1)
  parser.add_argument("--transient_times", type=int, default=0)
  args = parser.parse_args()
  sharding.maybe_initialize_distributed()
  out = {"restore": restore, "palette": palette, "silent": silent}[args.what](args)
  print(json.dumps({"process": jax.process_index(), **out}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
