"""Checkpoints: weights-only round trip, full train-state restore, refusal of another model."""

import json

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from igpt_jax import checkpoint
from igpt_jax import sharding
from igpt_jax import steps
from igpt_jax.model import IGPTConfig, init_params

CFG = IGPTConfig(n_px=4, n_layer=2, n_embd=16, n_head=2, vocab_size=16)
PALETTE = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("scan", [False, True])
def test_save_params_then_load(tmp_path, scan):
  cfg = CFG.replace(scan_layers=scan)
  params = init_params(cfg, jax.random.key(0))
  checkpoint.save_params(str(tmp_path), cfg, params, PALETTE, step=7)
  got_cfg, got_params, got_palette = checkpoint.load(str(tmp_path))
  assert got_cfg == cfg
  assert_trees_equal(got_params, params)
  np.testing.assert_array_equal(got_palette, PALETTE)
  assert checkpoint.read_meta(str(tmp_path))["step"] == 7
  with pytest.raises(FileNotFoundError, match="steps present: \\[7\\]"):
    checkpoint.load(str(tmp_path), step=3)


def test_load_onto_a_mesh_restores_parameters_in_their_training_layout(tmp_path):
  cfg = CFG.replace(scan_layers=True)
  params = init_params(cfg, jax.random.key(0))
  checkpoint.save_params(str(tmp_path), cfg, params, PALETTE)
  mesh = sharding.make_mesh((2, 2, 2))
  _, got, _ = checkpoint.load(str(tmp_path), mesh=mesh)
  assert_trees_equal(got, params)
  want = steps.param_shardings(cfg, mesh)
  for array, layout in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert array.sharding.is_equivalent_to(layout, array.ndim)
  # Split, not copied: a c_fc shard holds a quarter (fsdp 2 x tensor 2) of the stacked weight.
  shard = got["h"]["c_fc"].addressable_shards[0].data
  assert shard.size * 4 == got["h"]["c_fc"].size


def test_load_and_save_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoint.load(str(tmp_path / "empty"))
  params = init_params(CFG, jax.random.key(0))
  with pytest.raises(ValueError, match="shapes"):
    checkpoint.save_params(str(tmp_path), CFG.replace(n_px=8), params, PALETTE)
  with pytest.raises(ValueError, match="tree"):
    checkpoint.save_params(str(tmp_path), CFG.replace(scan_layers=True), params, PALETTE)


def saved_run(workdir, cfg=CFG, step=3):
  """Saves a train state (params moved off init) the way the loop does; -> (state, tx, mesh)."""
  mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  tx = steps.make_optimizer(1e-3, 10)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state = steps.create_train_state(cfg, tx, mesh, jax.random.key(0))
    tokens = np.arange(2 * cfg.n_ctx, dtype=np.int32).reshape(2, -1) % cfg.vocab_size
    train_step = steps.make_train_step(steps.loss_fn(cfg), tx,
                                       steps.state_shardings(cfg, tx, mesh))
    state, _ = train_step(state, {"tokens": tokens})
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, step, state.params, state.opt_state,
                  checkpoint.make_meta(cfg, PALETTE, step, {"lr": 1e-3}))
  mngr.wait_until_finished()
  return state, tx, mesh


def test_restore_train_state_sharded(tmp_path):
  state, tx, _ = saved_run(str(tmp_path))
  mesh = sharding.make_mesh((2, 2, 2))  # restore onto another layout than the one saved
  abstract = steps.abstract_train_state(CFG, tx, mesh)
  params, opt_state, meta = checkpoint.restore(checkpoint.manager(str(tmp_path)),
                                               abstract.params, abstract.opt_state, CFG)
  assert meta["step"] == 3 and meta["config"] == {"lr": 1e-3}
  assert_trees_equal(params, state.params)
  assert_trees_equal(opt_state, state.opt_state)
  assert params["wte"].sharding == abstract.params["wte"].sharding


def test_restore_refuses_another_model(tmp_path):
  saved_run(str(tmp_path))
  other = CFG.replace(n_embd=32)
  mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  abstract = steps.abstract_train_state(other, steps.make_optimizer(1e-3, 10), mesh)
  with pytest.raises(ValueError, match="n_embd: checkpoint 16 vs config 32"):
    checkpoint.restore(checkpoint.manager(str(tmp_path)), abstract.params, abstract.opt_state,
                       other)
  # How the model runs may change on resume; what it is may not.
  checkpoint.check_compatible(CFG.to_dict(), CFG.replace(dtype="bfloat16", remat="full"), "x")
  with pytest.raises(ValueError, match="scan_layers"):
    checkpoint.check_compatible(CFG.to_dict(), CFG.replace(scan_layers=True), "x")


