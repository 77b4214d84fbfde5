"""Autoregressive sampling with the KV cache, half-image completions (of dataset images or of
your own files, `complete_files`) and PNG grids.

`sample` prefills the prompt (any number of leading tokens, possibly none) in one `decode` call,
then draws one token per step inside a `lax.fori_loop`, all in one jitted function: shapes are
static, so there is one compile per (config, batch, prompt length, top-k, top-p on/off, mesh),
and the temperature and top-p values are traced arguments that never recompile.

The paper samples at temperature 1 without top-k or nucleus filtering; those are the defaults.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image
from PIL import ImageOps

from igpt_jax import data as data_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import sharding as sharding_lib
from igpt_jax.model import IGPT, IGPTConfig, check_tokens, grow_cache, init_cache


def _filter_logits(logits, top_k, top_p):
  """Sets logits outside the top-k / the top-p nucleus to -inf. logits [B, V] float32."""
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    # Keep a token while the mass before it is below top_p: the most likely one always stays.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _choose(rng, logits, temperature, *, greedy, top_k, use_top_p, top_p):
  """Next token ids [B] from the logits [B, V] of the current position."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = _filter_logits(logits / temperature, top_k, top_p if use_top_p else None)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


DECODE_CHUNKS = 8  # at most this many loop bodies, each of at least MIN_DECODE_CHUNK steps
MIN_DECODE_CHUNK = 8


