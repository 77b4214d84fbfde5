"""Shared test fixtures: fake CPU devices for mesh tests, the real images in ../shared/data, and a
GCS server on localhost (`gcs`)."""

import os
import pathlib
import socket
import subprocess
import sys

# Mesh tests need several devices; on CPU, XLA can fake them. Must be set before jax imports.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

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
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
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
