"""igpt_jax as another program's library: the model under the caller's own jit / grad / vmap
and mesh of the caller's own axis names, and importing the package (or loading a checkpoint
with it) leaves the process as it was."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from igpt_jax import checkpoint
from igpt_jax import model as model_lib
from conftest import REPO

CFG = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=4, vocab_size=16)
MODEL = model_lib.IGPT(CFG)


def _params_and_tokens():
  """Parameters (a random head: the zero-initialised one would hide the trunk) and tokens as a
  caller holds them: a jax.Array on the device."""
  params = model_lib.init_params(CFG, jax.random.key(0))
  params["wtet"] = 0.1 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  return params, jax.random.randint(jax.random.key(2), (8, CFG.n_ctx), 0, CFG.vocab_size)


def _loss(tokens):
  return lambda p: jnp.mean(MODEL.apply({"params": p}, tokens) ** 2)


def test_closed_over_tokens_under_the_callers_jit_grad_and_vmap():
  params, tokens = _params_and_tokens()
  host = np.asarray(tokens)  # the reference closes over numpy: a constant, checked on the host
  ref = jax.jit(lambda p: MODEL.apply({"params": p}, host))(params)
  np.testing.assert_allclose(jax.jit(lambda p: MODEL.apply({"params": p}, tokens))(params),
                             ref, atol=1e-6)
  ref_grads = jax.jit(jax.grad(_loss(host)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               jax.jit(jax.grad(_loss(tokens)))(params), ref_grads)
  ensemble = jax.tree.map(lambda x: jnp.stack([x, x]), params)  # vmap over parameters
  out = jax.jit(jax.vmap(lambda p: MODEL.apply({"params": p}, tokens)))(ensemble)
  np.testing.assert_allclose(out, jnp.stack([ref, ref]), atol=1e-6)
  # An eager apply reads nothing back from the device (the old value check synced each call).
  with jax.transfer_guard_device_to_host("disallow"):
    eager = MODEL.apply({"params": params}, tokens)
  np.testing.assert_allclose(eager, ref, atol=1e-5)


def test_a_callers_mesh_with_its_own_axis_names_and_rules():
  """Mesh(devices, ("replica", "model")) and the caller's flax rules: the model lays itself
  out as those rules say, and computes what it computes unsharded."""
  params, tokens = _params_and_tokens()
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("replica", "model"))
  rules = (("batch", "replica"), ("heads", "model"), ("mlp", "model"), ("vocab", "model"),
           ("embed", None), ("kv", None), ("length", None), ("layers", None))
  specs = nn.get_partition_spec(model_lib.abstract_params(CFG))
  placed = jax.device_put(params, nn.logical_to_mesh_sharding(specs, mesh, rules))
  batch = jax.device_put(tokens, NamedSharding(mesh, P("replica")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = jax.jit(lambda p: MODEL.apply({"params": p}, batch))(placed)
    grads = jax.jit(jax.grad(_loss(batch)))(placed)
  assert logits.sharding.spec == P("replica", None, "model")  # [B, T, V] by the caller's rules
  np.testing.assert_allclose(logits, MODEL.apply({"params": params}, np.asarray(tokens)),
                             atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads,
               jax.jit(jax.grad(_loss(np.asarray(tokens))))(params))


# What a process looks like: environment, file descriptor 2, the unraisable hook, every log
# filter, and whether anything re-pointed a file descriptor (os.dup2) meanwhile.
_STATE = r"""
import json, logging, os, sys
_dup2, _calls = os.dup2, []
os.dup2 = lambda *a, **k: _calls.append(a) or _dup2(*a, **k)

def state():
  st = os.fstat(2)
  loggers = [""] + sorted(logging.root.manager.loggerDict)
  return dict(env=dict(os.environ), fd2=[st.st_dev, st.st_ino], dup2=len(_calls),
              hook=repr(sys.unraisablehook),
              filters={n: [repr(f) for f in logging.getLogger(n).filters] for n in loggers
                       if logging.getLogger(n).filters},
              modules=sorted(m for m in sys.modules
                             if m.startswith(("jax.experimental.pallas.ops.tpu", "tensorflow"))))

states = [state()]
"""
# The third-party packages the library imports: what they change on import is theirs (jax
# itself sets TPU_SKIP_MDS_QUERY and TF_CPP_MIN_LOG_LEVEL on a host without TPU chips).
_DEPENDENCIES = ("absl.logging", "chex", "einops", "etils.epath", "flax.linen", "fsspec", "jax",
                 "ml_collections", "ml_dtypes", "numpy", "optax", "orbax.checkpoint", "PIL.Image",
                 "tqdm")
_LIBRARY = ("igpt_jax", "igpt_jax.model", "igpt_jax.checkpoint", "igpt_jax.attention",
            "igpt_jax.console", "igpt_jax.convert", "igpt_jax.data", "igpt_jax.evaluators",
            "igpt_jax.faults", "igpt_jax.finetune", "igpt_jax.kernels", "igpt_jax.metrics",
            "igpt_jax.palette", "igpt_jax.paths", "igpt_jax.plan", "igpt_jax.probe",
            "igpt_jax.sample", "igpt_jax.sharding", "igpt_jax.steps", "igpt_jax.train")


def _states(*statements):
  """The process state at its start and after each statement, in a fresh interpreter."""
  code = _STATE + "".join(f"{s}\nstates.append(state())\n" for s in statements)
  out = subprocess.run([sys.executable, "-c", code + "print(json.dumps(states))"], cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=600)
  return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters, each importing jax, flax and orbax
def test_importing_the_library_or_loading_a_checkpoint_changes_nothing(tmp_path):
  palette = np.random.default_rng(0).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  checkpoint.save_params(str(tmp_path / "run"), CFG, _params_and_tokens()[0], palette)
  start, deps = _states(*(f"import {m}" for m in _DEPENDENCIES))[::len(_DEPENDENCIES)]
  states = _states(*(f"import {m}" for m in _LIBRARY),
                   f"import igpt_jax.checkpoint as c; c.load({str(tmp_path / 'run')!r})")
  assert states[0]["hook"] == start["hook"] and states[0]["filters"] == start["filters"]
  for name, after in zip(_LIBRARY + ("checkpoint.load",), states[1:]):
    assert after["dup2"] == 0, f"{name}: re-pointed a file descriptor"
    assert after["fd2"] == states[0]["fd2"], name
    assert after["hook"] == start["hook"], f"{name} installed {after['hook']}"
    assert after["filters"] == deps["filters"], f"{name}: log filters {after['filters']}"
    assert not after["modules"], f"{name} imported {after['modules']}"
  changed = {k: v for k, v in states[-1]["env"].items() if deps["env"].get(k) != v}
  assert not changed and set(deps["env"]) == set(states[-1]["env"]), changed
