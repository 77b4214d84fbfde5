"""Hugging Face ImageGPT weights <-> igpt_jax parameters, without torch; and OpenAI's release.

Hugging Face's `ImageGPTForCausalImageModeling` (and the released `openai/imagegpt-small|medium|
large`) computes the same function as `igpt_jax.model.IGPT`; only the storage differs:
  - `wte` has vocab_size + 1 rows; row 512 is the start-of-sequence vector (our `sos`), and HF
    feeds it as input id 512 where our model prepends it itself.
  - Attention and MLP weights are GPT-2 `Conv1D`s, [in, out] with fused q|k|v columns: the same
    layout as ours once reshaped ([D, 3D] -> [D, 3, H, hd], [D, D] -> [H, hd, D]).
  - `lm_head` [512, D] (no bias) is our untied `wtet`.
  - Every Conv1D carries a bias that the released weights keep at zero; iGPT has none, so zero
    biases are dropped and a non-zero one is refused rather than silently lost.
  - `ImageGPTLayerNorm` is the release's RMS-style norm (no mean, no bias): `weight` is our `g`.

Entry points:
  from_hf(state_dict, hf_config, **cfg_overrides) -> (IGPTConfig, params)
  to_hf(cfg, params) -> (state_dict, hf_config)
  read_hf_dir(path) -> (state_dict, hf_config, palette or None)   (a hub checkpoint directory)
  write_hf_dir(path, cfg, params, palette)                        (the same files, for export)
  from_openai(variables, **cfg_overrides) -> (IGPTConfig, params)  (OpenAI's TF variables)
  read_tf_checkpoint(prefix) -> variables       (`model.ckpt-1000000`; needs tensorflow)

OpenAI's own release (github.com/openai/image-gpt, `model.ckpt-1000000` + `kmeans_centers.npy`)
stores the variables of its src/model.py under `model/`: `wte`, `wpe`, `wtet`, `sos` (AR models
only) and `ln_f/g`; per layer `h{i}/ln_1/g`, `h{i}/ln_2/g`, `h{i}/attn/{q,k,v}_proj` and
`h{i}/attn/c_proj` as [H, hd, D] (used as einsum "bsf,hef->bhse" and "bhse,hef->bsf"),
`h{i}/mlp/c_fc/w` [D, 4D] and `h{i}/mlp/c_proj/w` [4D, D]; fine-tuned ones add `clf/wclf`
[C, D]. Optimizer slots and step counters beside them are ignored.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax.model import IGPTConfig

# Causal-mask buffers that older HF versions saved with the weights (`h.{i}.attn.bias` is the
# mask, `h.{i}.attn.c_attn.bias` a real bias).
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# Fixed by the checkpoint's tensors, so not overridable in from_hf.
_ARCH_FIELDS = ("n_px", "n_layer", "n_embd", "n_head", "vocab_size", "norm_eps")


def config_from_hf(hf_config: Mapping, **overrides) -> IGPTConfig:
  """IGPTConfig of a HF ImageGPT config dict, or a ValueError for what iGPT cannot express."""
  missing = [k for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
             if k not in hf_config]
  if missing:
    raise ValueError(f"HF config lacks {missing}; is this an ImageGPT config.json?")
  if hf_config.get("model_type", "imagegpt") != "imagegpt":
    raise ValueError(f"HF config has model_type={hf_config['model_type']!r}, expected 'imagegpt'")
  d = hf_config["n_embd"]
  # Options of the HF class that change the function; the released models use the defaults.
  expected = {"activation_function": "quick_gelu", "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
  for key, want in expected.items():
    if hf_config.get(key, want) != want:
      raise ValueError(f"HF config has {key}={hf_config[key]!r}; iGPT needs {want!r}")
  if hf_config.get("n_inner") not in (None, 4 * d):
    raise ValueError(f"HF config has n_inner={hf_config['n_inner']}; iGPT's MLP is 4 * n_embd "
                     f"= {4 * d}")
  n_ctx = hf_config["n_positions"]
  n_px = math.isqrt(n_ctx)
  if n_px * n_px != n_ctx:
    raise ValueError(f"HF config has n_positions={n_ctx}, not a square image (n_px**2)")
  fixed = sorted(set(overrides) & set(_ARCH_FIELDS))
  if fixed:
    raise ValueError(f"{fixed} are fixed by the checkpoint and cannot be overridden")
  return IGPTConfig(n_px=n_px, n_layer=hf_config["n_layer"], n_embd=d,
                    n_head=hf_config["n_head"], vocab_size=hf_config["vocab_size"] - 1,
                    norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5))).replace(**overrides)


def config_to_hf(cfg: IGPTConfig) -> dict:
  """HF ImageGPTConfig fields (config.json) describing the same model."""
  return {"model_type": "imagegpt", "architectures": ["ImageGPTForCausalImageModeling"],
          "vocab_size": cfg.vocab_size + 1, "n_positions": cfg.n_ctx, "n_embd": cfg.n_embd,
          "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
          "activation_function": "quick_gelu", "layer_norm_epsilon": cfg.norm_eps,
          "tie_word_embeddings": False,
          # iGPT trains without dropout.
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _layout(cfg: IGPTConfig):
  """(HF name, HF shape, our path, our shape) of every weight but wte/sos (unscanned tree)."""
  d, h, hd, v, t = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.n_ctx
  rows = [("wpe.weight", (t, d), ("wpe",), (t, d)),
          ("ln_f.weight", (d,), ("ln_f", "g"), (d,)),
          ("lm_head.weight", (v, d), ("wtet",), (v, d))]
  for i in range(cfg.n_layer):
    hf, ours = f"h.{i}.", f"h_{i}"
    rows += [(hf + "ln_1.weight", (d,), (ours, "ln_1", "g"), (d,)),
             (hf + "attn.c_attn.weight", (d, 3 * d), (ours, "attn", "c_attn"), (d, 3, h, hd)),
             (hf + "attn.c_proj.weight", (d, d), (ours, "attn", "c_proj"), (h, hd, d)),
             (hf + "ln_2.weight", (d,), (ours, "ln_2", "g"), (d,)),
             (hf + "mlp.c_fc.weight", (d, 4 * d), (ours, "c_fc"), (d, 4 * d)),
             (hf + "mlp.c_proj.weight", (4 * d, d), (ours, "c_proj"), (4 * d, d))]
  return rows


def _biases(cfg: IGPTConfig):
  """HF bias tensors (name, shape) that iGPT does not have: they must be zero."""
  d = cfg.n_embd
  return [(f"h.{i}.{name}.bias", (n,)) for i in range(cfg.n_layer)
          for name, n in (("attn.c_attn", 3 * d), ("attn.c_proj", d), ("mlp.c_fc", 4 * d),
                          ("mlp.c_proj", d))]


def _hf_names(state_dict: Mapping) -> dict:
  """Drops the `transformer.` prefix (ImageGPTModel naming has none) and the mask buffers."""
  out = {}
  for name, value in state_dict.items():
    short = name.removeprefix("transformer.")
    if not _BUFFER.fullmatch(short):
      out[short] = value
  return out


def _get(tree: Mapping, path):
  for key in path:
    tree = tree[key]
  return tree


def _put(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def stack_blocks(params: Mapping, n_layer: int) -> dict:
  """Unscanned params (`h_0` .. `h_{L-1}`) -> scanned (`h` with a leading [L] axis)."""
  blocks = [params[f"h_{i}"] for i in range(n_layer)]
  out = {k: v for k, v in params.items() if not re.fullmatch(r"h_\d+", k)}
  out["h"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  return out


def unstack_blocks(params: Mapping, n_layer: int) -> dict:
  """Scanned params (`h` with a leading [L] axis) -> unscanned (`h_0` .. `h_{L-1}`)."""
  out = {k: v for k, v in params.items() if k != "h"}
  for i in range(n_layer):
    out[f"h_{i}"] = jax.tree.map(lambda x: np.asarray(x)[i], params["h"])
  return out


def from_hf(state_dict: Mapping, hf_config: Mapping, **cfg_overrides):
  """HF ImageGPT weights (numpy arrays by HF name) -> (IGPTConfig, params of numpy arrays).

  Accepts `ImageGPTForCausalImageModeling` names (`transformer.h.0...`, `lm_head.weight`) and
  `ImageGPTModel` names (no prefix, no head). Without `lm_head.weight` the output table is zero,
  as in a fresh model: features are exact, next-token predictions uniform.
  cfg_overrides: non-architecture IGPTConfig fields (e.g. scan_layers=True, dtype="bfloat16",
  param_dtype, n_classes for a zero classifier head).
  """
  cfg = config_from_hf(hf_config, **cfg_overrides)
  sd = _hf_names(state_dict)
  rows = _layout(cfg)
  biases = _biases(cfg)
  if "lm_head.weight" not in sd:
    logging.warning("no lm_head.weight in the checkpoint: the output table wtet is zero")
    sd["lm_head.weight"] = np.zeros((cfg.vocab_size, cfg.n_embd), np.float32)
  required = {"wte.weight"} | {r[0] for r in rows}
  unknown = sorted(set(sd) - required - {b[0] for b in biases})
  if unknown:
    raise ValueError(f"unexpected tensors for a {cfg.n_layer}-layer ImageGPT: {unknown[:8]}"
                     f"{' ...' if len(unknown) > 8 else ''}")
  missing = sorted(required - set(sd))
  if missing:
    raise ValueError(f"checkpoint lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")

  def fetch(name, shape):
    x = np.asarray(sd[name])
    if x.shape != shape:
      raise ValueError(f"{name} has shape {x.shape}, expected {shape} for this config")
    return x

  for name, shape in biases:
    if name in sd and np.any(fetch(name, shape) != 0):
      raise ValueError(f"{name} is non-zero (max |b| = {np.abs(sd[name]).max():.3g}); iGPT has no "
                       "biases, so this checkpoint cannot be converted exactly")
  dtype = jnp.dtype(cfg.param_dtype)
  params = {}
  # HF keeps the start vector as the extra last row of the token table.
  wte = fetch("wte.weight", (cfg.vocab_size + 1, cfg.n_embd))
  params["wte"], params["sos"] = wte[:-1].astype(dtype), wte[-1].astype(dtype)
  for name, shape, path, ours in rows:
    _put(params, path, fetch(name, shape).reshape(ours).astype(dtype))
  if cfg.n_classes:
    params["clf"] = np.zeros((cfg.n_embd, cfg.n_classes), dtype)
  if cfg.scan_layers:
    params = stack_blocks(params, cfg.n_layer)
  return cfg, params


def to_hf(cfg: IGPTConfig, params: Mapping):
  """(cfg, params) -> (float32 state_dict in ImageGPTForCausalImageModeling names, config dict).

  The state dict includes the zero biases HF expects, so `load_state_dict(strict=True)` works.
  """
  if cfg.n_classes:
    raise ValueError("ImageGPTForCausalImageModeling has no classifier head: drop `clf` and "
                     "convert with n_classes=0")
  params = unstack_blocks(params, cfg.n_layer) if cfg.scan_layers else params
  f32 = lambda x: np.asarray(x, np.float32)
  sd = {"transformer.wte.weight": np.concatenate([f32(params["wte"]), f32(params["sos"])[None]])}
  for name, shape, path, _ in _layout(cfg):
    prefix = "" if name == "lm_head.weight" else "transformer."
    sd[prefix + name] = f32(_get(params, path)).reshape(shape)
  for name, shape in _biases(cfg):
    sd["transformer." + name] = np.zeros(shape, np.float32)
  return sd, config_to_hf(cfg)


def _load_weights(path) -> dict:
  if os.fspath(path).endswith(".safetensors"):
    try:
      from safetensors.numpy import load
    except ImportError as e:
      raise ImportError(f"reading {path} needs `safetensors` (pip install safetensors)") from e
    return load(paths.path(path).read_bytes())
  try:
    import torch  # Only the legacy pickle format needs it.
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch; or convert the checkpoint to "
                      "model.safetensors") from e
  sd = torch.load(io.BytesIO(paths.path(path).read_bytes()), map_location="cpu",
                  weights_only=True)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()}


def read_hf_dir(hf_dir):
  """A hub checkpoint directory (local or gs://) -> (state_dict of numpy arrays, config dict,
  palette or None).

  Reads `config.json`, the weights (`model.safetensors` or `pytorch_model.bin`, either possibly
  sharded with an `.index.json`) and the palette: `clusters` of `preprocessor_config.json`,
  a (512, 3) array in [-1, 1] (None when that file is absent).
  """
  root = paths.path(hf_dir)
  if not (root / "config.json").exists():
    raise ValueError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory")
  hf_config = paths.read_json(root / "config.json")

  files = None
  for name in ("model.safetensors", "pytorch_model.bin"):
    if (root / name).exists():
      files = [name]
    elif (root / f"{name}.index.json").exists():
      files = sorted(set(paths.read_json(root / f"{name}.index.json")["weight_map"].values()))
    if files:
      break
  if not files:
    raise ValueError(f"{hf_dir} has no model.safetensors or pytorch_model.bin (or their "
                     ".index.json)")
  state_dict = {}
  for name in files:
    state_dict.update(_load_weights(root / name))

  palette = None
  preprocessor_path = root / "preprocessor_config.json"
  if preprocessor_path.exists():
    clusters = paths.read_json(preprocessor_path).get("clusters")
    if clusters is None:
      raise ValueError(f"{preprocessor_path} has no `clusters` (the palette)")
    palette = palette_lib.check_palette(np.asarray(clusters, np.float32),
                                        k=hf_config.get("vocab_size", 513) - 1)
  return state_dict, hf_config, palette


def write_hf_dir(hf_dir, cfg: IGPTConfig, params: Mapping, palette) -> None:
  """Writes the files `read_hf_dir` reads (and `ImageGPTForCausalImageModeling.from_pretrained`
  loads): config.json, model.safetensors and preprocessor_config.json with the palette."""
  from safetensors.numpy import save
  palette = palette_lib.check_palette(palette, k=cfg.vocab_size)
  state_dict, hf_config = to_hf(cfg, params)
  root = paths.path(hf_dir)
  paths.write_json(root / "config.json", hf_config, indent=2)
  # transformers refuses safetensors files without the framework tag.
  paths.write_with(root / "model.safetensors",
                   lambda f: f.write(save(state_dict, metadata={"format": "pt"})))
  paths.write_json(root / "preprocessor_config.json", {
      "image_processor_type": "ImageGPTImageProcessor", "clusters": palette.tolist(),
      "do_color_quantize": True, "do_normalize": True, "do_resize": True,
      "size": {"height": cfg.n_px, "width": cfg.n_px}})


# The model variables of OpenAI's release; anything else in its checkpoints (Adam slots, step
# counters) is optimizer state.
_OPENAI_WEIGHT = re.compile(r"model/(wte|wpe|wtet|sos|ln_f/g|clf/wclf|h\d+/(ln_[12]/g|"
                            r"attn/[qkv]_proj|attn/c_proj|mlp/c_fc/w|mlp/c_proj/w))")


def read_tf_checkpoint(prefix: str) -> dict:
  """The model variables (numpy, by name) of a TF checkpoint such as `model.ckpt-1000000`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only this reader needs it)
  tf.config.set_visible_devices([], "GPU")
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as e:
    raise ValueError(f"cannot read a TF checkpoint at {prefix!r} (give the prefix, e.g. "
                     f"model.ckpt-1000000, not one of its .index/.data files): {e}") from e
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if _OPENAI_WEIGHT.fullmatch(name)}


