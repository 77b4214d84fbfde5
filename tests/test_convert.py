"""Converter tests: exact round trip, refusals, and parity with transformers' ImageGPT (peer extra)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from igpt_jax import convert
from igpt_jax.model import IGPT, IGPTConfig, abstract_params

CFG = IGPTConfig(n_px=8, n_layer=2, n_embd=32, n_head=4)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_params(cfg, seed=0):
  """Every parameter random (the init's zero head would hide a transposed wtet)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                      nn.unbox(abstract_params(cfg)))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _tokens(cfg, batch=2, seed=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.n_ctx), np.int32)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_is_exact(scan_layers):
  cfg = CFG.replace(scan_layers=scan_layers)
  params = _random_params(cfg)
  sd, hf_config = convert.to_hf(cfg, params)
  assert sd["transformer.wte.weight"].shape == (513, 32)  # SOS is the extra row
  assert sd["lm_head.weight"].shape == (512, 32)
  cfg2, params2 = convert.from_hf(sd, hf_config, scan_layers=scan_layers)
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)


def test_accepts_buffers_model_naming_and_overrides():
  params = _random_params(CFG)
  sd, hf_config = convert.to_hf(CFG, params)
  # ImageGPTModel naming: no `transformer.` prefix and no head; plus an old-style mask buffer.
  bare = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
  bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
  cfg, out = convert.from_hf(bare, hf_config, param_dtype="bfloat16", n_classes=10)
  assert cfg.param_dtype == "bfloat16" and out["wte"].dtype == jax.numpy.bfloat16
  assert not out["wtet"].any() and out["clf"].shape == (32, 10) and not out["clf"].any()
  np.testing.assert_array_equal(out["sos"].astype(np.float32),
                                params["sos"].astype(jax.numpy.bfloat16).astype(np.float32))


def _edit(sd, hf_config, name, value):
  sd = dict(sd)
  if value is None:
    del sd[name]
  else:
    sd[name] = value
  return sd, hf_config


@pytest.mark.parametrize("edit, message", [
    (lambda sd, c: _edit(sd, c, "transformer.h.1.mlp.c_fc.bias",
                         np.eye(1, 128, 3, dtype=np.float32)[0] * 0.1),
     r"h\.1\.mlp\.c_fc\.bias is non-zero"),
    (lambda sd, c: _edit(sd, c, "transformer.wpe.weight", np.zeros((63, 32), np.float32)),
     r"wpe\.weight has shape \(63, 32\)"),
    (lambda sd, c: _edit(sd, c, "transformer.h.0.attn.c_attn.weight",
                         np.zeros((32, 32), np.float32)),
     r"h\.0\.attn\.c_attn\.weight has shape"),
    (lambda sd, c: _edit(sd, c, "transformer.h.2.ln_1.weight", np.ones(32, np.float32)),
     r"unexpected tensors .*h\.2\.ln_1\.weight"),
    (lambda sd, c: _edit(sd, c, "transformer.h.1.ln_2.weight", None),
     r"lacks tensors .*h\.1\.ln_2\.weight"),
    (lambda sd, c: (sd, {**c, "activation_function": "gelu"}), r"activation_function='gelu'"),
    (lambda sd, c: (sd, {**c, "n_positions": 60}), r"n_positions=60"),
    (lambda sd, c: (sd, {**c, "n_inner": 64}), r"n_inner=64"),
    (lambda sd, c: (sd, {k: v for k, v in c.items() if k != "n_head"}), r"lacks \['n_head'\]"),
])
def test_refuses_what_it_cannot_convert(edit, message):
  sd, hf_config = edit(*convert.to_hf(CFG, _random_params(CFG)))
  with pytest.raises(ValueError, match=message):
    convert.from_hf(sd, hf_config)


def test_refuses_architecture_overrides():
  with pytest.raises(ValueError, match=r"\['n_layer'\] are fixed by the checkpoint"):
    convert.from_hf(*convert.to_hf(CFG, _random_params(CFG)), n_layer=3)


