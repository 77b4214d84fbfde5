"""Image GPT (Chen et al., 2020) in flax.linen.

The model reads images as sequences of palette tokens ([B, T] int32, T = n_px**2, values in
[0, vocab_size)) and returns next-token (AR) or masked-token (BERT) logits [B, T, vocab_size].

Architecture, exactly as the official release: pre-norm GPT-2 blocks whose norm has neither mean
subtraction nor bias, quick-GELU MLP, no biases anywhere, learned positions, a learned start-of-
sequence vector, and an untied output table initialised to zero.

Every parameter is declared with logical axis names and the activations are constrained with
`batch`/`length`/`embed`, so `igpt_jax.sharding` can lay the model over any mesh; without a mesh
the annotations are no-ops.

Configs: `IGPTConfig`, `preset(name, **overrides)`, `model_config(config.model)`.

Entry points (all through `IGPT(cfg).apply({"params": p}, ..., method=...)`):
  __call__(tokens[B, T], bert_mask=None) -> logits[B, T, V]
  features(tokens, layers, reading)      -> {layer: [B, D] or [B, 4 D]} pooled taps (linear probes)
  classify(tokens, bert_mask=None)       -> (logits[B, T, V], class_logits[B, C])
  decode(ids[B, S], index)               -> logits[B, S, V], with mutable=["cache"]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Mapping

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import attention as attention_lib

OBJECTIVES = ("ar", "bert")
ATTENTIONS = attention_lib.IMPLEMENTATIONS
REMATS = ("none", "full", "dots")
# Where a probe reads each block: after its ln_1 (the paper's) or before it, averaged over all
# positions, or ("_2x2") over each quadrant of the image, the four [D] means concatenated.
READINGS = ("ln1", "residual", "ln1_2x2", "residual_2x2")
BERT_MASK_PROB = 0.15


@dataclasses.dataclass(frozen=True)
class IGPTConfig:
  """Hyper-parameters of one iGPT model. Field names follow GPT-2 (`n_layer`, `n_embd`, ...).

  dtype: compute dtype of matmuls and attention ("float32", "bfloat16" or "float16"); norm
    statistics, softmax and the residual stream stay float32 so bf16 keeps the fp32 loss.
    float16 is for GPUs without bf16 tensor cores (V100, T4); training in it takes a dynamic
    loss scale, which `steps.make_optimizer(dtype="float16")` adds.
  param_dtype: storage dtype of the parameters (the optimizer's master copy).
  remat: "none", "full" (recompute each block in the backward pass) or "dots" (keep only the
    matmul outputs without batch dims).
  scan_layers: stack the blocks' parameters on a leading `layers` axis and run them with
    `nn.scan` (one compiled block: compile time independent of depth).
  attention: "blocked" (causal query blocks that skip the upper triangle, `igpt_jax.attention`;
    fastest on CPU), "xla" (`jax.nn.dot_product_attention`), "cudnn" (flash attention on NVIDIA
    GPUs from Ampere on, needs bf16/fp16), "splash" (Pallas splash attention, TPU only) or
    "auto" (splash on TPU, cudnn on a GPU that runs it, xla on other GPUs and in fp32, else
    blocked; see attention.resolve).
  n_classes: > 0 adds the fine-tuning classifier head (mean of the ln_f output, zero init).
  """

  n_px: int = 32
  n_layer: int = 24
  n_embd: int = 512
  n_head: int = 8
  vocab_size: int = 512
  objective: str = "ar"
  n_classes: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "auto"
  norm_eps: float = 1e-5

  def __post_init__(self):
    for name in ("n_px", "n_layer", "n_embd", "n_head", "vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"IGPTConfig.{name} must be a positive int, got {value!r}")
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
    choices = {"objective": OBJECTIVES, "attention": ATTENTIONS, "remat": REMATS,
               "dtype": ("float32", "bfloat16", "float16"),
               "param_dtype": ("float32", "bfloat16")}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"IGPTConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
    if self.n_classes < 0:
      raise ValueError(f"IGPTConfig.n_classes must be >= 0, got {self.n_classes}")

  @property
  def n_ctx(self) -> int:
    return self.n_px * self.n_px

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def sos_id(self) -> int:
    """Input id that stands for the start vector in `decode` (one past the palette)."""
    return self.vocab_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "IGPTConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown IGPTConfig fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)

  def replace(self, **overrides) -> "IGPTConfig":
    return _replace_checked(self, overrides)


def _replace_checked(cfg: IGPTConfig, overrides: Mapping) -> IGPTConfig:
  known = {f.name for f in dataclasses.fields(IGPTConfig)}
  unknown = set(overrides) - known
  if unknown:
    raise ValueError(f"unknown IGPTConfig fields {sorted(unknown)}; known: {sorted(known)}")
  return dataclasses.replace(cfg, **overrides)


# The paper's Table 1. iGPT-XL's head count is not published; 24 heads of 128 is our choice.
PRESETS = {
    "igpt_s": dict(n_layer=24, n_embd=512, n_head=8),
    "igpt_m": dict(n_layer=36, n_embd=1024, n_head=8),
    "igpt_l": dict(n_layer=48, n_embd=1536, n_head=16),
    "igpt_xl": dict(n_layer=60, n_embd=3072, n_head=24),
}


def preset(name: str, **overrides) -> IGPTConfig:
  """Config of a published model size (`igpt_s|m|l|xl`), n_px 32 unless overridden."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return _replace_checked(IGPTConfig(**PRESETS[name]), overrides)


def set_fields(fields: Mapping) -> dict:
  """The fields a run config's `model` entry sets; None means unset (experiments/base.py lists
  every field as None so that each can be set from the command line)."""
  return {k: v for k, v in dict(fields).items() if v is not None}


def model_config(fields: Mapping) -> IGPTConfig:
  """A run config's `model` entry -> IGPTConfig: `preset` (igpt_s|m|l|xl) plus the fields set,
  or the fields set over IGPTConfig's defaults."""
  fields = set_fields(fields)
  name = fields.pop("preset", None)
  return preset(name, **fields) if name else IGPTConfig.from_dict(fields)


def param_count(cfg: IGPTConfig) -> int:
  """Closed-form count: L*(12 D^2 + 2D) + T*D + 2*V*D + 2D (+ sos, + classifier)."""
  d, v = cfg.n_embd, cfg.vocab_size
  blocks = cfg.n_layer * (12 * d * d + 2 * d)
  return blocks + cfg.n_ctx * d + 2 * v * d + d + d + cfg.n_classes * d


def matmul_params(cfg: IGPTConfig) -> int:
  """Parameters that are matmul weights: everything but the lookups (wte, wpe, sos).

  The untied head wtet [V, D] is a real matmul and counts, as in PaLM's MFU.
  """
  return param_count(cfg) - cfg.vocab_size * cfg.n_embd - cfg.n_ctx * cfg.n_embd - cfg.n_embd


def flops_per_token(cfg: IGPTConfig, *, backward: bool = True) -> float:
  """Model FLOPs per token (PaLM appendix B): 6 N + 12 L T D for fwd + bwd, 2 N + 4 L T D fwd.

  N = `matmul_params`; the attention term counts the full [T, T] score and value matmuls (no
  causal discount), so blocked attention that skips the upper triangle shows up as higher MFU.
  This is the one FLOP count of the project (plan estimates, the loop's MFU and TFLOP/s, the
  benches), PaLM's convention, kept so that MFUs compare with the plan table and with figures
  published that way. MaxText since 2025 counts causal attention at half (6 N + 6 L T D); at
  iGPT-S 32x32 (T 1024, D 512) that count is 12.5% lower, and so would its MFU be.
  """
  n, attn = matmul_params(cfg), cfg.n_layer * cfg.n_ctx * cfg.n_embd
  return 6 * n + 12 * attn if backward else 2 * n + 4 * attn


def check_tokens(tokens, cfg: IGPTConfig, *, full_length: bool = True) -> None:
  """ValueError unless tokens are an int [B, T] batch of palette ids.

  Shape and dtype are checked always; the values only in a numpy array, already on the host.
  A jax.Array is not read: that would wait for the device on every call, fail under jit
  (a closed-over array is traced there) and on a global array this host cannot address.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  if full_length and tokens.shape[1] != cfg.n_ctx:
    raise ValueError(f"tokens have length {tokens.shape[1]}, but n_px={cfg.n_px} needs "
                     f"{cfg.n_ctx} (= n_px**2)")
  if isinstance(tokens, np.ndarray) and tokens.size:
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
      raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")


def draw_bert_mask(rng: jax.Array, shape: tuple[int, int], prob: float = BERT_MASK_PROB):
  """Bool [B, T]: True where a token is masked (its embedding zeroed, its loss counted)."""
  return jax.random.bernoulli(rng, prob, shape)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


@jax.custom_vjp
def mlp(x, w_fc, w_proj):
  """quick_gelu(x @ w_fc) @ w_proj: x [B, S, D], w_fc [D, F], w_proj [F, D] -> [B, S, D].

  Autodiff's backward is mathematically this one, but XLA CPU lays its weight gradients out as
  dW^T = g^T x and so transposes the wide [B*S, F] activation twice per step, which cost a third
  of the MLP's time at D = 256. Here each weight gradient contracts the tokens of the narrow
  [B, S, D] operand's transpose instead, and the backward keeps only the pre-activation.
  """
  return _mlp_fwd(x, w_fc, w_proj)[0]


def _mlp_fwd(x, w_fc, w_proj):
  u = nn.with_logical_constraint(x @ w_fc, ("batch", "length", "mlp"))  # [B, S, F]
  return quick_gelu(u) @ w_proj, (x, u, w_fc, w_proj)


def _mlp_bwd(res, dy):  # dy [B, S, D]
  x, u, w_fc, w_proj = res
  u32 = u.astype(jnp.float32)
  s = jax.nn.sigmoid(1.702 * u32)
  h = (u32 * s).astype(u.dtype)
  dh = (dy @ w_proj.T).astype(jnp.float32)
  du = (dh * s * (1 + 1.702 * u32 * (1 - s))).astype(u.dtype)  # quick_gelu' = s + 1.702 u s(1-s)
  dw_proj = jnp.einsum("bsd,bsf->df", dy, h).T
  dw_fc = jnp.einsum("bsd,bsf->df", x, du)
  return (du @ w_fc.T).astype(x.dtype), dw_fc.astype(w_fc.dtype), dw_proj.astype(w_proj.dtype)


mlp.defvjp(_mlp_fwd, _mlp_bwd)


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """The release's norm: x * rsqrt(mean(x^2) + eps) * g. No mean subtraction, no bias."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):  # [..., D]
    g = self.param("g", _partitioned(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                   self.param_dtype)
    # Statistics in float32 whatever the compute dtype: a bf16 sum of D squares loses the small
    # terms (and overflows fp16), and the normalised output then feeds every matmul.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * g.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  cfg: IGPTConfig

  @nn.compact
  def __call__(self, x, *, decode_index=None):  # x: [B, S, D] -> [B, S, D]
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
    # One fused [D, 3, H, hd] projection: a single wide matmul instead of three.
    w_qkv = self.param("c_attn", _partitioned(nn.initializers.normal(1 / math.sqrt(d)),
                                              ("embed", None, "heads", "kv")),
                       (d, 3, h, hd), pdtype)
    w_out = self.param("c_proj",
                       _partitioned(nn.initializers.normal(1 / math.sqrt(d * cfg.n_layer)),
                                    ("heads", "kv", "embed")),
                       (h, hd, d), pdtype)
    # q/k/v stay on an inner axis of the product: with them leading, XLA CPU computes W^T x^T and
    # transposes the whole weight on every call (most of a decode step's time).
    qkv = jnp.einsum("bsd,dchk->bschk", x, w_qkv.astype(dtype))
    q, k, v = (nn.with_logical_constraint(qkv[:, :, i], ("batch", "length", "heads", "kv"))
               for i in range(3))

    if decode_index is None:
      y = attention_lib.attention(q, k, v, causal=cfg.objective == "ar",
                                  implementation=cfg.attention)
    else:
      y = self._cached_attention(q, k, v, decode_index)
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    return jnp.einsum("bshk,hkd->bsd", y, w_out.astype(dtype))

  def _cached_attention(self, q, k, v, index):
    """Writes this chunk's keys/values at [index, index+S) and attends causally over the cache.

    q/k/v [B, S, H, K]. The cache is head-major, [B, H, L, K]: with one query per step the
    scores are a batched matrix-vector product over the cache, and in this layout XLA reads the
    cache in place instead of transposing all of it on every step. Its length L is the caller's
    (n_ctx by default, see `init_cache`), at least index + S: a decode step is bound by reading
    the cache, so a caller that knows how far it has got can hand in a shorter one.
    """
    cfg = self.cfg
    b, s = q.shape[:2]
    ck = self.variable("cache", "key", jnp.zeros, (b, cfg.n_head, cfg.n_ctx, cfg.head_dim),
                       q.dtype)
    cv = self.variable("cache", "value", jnp.zeros, ck.value.shape, q.dtype)
    length = ck.value.shape[2]
    if ck.value.shape != (b, cfg.n_head, length, cfg.head_dim) or length > cfg.n_ctx:
      raise ValueError(f"cache of shape {ck.value.shape} does not fit batch {b}, "
                       f"{cfg.n_head} heads of {cfg.head_dim} and at most {cfg.n_ctx} positions")
    head_major = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, S, H, K] -> [B, H, S, K]
    ck.value = jax.lax.dynamic_update_slice(ck.value, head_major(k), (0, 0, index, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, head_major(v), (0, 0, index, 0))
    # Scores and softmax in float32: exp() of bf16 scores would round the probabilities of a
    # 1024-long row to 8 bits before they are summed.
    scores = jnp.einsum("bshk,bhtk->bhst", q * jnp.asarray(1 / math.sqrt(cfg.head_dim), q.dtype),
                        ck.value, preferred_element_type=jnp.float32)  # [B, H, S, L]
    query_pos = index + jnp.arange(s)
    visible = jnp.arange(length)[None, :] <= query_pos[:, None]  # [S, L]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(cv.value.dtype)
    return jnp.einsum("bhst,bhtk->bshk", probs, cv.value)


def pooled_taps(cfg: IGPTConfig, acts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """{name: [B, S, D]} -> {reading: [B, D] (position mean) or [B, 4 D] (quadrant means)}.

  Quadrants need the whole image (S = n_ctx) and an even n_px; a decode step gets means only.
  """
  taps = {name: jnp.mean(a, axis=1) for name, a in acts.items()}
  if next(iter(acts.values())).shape[1] == cfg.n_ctx and cfg.n_px % 2 == 0:
    for name, a in acts.items():
      taps[name + "_2x2"] = einops.reduce(a, "b (gh h gw w) d -> b (gh gw d)", "mean", gh=2,
                                          gw=2, h=cfg.n_px // 2)
  return taps


class Block(nn.Module):
  """Pre-norm block; also returns its pooled taps (ln_1 output, residual input; `pooled_taps`)."""
  cfg: IGPTConfig

  @nn.compact
  def __call__(self, x, decode_index=None):  # x: [B, S, D] float32 residual stream
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d = cfg.n_embd
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="ln_1")(x)
    taps = pooled_taps(cfg, {"ln1": h.astype(jnp.float32), "residual": x})
    # The residual stream stays float32: each block adds a small update to it, which a bf16
    # sum would round away after a few dozen blocks.
    x = x + Attention(cfg, name="attn")(h, decode_index=decode_index).astype(x.dtype)

    h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="ln_2")(x)
    w_fc = self.param("c_fc", _partitioned(nn.initializers.normal(0.02), ("embed", "mlp")),
                      (d, 4 * d), pdtype)
    w_proj = self.param("c_proj", _partitioned(nn.initializers.normal(0.02), ("mlp", "embed")),
                        (4 * d, d), pdtype)
    x = x + mlp(h, w_fc.astype(dtype), w_proj.astype(dtype)).astype(x.dtype)
    return x, taps


class IGPT(nn.Module):
  cfg: IGPTConfig

  def setup(self):
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)
    d = cfg.n_embd
    self.wte = self.param("wte", _partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                          (cfg.vocab_size, d), pdtype)
    self.wpe = self.param("wpe", _partitioned(nn.initializers.normal(0.01), (None, "embed")),
                          (cfg.n_ctx, d), pdtype)
    self.sos = self.param("sos", _partitioned(nn.initializers.normal(0.02), ("embed",)), (d,),
                          pdtype)
    # Untied output table, zero at init: the first loss is exactly log(vocab_size).
    self.wtet = self.param("wtet", _partitioned(nn.initializers.zeros, ("vocab", "embed")),
                           (cfg.vocab_size, d), pdtype)
    if cfg.n_classes:
      self.clf = self.param("clf", _partitioned(nn.initializers.zeros, ("embed", "classes")),
                            (d, cfg.n_classes), pdtype)
    self.ln_f = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), pdtype)

    block = Block
    if cfg.remat != "none":
      policy = (None if cfg.remat == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      # Under nn.scan the loop already keeps XLA from merging the recomputation into the
      # forward pass; prevent_cse's barriers would only block optimisations there.
      block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True}, in_axes=nn.broadcast,
                            length=cfg.n_layer,
                            metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="h")
    else:
      self.blocks = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]

  # -- embeddings ---------------------------------------------------------------------------

  def _embed_ids(self, ids):
    """[B, S] ids in [0, V] (V = sos_id) -> [B, S, D] float32."""
    tok = jnp.take(self.wte, jnp.minimum(ids, self.cfg.vocab_size - 1), axis=0)
    return jnp.where((ids == self.cfg.sos_id)[..., None], self.sos, tok).astype(jnp.float32)

  def _embed(self, tokens, bert_mask):
    """Model input for a whole image [B, T] -> [B, T, D] float32."""
    cfg = self.cfg
    check_tokens(tokens, cfg)
    if cfg.objective == "ar":
      if bert_mask is not None:
        raise ValueError("bert_mask is only for objective='bert'")
      # Position i sees sos, x_0 .. x_{i-1} and predicts x_i.
      sos = jnp.full((tokens.shape[0], 1), cfg.sos_id, tokens.dtype)
      x = self._embed_ids(jnp.concatenate([sos, tokens[:, :-1]], axis=1))
    else:
      if bert_mask is None:
        raise ValueError("objective='bert' needs bert_mask [B, T] (see draw_bert_mask)")
      chex.assert_shape(bert_mask, tokens.shape)
      # Masking multiplies the embedding by zero: the model keeps no mask token row.
      x = self._embed_ids(tokens) * (1.0 - bert_mask[..., None].astype(jnp.float32))
    return x + self.wpe.astype(jnp.float32)[None]

  # -- trunk --------------------------------------------------------------------------------

  def _trunk(self, x, decode_index=None, depth=None):
    """Runs the first `depth` blocks (default all; scan_layers runs all).

    Returns h [B, S, D] (float32 residual after the last block run) and taps {reading: [L, B, D]}.
    """
    if self.cfg.scan_layers:
      return self.blocks(x, decode_index)
    per_layer = []
    for block in self.blocks[:depth]:
      x, taps = block(x, decode_index)
      per_layer.append(taps)
    return x, jax.tree.map(lambda *t: jnp.stack(t), *per_layer)

  def _head(self, h):
    """h [B, S, D] -> (ln_f output [B, S, D], logits [B, S, V] float32)."""
    hn = self.ln_f(h)
    # The loss needs float32 logits: a bf16 logit keeps 8 bits of mantissa, so logits near 10
    # would be rounded by ~0.03 before the log-softmax, which is as large as the differences in
    # loss between model sizes. The matmul accumulates and returns float32 (on the MXU and
    # tensor cores at bf16 speed), rather than rounding its bf16 result and casting it back up.
    logits = jnp.einsum("bsd,vd->bsv", hn, self.wtet.astype(hn.dtype),
                        preferred_element_type=jnp.float32)
    return hn, nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, tokens, bert_mask=None):
    """tokens [B, T] int -> logits [B, T, V] float32."""
    h, _ = self._trunk(self._embed(tokens, bert_mask))
    return self._head(h)[1]

  def classify(self, tokens, bert_mask=None):
    """-> (logits [B, T, V], class_logits [B, C]); the classifier reads mean(ln_f(h))."""
    if not self.cfg.n_classes:
      raise ValueError("classify needs IGPTConfig.n_classes > 0")
    h, _ = self._trunk(self._embed(tokens, bert_mask))
    hn, logits = self._head(h)
    pooled = jnp.mean(hn.astype(jnp.float32), axis=1)  # [B, D]
    return logits, pooled @ self.clf.astype(jnp.float32)

  def features(self, tokens, layers: Iterable[int] | None = None, reading: str = "ln1",
               bert_mask=None):
    """Pooled features for linear probes: {layer: [B, D] float32, or [B, 4 D] for "_2x2"}.

    Layer l in [0, n_layer) is block l's input, read after its ln_1 (`reading="ln1"`, the
    paper's probe, gain included) or before it (`reading="residual"`), averaged over all
    positions or, with the "_2x2" readings, over each image quadrant; layer n_layer is the ln_f
    output. With scan_layers all blocks run; otherwise only up to the deepest one asked.
    """
    cfg = self.cfg
    layers = range(cfg.n_layer + 1) if layers is None else tuple(layers)
    check_layers(cfg, layers)
    if reading not in READINGS:
      raise ValueError(f"reading={reading!r}; expected one of {READINGS}")
    if reading.endswith("_2x2") and cfg.n_px % 2:
      raise ValueError(f"reading={reading!r} needs an even n_px, got {cfg.n_px}")
    h, taps = self._trunk(self._embed(tokens, bert_mask), depth=max(layers) + 1)
    if cfg.n_layer in layers:  # ln_f alone (not the head: the output table is not a feature)
      top = self.ln_f(h).astype(jnp.float32)
      top = pooled_taps(cfg, {"ln1": top, "residual": top})[reading]
    return {layer: top if layer == cfg.n_layer else taps[reading][layer] for layer in layers}

  def decode(self, ids, index):
    """Incremental AR forward over positions [index, index + S) with a KV cache.

    ids [B, S]: the *input* ids at those positions, i.e. the previous image token, or
    `cfg.sos_id` at position 0. Call with `mutable=["cache"]`; the cache is created on first
    use (see `init_cache`). Returns logits [B, S, V] for the tokens at those positions.

    The positions must lie in the cache, [0, L): S > L is a ValueError, and so is an index
    given as a Python or numpy int that puts them outside. A traced index (a decode loop under
    jit) cannot be checked without a host round trip: there a call outside the cache returns
    NaN logits instead of plausible ones (its write, clamped into the cache by
    dynamic_update_slice, has overwritten other positions: the cache is spent).
    """
    cfg = self.cfg
    if cfg.objective != "ar":
      raise ValueError("decode needs objective='ar'")
    s, length = ids.shape[1], self._cache_length()
    if s > length:
      raise ValueError(f"decode of {s} positions does not fit a cache of {length}")
    concrete = isinstance(index, (int, np.integer))
    if concrete and not 0 <= index <= length - s:
      raise ValueError(f"decode of positions [{index}, {index + s}) outside the cache, whose "
                       f"positions are [0, {length})")
    x = self._embed_ids(ids)
    x = x + jax.lax.dynamic_slice_in_dim(self.wpe.astype(jnp.float32), index, s)[None]
    h, _ = self._trunk(x, decode_index=index)
    logits = self._head(h)[1]
    if concrete:
      return logits
    return jnp.where((index >= 0) & (index <= length - s), logits, jnp.nan)

  def _cache_length(self) -> int:
    """Positions of the KV cache in use: the given one's, else the one decode creates."""
    cache = self.variables.get("cache")
    return jax.tree.leaves(cache)[0].shape[-2] if cache else self.cfg.n_ctx