def config_from_openai(variables: Mapping, **overrides) -> IGPTConfig:
  """IGPTConfig of OpenAI's variables: every size is read off the tensor shapes."""
  for name in ("model/wte", "model/wpe", "model/h0/attn/q_proj"):
    if name not in variables:
      raise ValueError(f"no {name} among the variables: not an OpenAI iGPT checkpoint")
  vocab_size, d = np.shape(variables["model/wte"])
  n_ctx = np.shape(variables["model/wpe"])[0]
  n_px = math.isqrt(n_ctx)
  if n_px * n_px != n_ctx:
    raise ValueError(f"model/wpe has {n_ctx} positions, not a square image (n_px**2)")
  n_layer = len([k for k in variables if re.fullmatch(r"model/h\d+/ln_1/g", k)])
  fixed = sorted(set(overrides) & (set(_ARCH_FIELDS) | {"objective", "n_classes"}))
  if fixed:
    raise ValueError(f"{fixed} are fixed by the checkpoint and cannot be overridden")
  return IGPTConfig(
      n_px=n_px, n_layer=n_layer, n_embd=d, n_head=np.shape(variables["model/h0/attn/q_proj"])[0],
      vocab_size=vocab_size, objective="ar" if "model/sos" in variables else "bert",
      n_classes=np.shape(variables["model/clf/wclf"])[0] if "model/clf/wclf" in variables else 0,
      ).replace(**overrides)