def test_best_checkpoint_is_kept_and_loaded(tmp_path):
  """keep=2 plus the best by accuracy: an old best survives newer, worse checkpoints."""
  params = init_params(CFG, jax.random.key(0))
  mngr = checkpoint.manager(str(tmp_path), keep=2, best_metric=checkpoint.BEST_METRIC)
  for step, accuracy in zip(range(1, 6), [0.1, 0.9, 0.3, 0.9, 0.4]):
    moved = jax.tree.map(lambda p, s=step: p + s, params)  # each step's params differ
    checkpoint.save(mngr, step, moved, None, checkpoint.make_meta(CFG, PALETTE, step),
                    metrics={checkpoint.BEST_METRIC: accuracy})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2, 4, 5]  # the newest two and the best (a tie is no gain)
  assert checkpoint.best_step(str(tmp_path)) == 2
  _, got, _ = checkpoint.load(str(tmp_path), "best")
  assert_trees_equal(got, jax.tree.map(lambda p: p + 2, params))


# What TensorStore and orbax raised here for each fault (tests/pair_process.py injects two).
ZARR = 'Error opening "zarr" driver: Error reading "wte/.zarray" in OCDBT database at "{}/"'


@pytest.mark.parametrize("error, unreadable", [
    (ValueError("OUT_OF_RANGE: " + ZARR), True),  # a truncated array file
    (ValueError("DATA_LOSS: " + ZARR), True),  # zeroed bytes, a corrupt manifest
    (ValueError("NOT_FOUND: " + ZARR), True),  # an array file gone
    (KeyError('Item "params" was not found in the checkpoint. Available items: [meta]'), True),
    (json.JSONDecodeError("Expecting property name enclosed in double quotes", "{x", 1), True),
    (FileNotFoundError("Checkpoint at /w/checkpoints/6 not found."), True),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not "
                "match:"), True),
    (ValueError("Requested shape: (2, 16, 32) is not compatible with the stored shape: "
                "(2, 8, 16)."), True),
    (ValueError("UNAVAILABLE: " + ZARR + ": HTTP response code: 503 with body: "), False),
    (ValueError("DEADLINE_EXCEEDED: " + ZARR), False),
    (ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.1GiB"), False),
    (ValueError("INTERNAL: " + ZARR + ": HTTP response code: 500"), False),
    (TimeoutError("timed out"), False),
    (ConnectionResetError(104, "Connection reset by peer"), False),
    (MemoryError(), False),
    (RuntimeError("an error never seen before"), False),  # unknown: never set aside
])
def test_unreadable_checkpoints_are_told_from_passing_failures(error, unreadable):
  assert checkpoint.is_unreadable(error) == unreadable
  try:
    try:
      raise error
    except BaseException as e:  # pylint: disable=broad-except
      raise RuntimeError("restore failed") from e  # how orbax may wrap it
  except RuntimeError as wrapped:
    assert checkpoint.is_unreadable(wrapped) == unreadable


@pytest.fixture
def failing_reads(monkeypatch):
  """Reads of the train state fail like a GCS 503, `times[0]` times; -> times."""
  monkeypatch.setattr(checkpoint, "RESTORE_WAIT_S", 0.01)
  real, times = ocp.StandardCheckpointHandler.restore, [0]

  def restore(self, directory, *args, **kwargs):
    if times[0] > 0:
      times[0] -= 1
      raise ValueError(f"UNAVAILABLE: {ZARR.format(directory)}: HTTP response code: 503")
    return real(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", restore)
  return times


def restore_newest(workdir, cfg=CFG, tx=None):
  mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  abstract = steps.abstract_train_state(cfg, tx or steps.make_optimizer(1e-3, 10), mesh)
  return checkpoint.restore(checkpoint.manager(str(workdir)), abstract.params,
                            abstract.opt_state, cfg, set_aside=str(workdir / "aside"))


def test_storage_failing_for_a_while_is_retried(tmp_path, failing_reads, caplog):
  state, _, _ = saved_run(str(tmp_path))
  failing_reads[0] = checkpoint.RESTORE_TRIES - 1
  with caplog.at_level("WARNING"):
    params, _, meta = restore_newest(tmp_path)
  assert meta["step"] == 3 and failing_reads[0] == 0
  assert_trees_equal(params, state.params)
  assert "HTTP response code: 503); try 2 of 4 in 0.0 s" in caplog.text
  assert not (tmp_path / "aside").exists()


def test_storage_failing_for_good_stops_the_restore_in_one_line_nothing_set_aside(
    tmp_path, failing_reads):
  saved_run(str(tmp_path), step=3)
  saved_run(str(tmp_path), step=6)
  failing_reads[0] = 100
  with pytest.raises(checkpoint.RestoreFailed, match=r"checkpoint .*/checkpoints/6 could not be "
                     r"read, 4 tries \(ValueError: UNAVAILABLE: .*503\); nothing was set aside: "
                     r"rerun the same command once the storage answers"):
    restore_newest(tmp_path)  # not step 3: step 6 is not known to be bad
  assert checkpoint.manager(str(tmp_path)).all_steps() == [3, 6]
  assert not (tmp_path / "aside").exists() and failing_reads[0] == 100 - 4