def cache_length(n_ctx: int, position: int) -> int:
  """Length of the KV cache that the decode step for `position` reads.

  Each step is bound by reading the cache, so the cache grows a chunk at a time and each
  chunk's loop reads only the positions written so far, rounded up to the chunk: about half
  the traffic of reading all n_ctx every step, for up to DECODE_CHUNKS compiled loop bodies.
  """
  chunk = max(-(-n_ctx // DECODE_CHUNKS), MIN_DECODE_CHUNK)
  return min(n_ctx, (position // chunk + 1) * chunk)


def _sample(params, rng, prompt, temperature, top_p, *, cfg: IGPTConfig, greedy, top_k, use_top_p,
            sharding):
  """prompt [B, P] (P < T) -> tokens [B, T] whose first P tokens are the prompt's."""
  b, p = prompt.shape
  t = cfg.n_ctx
  model = IGPT(cfg)
  choose = functools.partial(_choose, temperature=temperature, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p, top_p=top_p)

  def constrain(x):  # batch-leading arrays follow the batch sharding (no-op without a mesh)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

  def decode(cache, ids, index):  # ids [B, S] -> (logits of the last position [B, V], cache)
    logits, variables = model.apply({"params": params, "cache": cache}, ids, index,
                                    method=IGPT.decode, mutable=["cache"])
    return logits[:, -1], variables["cache"]

  tokens = constrain(jnp.zeros((b, t), jnp.int32).at[:, :p].set(prompt))
  # Prefill: position i reads token i-1 (the start id at 0), so positions 0..P take
  # [sos, prompt] and the last of them predicts token P.
  sos = jnp.full((b, 1), cfg.sos_id, jnp.int32)
  cache = init_cache(cfg, b, length=cache_length(t, p))
  logits, cache = decode(cache, jnp.concatenate([sos, prompt], axis=1), 0)
  tokens = tokens.at[:, p].set(choose(jax.random.fold_in(rng, p), logits))

  def step(i, carry):  # token i-1 is known; draw token i
    tokens, cache = carry
    prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)  # [B, 1]
    logits, cache = decode(cache, prev, i)
    tokens = jax.lax.dynamic_update_slice_in_dim(
        tokens, choose(jax.random.fold_in(rng, i), logits)[:, None], i, axis=1)
    return constrain(tokens), cache

  start = p + 1
  while start < t:
    end = cache_length(t, start)
    tokens, cache = jax.lax.fori_loop(start, end, step, (tokens, grow_cache(cache, end)))
    start = end
  return tokens


_STATIC = ("cfg", "greedy", "top_k", "use_top_p", "sharding")
# On CPU, XLA hands a decode step's matmuls ([B, D] x [D, N], B rows) to YNNPACK, which ran them
# at about a third of the bandwidth XLA's own dot reached on the attention's cache reads (profile
# of bench.sample: 59 us per call for 0.4 MB of weights). Without it: 985 - 1032 against 855 -
# 877 tokens/s at bench.sample's shape. Per program (an empty list: no YNNPACK fusions in it), so
# the rest of the process keeps them.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_sample_jit = jax.jit(_sample, static_argnames=_STATIC)
_sample_cpu = jax.jit(_sample, static_argnames=_STATIC, compiler_options=_CPU_OPTIONS)


def host_mesh(cfg: IGPTConfig, batch_size: int) -> jax.sharding.Mesh | None:
  """The mesh this host samples `batch_size` images on (None: one device).

  Accelerators split the batch (`sharding.data_mesh`). A CPU host, one XLA device per core
  (`sharding.use_one_cpu_device_per_core`), splits the model: a decode step is bound by reading
  every weight, which each device holding the whole model reads in full, while split by heads
  (the tensor axis) each reads its share; devices left over split the batch. The same tokens
  either way; at bench.sample's shape on 2 cores, 1.31x the tokens/s of splitting the batch on
  an idle machine (1015 against 773; one device: 691), 1.8x while other jobs loaded the cores.
  """
  if jax.default_backend() != "cpu":
    return sharding_lib.data_mesh(batch_size)
  n = jax.device_count()
  tensor = max(k for k in range(1, n + 1)
               if cfg.n_head % k == 0 and cfg.vocab_size % k == 0 and cfg.n_embd % k == 0)
  data = max(k for k in range(1, n // tensor + 1) if batch_size % k == 0)
  if tensor * data == 1:
    return None
  return sharding_lib.make_mesh((data, 1, tensor), jax.devices()[:data * tensor])


def sample(cfg: IGPTConfig, params, rng: jax.Array, *, batch_size: int | None = None,
           prompt=None, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
  """Draws images as tokens [B, T] (int32), continuing `prompt` [B, P] if given.

  temperature: softmax temperature; 0 means greedy (argmax). top_k / top_p: optional
  filtering before the draw (None = off). The same rng gives the same tokens, with or without
  `mesh` (a `sharding.make_mesh` mesh: the batch is then split over data x fsdp, the model's
  logical constraints apply, and parameters not yet on the mesh are replicated onto it).
  """
  if cfg.objective != "ar":
    raise ValueError("sampling needs an autoregressive model (objective='ar')")
  if prompt is None:
    if batch_size is None:
      raise ValueError("sample needs batch_size or a prompt [B, P]")
    prompt = np.zeros((batch_size, 0), np.int32)
  prompt = prompt if isinstance(prompt, jax.Array) else np.asarray(prompt)
  check_tokens(prompt, cfg, full_length=False)  # the values too when on the host
  if batch_size is not None and batch_size != prompt.shape[0]:
    raise ValueError(f"batch_size={batch_size} but the prompt has {prompt.shape[0]} rows")
  if prompt.shape[1] > cfg.n_ctx:
    raise ValueError(f"prompt of {prompt.shape[1]} tokens is longer than n_ctx={cfg.n_ctx}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k must lie in [1, {cfg.vocab_size}], got {top_k}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.shape[1] == cfg.n_ctx:
    return prompt

  on_cpu = (jax.default_backend() if mesh is None else mesh.devices.flat[0].platform) == "cpu"
  run = functools.partial(_sample_cpu if on_cpu else _sample_jit,
                          temperature=jnp.float32(temperature), top_p=jnp.float32(top_p or 1.0),
                          cfg=cfg, greedy=temperature == 0, top_k=top_k,
                          use_top_p=top_p is not None)
  if mesh is None:
    return run(params, rng, prompt, sharding=None)
  if prompt.shape[0] % sharding_lib.batch_shards(mesh):
    raise ValueError(f"batch {prompt.shape[0]} does not split over the "
                     f"{sharding_lib.batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)}")
  batch, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  on_mesh = lambda x: isinstance(x, jax.Array) and x.sharding.device_set == replicated.device_set
  # Parameters already laid over this mesh (e.g. FSDP from training) stay where they are.
  params = jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, replicated), params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
    return run(params, rng, jax.device_put(prompt, batch), sharding=batch)


def lower(cfg: IGPTConfig, params, rng, prompt, *, mesh: jax.sharding.Mesh):
  """The sampler (temperature 1, no filtering) lowered for abstract, sharded inputs on mesh:
  launch/plan.py's "sample" program. Call under `jax.set_mesh(mesh)` and the logical rules."""
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding_lib.replicated(mesh))
  return _sample_jit.lower(params, rng, prompt, scalar, scalar, cfg=cfg, greedy=False,
                          top_k=None, use_top_p=False,
                          sharding=sharding_lib.batch_sharding(mesh))


def prefix_length(cfg: IGPTConfig, *, rows: int | None = None,
                  fraction: float | None = None) -> int:
  """Prompt length in tokens for completions from the top `rows` pixel rows (or a fraction)."""
  if (rows is None) == (fraction is None):
    raise ValueError("give exactly one of rows or fraction")
  if fraction is not None:
    if not 0 <= fraction <= 1:
      raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    rows = round(fraction * cfg.n_px)
  if not 0 <= rows <= cfg.n_px:
    raise ValueError(f"rows must lie in [0, {cfg.n_px}], got {rows}")
  return rows * cfg.n_px


def complete(cfg: IGPTConfig, params, rng: jax.Array, tokens, prefix_len: int, *,
             samples: int = 1, **sample_kw) -> jax.Array:
  """Completions of real images: tokens [N, T] -> [N, samples, T] keeping the first prefix_len."""
  tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
  check_tokens(tokens, cfg)  # the values too when on the host
  tokens = jnp.asarray(tokens)
  if not 0 <= prefix_len <= cfg.n_ctx:
    raise ValueError(f"prefix_len must lie in [0, {cfg.n_ctx}], got {prefix_len}")
  n = tokens.shape[0]
  prompt = jnp.repeat(tokens[:, :prefix_len], samples, axis=0)  # [N * S, P]
  out = sample(cfg, params, rng, prompt=prompt, **sample_kw)
  return out.reshape(n, samples, cfg.n_ctx)


def completion_rows(tokens, completions, prefix_len: int, palette, n_px: int) -> list:
  """One grid row per image: [input (unseen part grey) | S completions | original].

  tokens [N, T], completions [N, S, T] -> list of N uint8 arrays [S + 2, n_px, n_px, 3].
  """
  tokens, completions = np.asarray(tokens), np.asarray(completions)
  chex.assert_rank(completions, 3)
  chex.assert_equal_shape_prefix([tokens, completions], 1)
  originals = palette_lib.dequantize(tokens, palette, n_px)  # [N, H, W, 3]
  filled = palette_lib.dequantize(completions, palette, n_px)  # [N, S, H, W, 3]
  inputs = originals.copy().reshape(len(tokens), n_px * n_px, 3)
  inputs[:, prefix_len:] = 128
  inputs = inputs.reshape(originals.shape)
  return [np.concatenate([i[None], f, o[None]]) for i, f, o in zip(inputs, filled, originals)]


def read_image_files(files, n_px: int) -> np.ndarray:
  """Image files (local or gs://) of any size or mode as uint8 [N, n_px, n_px, 3], read as the
  evaluation pipeline reads images (`data.eval_images`: the centre square, area-resized).

  Grayscale and palette images become RGB, transparent pixels are laid over white, and a
  photo's EXIF orientation is applied.
  """
  arrays = []
  for f in files:
    try:
      with paths.path(f).open("rb") as stream:
        image = Image.open(stream)
        image.load()
    except (OSError, Image.UnidentifiedImageError) as e:
      raise ValueError(f"{f}: not an image file that PIL can read ({e})") from e
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
      image = Image.alpha_composite(Image.new("RGBA", image.size, "white"),
                                    image.convert("RGBA"))
    arrays.append(np.asarray(image.convert("RGB")))
  if not arrays:
    raise ValueError("no image files given")
  return data_lib.eval_images(arrays, n_px)


def complete_files(cfg: IGPTConfig, params, palette, files, rng: jax.Array, *,
                   samples: int = 4, prefix_len: int | None = None, **sample_kw):
  """Completions of your own images: (tokens [N, T], completions [N, samples, T], prefix_len).

  files: image files of any size or mode (`read_image_files`), quantized to the run's palette;
  prefix_len: tokens kept (default: the top half of the rows). sample_kw: `sample`'s (mesh,
  temperature, top_k, top_p). Draw them with `completion_rows` and `save_grid`.
  """
  tokens = np.asarray(palette_lib.quantize(read_image_files(files, cfg.n_px), palette))
  prefix_len = prefix_length(cfg, fraction=0.5) if prefix_len is None else prefix_len
  return tokens, np.asarray(complete(cfg, params, rng, tokens, prefix_len, samples=samples,
                                     **sample_kw)), prefix_len


def display_scale(n_px: int) -> int:
  """The nearest-neighbour upscaling that shows an n_px image about 128 pixels wide."""
  return max(1, round(128 / n_px))


def grid_image(rows, *, pad: int = 2, scale: int = 1) -> np.ndarray:
  """Tiles rows (a list of uint8 [N_r, H, W, 3]) into one uint8 image on a white background."""
  if not rows:
    raise ValueError("grid_image needs at least one row")
  rows = [np.asarray(r) for r in rows]
  h, w = rows[0].shape[1:3]
  for r in rows:
    if r.dtype != np.uint8 or r.ndim != 4 or r.shape[1:] != (h, w, 3):
      raise ValueError(f"every row must be uint8 [N, {h}, {w}, 3], got {r.dtype} {r.shape}")
  cols = max(len(r) for r in rows)
  grid = np.full((pad + len(rows) * (h + pad), pad + cols * (w + pad), 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = img
  return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(path, rows, *, pad: int = 2, scale: int = 1) -> np.ndarray:
  """Writes `grid_image(rows)` as a PNG at path (local or gs://) and returns it."""
  grid = grid_image(rows, pad=pad, scale=scale)
  paths.write_with(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
  return grid


def save_samples(path, cfg: IGPTConfig, params, palette, rng, prompts, mesh,
                 scale: int | None = None) -> np.ndarray | None:
  """The training loop's PNG grid: a row of unconditional samples, then one row per prompt
  (tokens [N, T], process 0's) of half-image completions (`completion_rows`), upscaled by
  `scale` (default `display_scale(n_px)`, as launch/sample.py). Every process calls it; process
  0 writes it and returns the grid (None elsewhere).

  Batches are whole multiples of the mesh's batch shards (at least 8 samples, 2 completions).
  """
  # Each process reads its own held-out rows; the completions are one global batch, so every
  # process must pass the same prompts: process 0's, the ones it draws beside them.
  prompts = multihost_utils.broadcast_one_to_all(np.asarray(prompts))
  n = sharding_lib.batch_shards(mesh)
  uncond = sample(cfg, params, rng, batch_size=-(-8 // n) * n, mesh=mesh)
  prefix = prefix_length(cfg, fraction=0.5)
  done = complete(cfg, params, jax.random.fold_in(rng, 1), prompts, prefix, samples=max(2, n),
                  mesh=mesh)
  uncond, done = multihost_utils.process_allgather((uncond, done), tiled=True)
  if jax.process_index() != 0:
    return None
  rows = [palette_lib.dequantize(np.asarray(uncond), palette, cfg.n_px)]
  rows += completion_rows(prompts, np.asarray(done), prefix, palette, cfg.n_px)
  return save_grid(path, rows, scale=scale or display_scale(cfg.n_px))
