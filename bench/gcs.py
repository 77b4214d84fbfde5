r"""What a run in a bucket costs, against a GCS server on localhost (tests/gcs_emulator.py).

  python -m bench.gcs                  # experiments/cifar10_tiny.py's model, 5 saves each way
  python -m bench.gcs --config.model.n_layer=6 --config.model.n_embd=512 \
      --config.model.n_head=8 --config.model.n_px=16 --saves 3       # 19.5M parameters

Times one checkpoint save (parameters + Adam state + meta, `checkpoint.save` then
`wait_until_finished`) to a local temporary directory and to gs:// on the emulator: the median
of --saves. Then writes --flushes metrics records (the keys and value count of a real log line)
through `metrics.Writer` to gs:// and counts the bytes uploaded per flush (the line and its
TensorBoard record) against the size of the two objects at the end, which a writer that
rewrote them whole would send every flush. The emulator is a single-threaded Python server on
this host, so its save time bounds nothing on real GCS; it shows the path works and its order.
The last line of stdout is one JSON object.
"""

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from bench import common
from igpt_jax import checkpoint
from igpt_jax import console
from igpt_jax import metrics
from igpt_jax import model as model_lib
from igpt_jax import paths
from igpt_jax import sharding
from igpt_jax import steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(ROOT / "experiments" / "cifar10_tiny.py"), "Experiment whose model is saved.")
flags.DEFINE_integer("saves", 5, "checkpoint saves timed each way")
flags.DEFINE_integer("flushes", 100, "metrics writes counted")
flags.DEFINE_integer("port", 9033, "emulator port")
FLAGS = flags.FLAGS

BUCKET = "igpt-bench"


def start_emulator():
  url = f"http://127.0.0.1:{FLAGS.port}"
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"),
                           f"--port={FLAGS.port}", f"--bucket={BUCKET}"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  if not proc.stdout.readline().startswith("ready"):
    raise RuntimeError("the emulator did not start")
  return proc


def save_seconds(workdir: str, cfg, state, palette) -> list[float]:
  mngr = checkpoint.manager(workdir, keep=2)
  times = []
  for step in range(1, FLAGS.saves + 2):  # the first save (directory set-up, compiles) untimed
    t0 = time.perf_counter()
    checkpoint.save(mngr, step, state.params, state.opt_state,
                    checkpoint.make_meta(cfg, palette, step), force=True)
    mngr.wait_until_finished()
    times.append(time.perf_counter() - t0)
  mngr.close()
  return times[1:]


def flush_bytes(workdir: str) -> tuple[list[int], int]:
  """-> (bytes uploaded by each Writer.write, bytes of metrics.jsonl + the events at the end)."""
  sent = []
  upload = paths.epath.Path.write_bytes

  def counting(self, data):
    sent[-1] += len(data)
    return upload(self, data)

  paths.epath.Path.write_bytes = counting
  writer = metrics.Writer(workdir)
  scalars = dict(train_loss=2.3456789, train_bits_per_token=3.3840271, train_accuracy=0.1234567,
                 grad_norm=0.987654, steps_per_s=12.345678, tokens_per_s=123456.78)
  try:
    for step in range(1, FLAGS.flushes + 1):
      sent.append(0)
      writer.write(100 * step, scalars)
  finally:
    paths.epath.Path.write_bytes = upload
  total = sum(len(p.read_bytes()) for p in (writer.jsonl, writer.events))
  return sent, total


def main(argv):
  del argv
  console.setup()
  emulator = start_emulator()
  try:
    cfg = model_lib.model_config(_CONFIG.value.model)
    tx = steps.make_optimizer(1e-3, 10)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state = steps.create_train_state(cfg, tx, mesh, jax.random.key(0))
    palette = np.zeros((cfg.vocab_size, 3), np.float32)
    with tempfile.TemporaryDirectory() as local:
      local_s = save_seconds(local, cfg, state, palette)
    bucket_s = save_seconds(f"gs://{BUCKET}/bench_run", cfg, state, palette)
    sent, total = flush_bytes(f"gs://{BUCKET}/bench_metrics")
  finally:
    emulator.terminate()
  state_mb = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))) / 1e6
  print(f"{model_lib.param_count(cfg) / 1e6:.2f}M parameters, {state_mb:.1f} MB of state: save "
        f"{statistics.median(local_s):.2f} s local, {statistics.median(bucket_s):.2f} s to the "
        f"emulator; metrics: {statistics.median(sent[1:])} bytes per flush, {total} bytes "
        f"in the two objects after {FLAGS.flushes} flushes")
  common.emit(dict(
      bench="gcs", params=model_lib.param_count(cfg), state_mb=round(state_mb, 2),
      save_local_s=[round(t, 3) for t in local_s], save_emulator_s=[round(t, 3) for t in bucket_s],
      save_local_median_s=round(statistics.median(local_s), 3),
      save_emulator_median_s=round(statistics.median(bucket_s), 3),
      flush_bytes_first=sent[0], flush_bytes_median=statistics.median(sent[1:]),
      flush_bytes_max=max(sent[1:]), flushes=FLAGS.flushes, objects_bytes_at_end=total,
      host_cores=os.cpu_count(), load=round(common.load(), 2)))


if __name__ == "__main__":
  app.run(main)
