"""Shared test pieces: fake CPU devices for mesh tests, the real images in ../shared/data, the
tiny training run (`files`, `tiny_config`, `launch`), two processes as one job (`launch_pair`),
and a GCS server on localhost (`gcs`). Test modules import helpers from here, never from each
other."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

# Mesh tests need several devices; on CPU, XLA can fake them. Must be set before jax imports.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small programs, the same ones at every run and in
# several tests: jax's persistent cache keeps them across runs, test processes and the launch
# scripts the tests start (which inherit the environment). IGPT_TEST_XLA_CACHE= turns it off.
_CACHE = os.environ.get("IGPT_TEST_XLA_CACHE", os.path.expanduser("~/.cache/igpt_jax/xla-tests"))
if _CACHE:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import numpy as np
import pytest

from igpt_jax import metrics as metrics_lib
from igpt_jax import palette as palette_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny_test.py"
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_NPZ = SHARED_DATA / "cifar10" / "train.npz"


@pytest.fixture(scope="session")
def cifar10_npz() -> pathlib.Path:
  if not CIFAR10_NPZ.exists():
    pytest.skip(f"real CIFAR-10 not found at {CIFAR10_NPZ} (../shared/data beside the repo)")
  return CIFAR10_NPZ


@pytest.fixture(scope="session")
def cifar10_sample(cifar10_npz):
  """The first 512 real CIFAR-10 training images (uint8 [512, 32, 32, 3]) and labels."""
  with np.load(cifar10_npz) as f:
    return f["images"][:512], f["labels"][:512]


IMAGENET_SAMPLE = pathlib.Path(os.environ.get("IGPT_IMAGENET_SAMPLE",
                                              SHARED_DATA / "imagenet_sample"))


@pytest.fixture(scope="session")
def imagenet_sample() -> pathlib.Path:
  """An image folder of real ImageNet JPEGs, `<root>/train/<class>/*.JPEG`: the 1,000 validation
  images of github.com/EliSchwartz/imagenet-sample-images laid out as docs/performance.md shows,
  at $IGPT_IMAGENET_SAMPLE (default ../shared/data/imagenet_sample)."""
  if not (IMAGENET_SAMPLE / "train").is_dir():
    pytest.skip(f"real ImageNet JPEGs not found at {IMAGENET_SAMPLE}/train (set "
                "IGPT_IMAGENET_SAMPLE; docs/performance.md says how to lay them out)")
  return IMAGENET_SAMPLE


def labelled_images(n: int, side: int):
  """uint8 [n, side, side, 3] images and int32 [n] labels of 4 classes that pixels and features
  can learn: class c is brighter in channel c % 3."""
  rng = np.random.default_rng(0)
  labels = np.arange(n, dtype=np.int32) % 4
  images = rng.integers(0, 100, (n, side, side, 3)).astype(np.uint8)
  images[np.arange(n), :, :, labels % 3] += 120
  return images, labels


def tie_palette(centres):
  """centres [k, 3] with exact ties added: the first 4 repeated after the rest, 4 more with green
  and blue swapped (equal for grey pixels up to the order of the float additions), and a pair at
  +-2^-8 from red level 100 (exactly equidistant from it)."""
  levels = palette_lib.to_unit(np.arange(256, dtype=np.uint8))
  pair = np.array([[levels[100] + 2 ** -8, levels[50], levels[60]],
                   [levels[100] - 2 ** -8, levels[50], levels[60]]], np.float32)
  return np.concatenate([centres, centres[:4], centres[4:8][:, [0, 2, 1]], pair])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# -- the tiny training run ---------------------------------------------------------------------

STEPS = 60  # of a `launch` run
PAIR_STEPS = 40  # of a `launch_pair` run: tiny steps are fast, room for the hosts to agree on a stop


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A 64-image .npz (8x8 smooth random images) and a 16-colour palette."""
  d = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (64, 2, 2, 3))
  images = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.uint8)
  np.savez(d / "images.npz", images=images, labels=rng.integers(0, 10, 64))
  palette_lib.save_palette(d / "palette.npy", rng.uniform(-1, 1, (16, 3)).astype(np.float32))
  return d / "images.npz", d / "palette.npy"


def tiny_config(files, **overrides):  # pylint: disable=redefined-outer-name
  """experiments/tiny_test.py on `files`, with overrides."""
  spec = importlib.util.spec_from_file_location("tiny_test", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.name, config.palette = str(files[0]), str(files[1])
  config.update(overrides)
  return config


def launch(files, workdir, **extra):  # pylint: disable=redefined-outer-name
  """launch/train.py on the tiny config for STEPS steps, as a subprocess."""
  args = [sys.executable, "-m", "launch.train", f"--config={TINY}", f"--workdir={workdir}",
          f"--config.data.name={files[0]}", f"--config.palette={files[1]}",
          f"--config.total_steps={STEPS}", "--config.checkpoint_every=10",
          "--config.eval_every=30", f"--config.sample_every={STEPS}"]
  args += [f"--config.{k}={v}" for k, v in extra.items()]
  return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def interrupt(proc, workdir, sig, after_step):
  """Sends sig once metrics.jsonl shows after_step; -> the process's stderr."""
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if max(metrics_lib.read(workdir), default=0) >= after_step:
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  _, err = proc.communicate(timeout=300)
  return err


def launch_pair(files, workdir, *overrides):  # pylint: disable=redefined-outer-name
  """Starts launch/train.py as processes 0 and 1 of one job, one CPU device each; overrides:
  more --config flags (later flags win)."""
  port, procs = free_port(), []
  for i in range(2):
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    args = [sys.executable, "-m", "launch.train", f"--config={TINY}", f"--workdir={workdir}",
            f"--config.data.name={files[0]}", f"--config.palette={files[1]}",
            f"--config.total_steps={PAIR_STEPS}", "--config.checkpoint_every=4",
            "--config.eval_every=20", "--config.sample_every=0", *overrides]
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def run_pair(*args, timeout: float = 300) -> list[dict]:
  """tests/pair_process.py ARGS as processes 0 and 1 of one job, one CPU device each; -> the
  JSON each printed last, in process order. A process that fails, or is still running after
  timeout seconds (a hang), fails the test with its stderr."""
  port, procs = free_port(), []
  for i in range(2):
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "pair_process.py"),
                                   *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs, deadline = [], time.monotonic() + timeout
  for p in procs:
    try:
      out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      errs = [q.communicate()[1][-2000:] for q in procs]
      pytest.fail(f"the pair still ran after {timeout} s (a hang): {errs}")
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  return outs