def check_layers(cfg: IGPTConfig, layers) -> None:
  bad = [l for l in layers if not isinstance(l, int) or not 0 <= l <= cfg.n_layer]
  if bad or not layers:
    raise ValueError(f"layers {bad or list(layers)} out of range: valid layers are 0..{cfg.n_layer}"
                     f" ({cfg.n_layer} = final norm output)")


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: IGPTConfig, rng: jax.Array):
  """Unboxed parameters (plain arrays) of a fresh model (jitted: eager init is slow)."""
  return nn.unbox(_init_variables(cfg, rng)["params"])


def abstract_params(cfg: IGPTConfig):
  """ShapeDtypeStructs of the parameters, with their logical partitioning boxes; no memory."""
  return jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))["params"]


def _init_variables(cfg: IGPTConfig, rng: jax.Array):
  """Variables of a fresh model, traced on one image.

  The parameters do not depend on the attention kernel, and a kernel run per device under the
  mesh (splash) cannot split a batch of one, so init always traces the XLA attention.
  """
  tokens = jnp.zeros((1, cfg.n_ctx), jnp.int32)
  mask = jnp.zeros((1, cfg.n_ctx), bool) if cfg.objective == "bert" else None
  return IGPT(cfg.replace(attention="xla")).init(rng, tokens, mask)


def init_cache(cfg: IGPTConfig, batch_size: int, length: int | None = None):
  """Zero KV cache for `decode`: batch_size rows, `length` positions (default n_ctx).

  Every leaf is [..., B, H, length, K] (a leading layer axis with scan_layers); `grow_cache`
  lengthens it. A cache of length L serves decode calls on positions below L.
  """
  length = cfg.n_ctx if length is None else length
  if not 0 < length <= cfg.n_ctx:
    raise ValueError(f"cache length must lie in [1, {cfg.n_ctx}], got {length}")
  model = IGPT(cfg)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32), 0, method=IGPT.decode))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape[:-2] + (length,) + s.shape[-1:], s.dtype),
                      shapes)


def grow_cache(cache, length: int):
  """Pads every leaf of a decode cache with zeros to `length` positions."""
  pad = lambda c: jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, length - c.shape[-2]), (0, 0)])
  return jax.tree.map(pad, cache)
