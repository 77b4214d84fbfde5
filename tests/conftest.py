"""Shared test fixtures: fake CPU devices for mesh tests, and the real images in ../shared/data."""

import os
import pathlib

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
