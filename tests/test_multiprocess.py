"""Two processes on localhost as one jax job (the code paths of a pod's hosts), and the launch
variables that describe such a job."""

import os
import re
import signal
import time

import numpy as np
from PIL import Image
import pytest

from igpt_jax import checkpoint
from igpt_jax import metrics as metrics_lib
from igpt_jax import sample as sample_lib
from igpt_jax import sharding
from conftest import PAIR_STEPS, finish_pair, grid_cells, launch_pair


def first_batch_crcs(errs) -> dict:
  """{process index: crc32 of the rows it read for its first step} from the run's logs."""
  found = [re.search(r"process (\d) of 2: batch \d+ has 4 rows here, crc32 (\w+)", e)
           for e in errs]
  assert all(found), [e[-2000:] for e in errs]
  return {int(m.group(1)): m.group(2) for m in found}


@pytest.fixture(scope="module")
def uninterrupted_pair(files, tmp_path_factory):  # pylint: disable=redefined-outer-name
  workdir = tmp_path_factory.mktemp("pair")
  errs = finish_pair(launch_pair(files, workdir))
  return workdir, errs


@pytest.mark.slow
def test_two_processes_train_as_one_job(uninterrupted_pair):
  workdir, errs = uninterrupted_pair
  crcs = first_batch_crcs(errs)
  assert sorted(crcs) == [0, 1] and crcs[0] != crcs[1]  # each host read its own slice
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [int(re.match(r'{"step": (\d+)', line).group(1)) for line in f]
  assert steps == list(range(1, PAIR_STEPS + 1))  # process 0 alone writes, one row per step
  assert checkpoint.manager(str(workdir), read_only=True).latest_step() == PAIR_STEPS


@pytest.mark.slow
def test_two_processes_draw_their_own_augmentations(files, tmp_path, cifar10_sample):
  """A source of 64 copies of one real image, augment "cifar": the rows of the hosts' first
  batch differ only by their random crops and flips, so equal checksums mean equal draws."""
  np.savez(tmp_path / "same.npz", images=np.repeat(cifar10_sample[0][:1], 64, axis=0),
           labels=np.zeros(64, np.int32))
  errs = finish_pair(launch_pair(files, tmp_path / "run", f"--config.data.name={tmp_path}/same.npz",
                                 "--config.data.augment=cifar", "--config.total_steps=1",
                                 "--config.checkpoint_every=0", "--config.eval_every=0"))
  crcs = first_batch_crcs(errs)
  assert crcs[0] != crcs[1], crcs


@pytest.mark.slow
def test_two_processes_resume_after_sigterm(files, tmp_path, uninterrupted_pair):
  procs = launch_pair(files, tmp_path)
  while all(p.poll() is None for p in procs):
    if max(metrics_lib.read(tmp_path), default=0) >= 4:
      for p in procs:  # a pod's preemption notice reaches every host
        p.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  errs = finish_pair(procs)
  assert all("preempted: saved step" in e for e in errs), [e[-2000:] for e in errs]
  resumed_from = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert 4 <= resumed_from < PAIR_STEPS

  errs = finish_pair(launch_pair(files, tmp_path))
  assert all(f"resumed from step {resumed_from}" in e for e in errs)
  assert checkpoint.manager(str(tmp_path), read_only=True).latest_step() == PAIR_STEPS
  want, got = metrics_lib.read(uninterrupted_pair[0]), metrics_lib.read(tmp_path)
  assert sorted(got) == list(range(1, PAIR_STEPS + 1))
  steps = range(resumed_from + 1, PAIR_STEPS + 1)
  np.testing.assert_array_equal([got[s]["train_loss"] for s in steps],
                                [want[s]["train_loss"] for s in steps])
  assert got[PAIR_STEPS]["eval_loss"] == want[PAIR_STEPS]["eval_loss"]


@pytest.mark.slow
def test_two_processes_draw_each_original_beside_its_own_completions(files, tmp_path):
  finish_pair(launch_pair(files, tmp_path, "--config.total_steps=2", "--config.sample_every=2",
                     "--config.checkpoint_every=0", "--config.eval_every=0"))
  rows = grid_cells(Image.open(tmp_path / "samples_0000002.png"), n_px=4,
                    scale=sample_lib.display_scale(4))
  assert len(rows) == 5  # unconditional samples, then 4 held-out images
  for row in rows[1:]:  # [input | completions (one per batch shard, each host's own) | original]
    assert len(row) == 4
    for image in row[:-1]:  # every one keeps the original's top half
      np.testing.assert_array_equal(image[:2], row[-1][:2])


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


# Hosts as jax's cluster detection sees them, faked: (variables, TPU chips, VM metadata or None
# where the metadata server has no TPU attributes). A v5p-64 slice: 4 hosts; this is worker 2.
_WORKERS = "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4"
_GCE = {"agent-worker-number": "2", "worker-network-endpoints": _WORKERS, "tpu-env": ""}
HOSTS = {
    "cpu host": ({}, 0, None),
    "Cloud TPU VM (gcloud tpu-vm create)": ({}, 4, _GCE),
    "TPU on GKE": ({"TPU_WORKER_HOSTNAMES": _WORKERS, "TPU_WORKER_ID": "2"}, 4, None),
    "multislice": ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1", "MEGASCALE_NUM_SLICES": "2",
                    "MEGASCALE_SLICE_ID": "1"}, 4, _GCE),
    "SLURM": ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
               "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "node[1-4]"}, 0, None),
}


@pytest.fixture
def host(request, monkeypatch):
  """The faked host named by the test's parameter."""
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=import-outside-toplevel
  env, chips, metadata = HOSTS[request.param]
  for k in list(os.environ):
    if k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                     "JAX_PROCESS_ID", "OMPI_", "KUBERNETES_")):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(sharding, "_tpu_chips", lambda: chips)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", chips > 0)
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                      lambda key: (metadata[key], 200) if metadata else ("", 404))


@pytest.mark.parametrize("host", HOSTS, indirect=True)
def test_launch_kind_joins_wherever_jax_detects_a_cluster(host):
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  kinds = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  detected = [c.__name__ for c in kinds if not c.opt_in_only_method and c.is_env_present()]
  assert (sharding.launch_kind() == "cluster") == bool(detected), detected


@pytest.mark.parametrize("host", ["Cloud TPU VM (gcloud tpu-vm create)", "multislice"],
                         indirect=True)
def test_a_tpu_vm_without_variables_joins_its_whole_slice(initialize, host):
  """The slice's layout comes from the VM metadata alone: jax finds every host in it."""
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  sharding.maybe_initialize_distributed()
  assert initialize == [{}]
  address, count, index, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, 10)
  slices = int(os.environ.get("MEGASCALE_NUM_SLICES", 1))
  assert address == "10.0.0.1:8482" and count == 4 * slices
  assert index == 2 + 4 * int(os.environ.get("MEGASCALE_SLICE_ID", 0))


def test_skip_mds_query_keeps_a_tpu_host_alone(initialize, monkeypatch):
  monkeypatch.setattr(sharding, "_tpu_chips", lambda: 4)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # jax's own: no metadata to ask
  assert sharding.launch_kind() is None
  monkeypatch.delenv("TPU_SKIP_MDS_QUERY")
  assert sharding.launch_kind() == "cluster"