PAIR_MODEL = dict(n_px=4, n_layer=2, n_embd=16, n_head=2, vocab_size=16)  # pair_process.py's


def save_train_states(workdir, steps) -> dict:
  """A PAIR_MODEL train state checkpointed at each of steps as the loop saves it (params moved
  by the step, so each step's differ); -> {step: the sum of its wte}."""
  # pylint: disable=import-outside-toplevel  (jax after the XLA flags above)
  import jax
  from igpt_jax import checkpoint, model as model_lib, sharding, steps as steps_lib
  cfg = model_lib.IGPTConfig(**PAIR_MODEL)
  mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  tx = steps_lib.make_optimizer(1e-3, 10)
  state = steps_lib.create_train_state(cfg, tx, mesh, jax.random.key(0))
  mngr, sums = checkpoint.manager(str(workdir), keep=None), {}
  for step in steps:
    params = jax.tree.map(lambda p, s=step: p + s, state.params)
    checkpoint.save(mngr, step, params, state.opt_state,
                    checkpoint.make_meta(cfg, np.zeros((16, 3), np.float32), step), force=True)
    sums[step] = float(np.asarray(params["wte"], np.float64).sum())
  mngr.wait_until_finished()
  mngr.close()
  return sums


def finish_pair(procs) -> list[str]:
  """Waits for both processes; -> their stderr, after checking that both exited cleanly."""
  errs = [p.communicate(timeout=600)[1] for p in procs]  # start-up is slow on a loaded host
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  return errs


def grid_cells(grid, n_px: int, pad: int = 2, scale: int = 4) -> list[list[np.ndarray]]:
  """The images of a `save_grid` PNG, row by row (white cells of short rows dropped)."""
  grid = np.asarray(grid)[::scale, ::scale]
  step = n_px + pad
  cells = [[grid[pad + i * step:pad + i * step + n_px, pad + j * step:pad + j * step + n_px]
            for j in range((grid.shape[1] - pad) // step)]
           for i in range((grid.shape[0] - pad) // step)]
  return [[c for c in row if (c != 255).any()] for row in cells]


# -- a stand-in for OpenAI's weights on the hub ---------------------------------------------------

def write_random_hf_imagegpt(hf_dir: pathlib.Path, palette, *, n_px: int, n_layer: int,
                             n_embd: int, n_head: int) -> pathlib.Path:
  """A random transformers ImageGPTForCausalImageModeling, saved as the hub ships
  openai/imagegpt-*: config.json, model.safetensors and preprocessor_config.json, whose
  `clusters` are `palette` [k, 3]. Skips without the peer extra."""
  torch = pytest.importorskip("torch", reason="the stand-in ImageGPT needs the peer extra")
  transformers = pytest.importorskip("transformers",
                                     reason="the stand-in ImageGPT needs the peer extra")
  torch.manual_seed(0)
  hf_cfg = transformers.ImageGPTConfig(vocab_size=len(palette) + 1, n_positions=n_px * n_px,
                                       n_embd=n_embd, n_layer=n_layer, n_head=n_head)
  transformers.ImageGPTForCausalImageModeling(hf_cfg).save_pretrained(hf_dir)
  (hf_dir / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "ImageGPTImageProcessor", "clusters": np.asarray(palette).tolist(),
       "do_resize": True, "size": {"height": n_px, "width": n_px},
       "do_normalize": True, "do_color_quantize": True}))
  return hf_dir


# -- a GCS server on localhost -----------------------------------------------------------------

GCS_BUCKET = "igpt-test"  # TensorStore, like GCS, refuses bucket names under 3 characters


class GcsEmulator:
  """tests/gcs_emulator.py (the GCS JSON API) in a subprocess on a free localhost port.

  Objects live on disk under `root`, so stop() then start() is a server outage that loses
  nothing. `env` points gcsfs (STORAGE_EMULATOR_HOST) and TensorStore (TENSORSTORE_GCS_HTTP_URL
  with a test token) at it, for this process and the ones the tests start; gcsfs's bucket-type
  probe (a gRPC call the emulator does not serve) is turned off.
  """

  def __init__(self, root: pathlib.Path):
    self.port = free_port()
    self.root, self.proc = root, None
    url = f"http://127.0.0.1:{self.port}"
    self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def start(self) -> None:
    log = open(self.root / "emulator.log", "a")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__).parent / "gcs_emulator.py"),
         f"--port={self.port}", f"--bucket={GCS_BUCKET}", f"--data_dir={self.root / 'data'}"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    if not self.proc.stdout.readline().startswith("ready"):
      raise RuntimeError(f"the GCS emulator did not start; see {self.root / 'emulator.log'}")

  def stop(self) -> None:
    self.proc.terminate()
    self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A running GcsEmulator whose variables are in os.environ for the session."""
  emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
  emulator.start()
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  yield emulator
  emulator.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k)
    else:
      os.environ[k] = v