# -- parity with transformers (peer extra) ------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
  """A random HF ImageGPTForCausalImageModeling with CFG's shape: zero biases, all else random."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.ImageGPTConfig(
      vocab_size=CFG.vocab_size + 1, n_positions=CFG.n_ctx, n_embd=CFG.n_embd,
      n_layer=CFG.n_layer, n_head=CFG.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.ImageGPTForCausalImageModeling(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.zero_()
      elif ".ln_" in name:
        p.uniform_(0.5, 1.5)  # gains away from 1, so a dropped norm gain shows
      else:
        p.normal_(0.0, 0.3)
  return model


def _hf_state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _hf_logits(model, tokens):
  """HF is fed the SOS id (512) then the image shifted right: logits[:, i] predict tokens[:, i]."""
  import torch
  sos = np.full((tokens.shape[0], 1), CFG.vocab_size, np.int64)
  ids = torch.from_numpy(np.concatenate([sos, tokens[:, :-1]], axis=1).astype(np.int64))
  with torch.no_grad():
    return model(ids).logits.numpy()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_parity_with_transformers(hf_model, scan_layers):
  tokens = _tokens(CFG)
  want = _hf_logits(hf_model, tokens)
  assert want.shape == (2, CFG.n_ctx, CFG.vocab_size)
  cfg, params = convert.from_hf(_hf_state_dict(hf_model), hf_model.config.to_dict(),
                                scan_layers=scan_layers)
  assert cfg == CFG.replace(scan_layers=scan_layers)
  got = IGPT(cfg).apply({"params": params}, tokens)
  assert np.std(want) > 1.0  # random weights give logits far from uniform
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_to_hf_gives_hf_state_dict(hf_model):
  sd = _hf_state_dict(hf_model)
  back, hf_config = convert.to_hf(*convert.from_hf(sd, hf_model.config.to_dict()))
  assert set(back) == set(sd)
  for name in sd:
    np.testing.assert_array_equal(back[name], sd[name], err_msg=name)
  for key, value in hf_config.items():
    if key not in ("architectures", "n_inner", "tie_word_embeddings") and not key.endswith("pdrop"):
      assert getattr(hf_model.config, key) == value, key


# -- a hub-style checkpoint directory through launch/convert.py ---------------------------------

def _write_hub_dir(model, path, weights):
  """Writes the files the hub ships: config.json, the weights, preprocessor_config.json."""
  import torch
  if weights == "safetensors":
    model.save_pretrained(path)
  else:  # The released pytorch_model.bin files are plain torch.save'd state dicts.
    model.config.to_json_file(os.path.join(path, "config.json"))
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
  clusters = np.random.default_rng(2).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump({"clusters": clusters.tolist(), "do_color_quantize": True}, f)
  return clusters


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_read_hf_dir(hf_model, tmp_path, weights):
  clusters = _write_hub_dir(hf_model, str(tmp_path), weights)
  sd, hf_config, palette = convert.read_hf_dir(str(tmp_path))
  np.testing.assert_array_equal(palette, clusters)
  _, params = convert.from_hf(sd, hf_config)
  _, want = convert.from_hf(_hf_state_dict(hf_model), hf_model.config.to_dict())
  _assert_trees_equal(params, want)


def test_write_hf_dir_loads_in_transformers(tmp_path):
  """Export: HF's own loader reads what we write and computes our logits."""
  transformers = pytest.importorskip("transformers")
  cfg, params = CFG, _random_params(CFG)
  clusters = np.random.default_rng(3).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  convert.write_hf_dir(str(tmp_path), cfg, params, clusters)
  model = transformers.ImageGPTForCausalImageModeling.from_pretrained(str(tmp_path)).eval()
  processor = transformers.ImageGPTImageProcessor.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(processor.clusters), clusters)
  tokens = _tokens(cfg)
  np.testing.assert_allclose(_hf_logits(model, tokens),
                             IGPT(cfg).apply({"params": params}, tokens), atol=1e-4, rtol=1e-4)
  _, back = convert.from_hf(*convert.read_hf_dir(str(tmp_path))[:2])
  _assert_trees_equal(back, params)


