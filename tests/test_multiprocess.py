"""Two processes on localhost as one jax job (the code paths of a pod's hosts), and the launch
variables that describe such a job."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from igpt_jax import checkpoint
from igpt_jax import metrics as metrics_lib
from igpt_jax import sharding
from test_train import REPO, TINY, files  # pylint: disable=unused-import

STEPS = 40  # tiny steps are fast: room for the hosts to agree on a step to stop at


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_pair(files, workdir):  # pylint: disable=redefined-outer-name
  """Starts launch/train.py as processes 0 and 1 of one job, one CPU device each."""
  port, procs = free_port(), []
  for i in range(2):
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    args = [sys.executable, "-m", "launch.train", f"--config={TINY}", f"--workdir={workdir}",
            f"--config.data.name={files[0]}", f"--config.palette={files[1]}",
            f"--config.total_steps={STEPS}", "--config.checkpoint_every=4",
            "--config.eval_every=20", "--config.sample_every=0"]
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs) -> list[str]:
  """Waits for both processes; -> their stderr, after checking that both exited cleanly."""
  errs = [p.communicate(timeout=600)[1] for p in procs]  # start-up is slow on a loaded host
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  return errs


def first_batch_crcs(errs) -> dict:
  """{process index: crc32 of the rows it read for its first step} from the run's logs."""
  found = [re.search(r"process (\d) of 2: batch \d+ has 4 rows here, crc32 (\w+)", e)
           for e in errs]
  assert all(found), [e[-2000:] for e in errs]
  return {int(m.group(1)): m.group(2) for m in found}


@pytest.fixture(scope="module")
def uninterrupted_pair(files, tmp_path_factory):  # pylint: disable=redefined-outer-name
  workdir = tmp_path_factory.mktemp("pair")
  errs = finish(launch_pair(files, workdir))
  return workdir, errs


@pytest.mark.slow
def test_two_processes_train_as_one_job(uninterrupted_pair):
  workdir, errs = uninterrupted_pair
  crcs = first_batch_crcs(errs)
  assert sorted(crcs) == [0, 1] and crcs[0] != crcs[1]  # each host read its own slice
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [int(re.match(r'{"step": (\d+)', line).group(1)) for line in f]
  assert steps == list(range(1, STEPS + 1))  # process 0 alone writes, one row per step
  assert checkpoint.manager(str(workdir), read_only=True).latest_step() == STEPS


@pytest.mark.slow
def test_two_processes_resume_after_sigterm(files, tmp_path, uninterrupted_pair):
  procs = launch_pair(files, tmp_path)
  while all(p.poll() is None for p in procs):
    if max(metrics_lib.read(tmp_path), default=0) >= 4:
      for p in procs:  # a pod's preemption notice reaches every host
        p.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  errs = finish(procs)
  assert all("preempted: saved step" in e for e in errs), [e[-2000:] for e in errs]
  resumed_from = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert 4 <= resumed_from < STEPS

  errs = finish(launch_pair(files, tmp_path))
  assert all(f"resumed from step {resumed_from}" in e for e in errs)
  assert checkpoint.manager(str(tmp_path), read_only=True).latest_step() == STEPS
  want, got = metrics_lib.read(uninterrupted_pair[0]), metrics_lib.read(tmp_path)
  assert sorted(got) == list(range(1, STEPS + 1))
  steps = range(resumed_from + 1, STEPS + 1)
  np.testing.assert_array_equal([got[s]["train_loss"] for s in steps],
                                [want[s]["train_loss"] for s in steps])
  assert got[STEPS]["eval_loss"] == want[STEPS]["eval_loss"]


# -- the launch variables ---------------------------------------------------------------------

@pytest.fixture
def initialize(monkeypatch):
  """Records jax.distributed.initialize's arguments instead of joining a job."""
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for k in sharding.PROCESS_VARIABLES + sharding.CLUSTER_VARIABLES:
    monkeypatch.delenv(k, raising=False)
  return calls


def test_initialize_reads_the_three_variables(initialize, monkeypatch):
  sharding.maybe_initialize_distributed()
  assert initialize == []  # one process: nothing to join
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  sharding.maybe_initialize_distributed()
  assert initialize == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                             process_id=3)]


def test_initialize_names_missing_variables(initialize, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
    sharding.maybe_initialize_distributed()
  assert initialize == []


def test_clusters_are_left_to_jax(initialize, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "2")
  sharding.maybe_initialize_distributed()
  assert initialize == [{}]  # jax reads SLURM's (or the TPU pod's) own variables