def from_openai(variables: Mapping, **cfg_overrides):
  """OpenAI's released variables (numpy, by TF name) -> (IGPTConfig, params of numpy arrays).

  BERT checkpoints have no start vector (the objective needs none): `sos` is zero.
  cfg_overrides: non-architecture IGPTConfig fields (scan_layers, dtype, param_dtype).
  """
  cfg = config_from_openai(variables, **cfg_overrides)
  d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
  dtype = jnp.dtype(cfg.param_dtype)

  def fetch(name, shape):
    if name not in variables:
      raise ValueError(f"checkpoint lacks {name} (a {cfg.n_layer}-layer model)")
    x = np.asarray(variables[name])
    if x.shape != shape:
      raise ValueError(f"{name} has shape {x.shape}, expected {shape} for {cfg}")
    return x.astype(dtype)

  params = {"wte": fetch("model/wte", (cfg.vocab_size, d)),
            "wpe": fetch("model/wpe", (cfg.n_ctx, d)),
            "wtet": fetch("model/wtet", (cfg.vocab_size, d)),
            "sos": (fetch("model/sos", (d,)) if cfg.objective == "ar" else np.zeros(d, dtype)),
            "ln_f": {"g": fetch("model/ln_f/g", (d,))}}
  if cfg.n_classes:
    params["clf"] = fetch("model/clf/wclf", (cfg.n_classes, d)).T
  for i in range(cfg.n_layer):
    layer = f"model/h{i}/"
    # [H, hd, D] each -> our fused [D, 3, H, hd].
    qkv = [fetch(layer + f"attn/{n}_proj", (h, hd, d)) for n in "qkv"]
    params[f"h_{i}"] = {
        "ln_1": {"g": fetch(layer + "ln_1/g", (d,))},
        "attn": {"c_attn": np.stack(qkv).transpose(3, 0, 1, 2),
                 "c_proj": fetch(layer + "attn/c_proj", (h, hd, d))},
        "ln_2": {"g": fetch(layer + "ln_2/g", (d,))},
        "c_fc": fetch(layer + "mlp/c_fc/w", (d, 4 * d)),
        "c_proj": fetch(layer + "mlp/c_proj/w", (4 * d, d))}
  if cfg.scan_layers:
    params = stack_blocks(params, cfg.n_layer)
  return cfg, params