def test_read_hf_dir_errors(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    convert.read_hf_dir(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(convert.config_to_hf(CFG)))
  with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
    convert.read_hf_dir(str(tmp_path))


@pytest.mark.slow
def test_launch_convert_writes_a_loadable_checkpoint(hf_model, tmp_path):
  from igpt_jax import checkpoint, palette as palette_lib
  hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
  hf_dir.mkdir()
  clusters = _write_hub_dir(hf_model, str(hf_dir), "safetensors")
  subprocess.run([sys.executable, "-m", "launch.convert", f"--hf_dir={hf_dir}",
                  f"--workdir={workdir}"], cwd=REPO, check=True)
  cfg, params, palette = checkpoint.load(str(workdir))
  np.testing.assert_array_equal(palette, clusters)
  np.testing.assert_array_equal(palette_lib.load_palette(str(workdir / "palette.npy")), clusters)
  tokens = _tokens(cfg)
  np.testing.assert_allclose(IGPT(cfg).apply({"params": params}, tokens),
                             _hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


# OpenAI's release (github.com/openai/image-gpt, src/model.py), by its TF variable names.


def _openai_variables(cfg, seed=0, bert=False, n_classes=0):
  """Random variables named and shaped as OpenAI's checkpoints, with optimizer state beside."""
  rng = np.random.default_rng(seed)
  d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
  r = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  v = {"model/wte": r(cfg.vocab_size, d), "model/wpe": r(cfg.n_ctx, d),
       "model/wtet": r(cfg.vocab_size, d), "model/ln_f/g": 1 + r(d)}
  if not bert:
    v["model/sos"] = r(d)
  if n_classes:
    v["model/clf/wclf"] = r(n_classes, d)
  for i in range(cfg.n_layer):
    p = f"model/h{i}/"
    v.update({p + "ln_1/g": 1 + r(d), p + "ln_2/g": 1 + r(d), p + "attn/q_proj": r(h, hd, d),
              p + "attn/k_proj": r(h, hd, d), p + "attn/v_proj": r(h, hd, d),
              p + "attn/c_proj": r(h, hd, d), p + "mlp/c_fc/w": r(d, 4 * d),
              p + "mlp/c_proj/w": r(4 * d, d)})
  return v


def _openai_logits(v, tokens, n_layer):
  """The release's AR forward (src/model.py) in numpy, straight from its variables."""
  norm = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * g
  x = v["model/wte"][tokens]
  b, t = tokens.shape
  x = np.concatenate([np.broadcast_to(v["model/sos"], (b, 1, x.shape[-1])), x[:, :-1]], 1)
  x = x + v["model/wpe"][:t]
  causal = np.tril(np.ones((t, t)))
  for i in range(n_layer):
    p = f"model/h{i}/"
    a = norm(x, v[p + "ln_1/g"])
    q, k, val = (np.einsum("bsf,hef->bhse", a, v[p + f"attn/{n}_proj"]) for n in "qkv")
    w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    w = w * causal - 1e10 * (1 - causal)
    w = np.exp(w - w.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    x = x + np.einsum("bhse,hef->bsf", w @ val, v[p + "attn/c_proj"])
    m = norm(x, v[p + "ln_2/g"]) @ v[p + "mlp/c_fc/w"]
    x = x + (m / (1 + np.exp(-1.702 * m))) @ v[p + "mlp/c_proj/w"]
  return norm(x, v["model/ln_f/g"]) @ v["model/wtet"].T


@pytest.mark.parametrize("scan_layers", [False, True])
def test_from_openai_gives_the_release_logits(scan_layers):
  variables = _openai_variables(CFG)
  cfg, params = convert.from_openai(variables, scan_layers=scan_layers)
  assert cfg == CFG.replace(scan_layers=scan_layers)
  tokens = _tokens(cfg)
  np.testing.assert_allclose(IGPT(cfg).apply({"params": params}, tokens),
                             _openai_logits(variables, tokens, CFG.n_layer), atol=1e-4, rtol=1e-4)


def test_from_openai_bert_and_classifier_checkpoints():
  variables = _openai_variables(CFG, bert=True, n_classes=10)
  cfg, params = convert.from_openai(variables)
  assert (cfg.objective, cfg.n_classes) == ("bert", 10)
  shapes = jax.tree.map(lambda s: s.shape, nn.unbox(abstract_params(cfg)))
  assert jax.tree.map(np.shape, params) == shapes
  np.testing.assert_array_equal(params["clf"], variables["model/clf/wclf"].T)
  np.testing.assert_array_equal(params["sos"], 0)


@pytest.mark.parametrize("edit, message", [
    (lambda v: v.pop("model/wpe"), "no model/wpe"),
    (lambda v: v.pop("model/h1/mlp/c_fc/w"), "lacks model/h1/mlp/c_fc/w"),
    (lambda v: v.update({"model/wtet": v["model/wtet"][:, :8]}), "model/wtet has shape"),
    (lambda v: v.update({"model/wpe": v["model/wpe"][:60]}), "not a square image"),
])
def test_from_openai_refuses_broken_checkpoints(edit, message):
  variables = _openai_variables(CFG)
  edit(variables)
  with pytest.raises(ValueError, match=message):
    convert.from_openai(variables)
  with pytest.raises(ValueError, match="fixed by the checkpoint"):
    convert.from_openai(_openai_variables(CFG), n_layer=3)


@pytest.mark.slow
def test_tf_checkpoint_through_launch_convert(tmp_path):
  tf = pytest.importorskip("tensorflow", reason="reading TF checkpoints needs the data extra")
  from igpt_jax import checkpoint
  variables = _openai_variables(CFG)
  # As the release's Saver wrote them: Adam slots and a step counter beside the weights.
  saved = {**variables, "model/h0/attn/q_proj/Adam": variables["model/h0/attn/q_proj"],
           "global_step": np.int64(1000000)}
  prefix = str(tmp_path / "model.ckpt-1000000")
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(saved), shape_and_slices=[""] * len(saved),
                    tensors=[tf.constant(x) for x in saved.values()])
  read = convert.read_tf_checkpoint(prefix)
  assert sorted(read) == sorted(variables)
  with pytest.raises(ValueError, match="cannot read a TF checkpoint"):
    convert.read_tf_checkpoint(str(tmp_path / "missing.ckpt"))

  clusters = np.random.default_rng(0).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  np.save(tmp_path / "kmeans_centers.npy", clusters)
  workdir = tmp_path / "work"
  subprocess.run([sys.executable, "-m", "launch.convert", f"--tf_checkpoint={prefix}",
                  f"--palette={tmp_path / 'kmeans_centers.npy'}", f"--workdir={workdir}"],
                 cwd=REPO, check=True)
  cfg, params, palette = checkpoint.load(str(workdir))
  np.testing.assert_array_equal(palette, clusters)
  tokens = _tokens(cfg)
  np.testing.assert_allclose(IGPT(cfg).apply({"params": params}, tokens),
                             _openai_logits(variables, tokens, CFG.n_layer), atol=1e-4, rtol=1e-4)
