r"""Draws images from a trained or converted iGPT, or completes the bottom of real images.

  python -m launch.sample --workdir=W --num=16 --out=/tmp/samples
  python -m launch.sample --workdir=W --complete --data=cifar10 --split=test --num=8 \
      --samples_per_image=4 --prefix_rows=16 --out=/tmp/completions
  python -m launch.sample --workdir=W --complete --out=/tmp/mine --images a.jpg b.png

`--images` completes your own files instead of a dataset's: any size or mode (grayscale,
palette, transparency over white), cut to the centre square and area-resized to the model's
n_px as evaluation reads images, then quantized to the run's palette.

`--workdir` is a training run or the output of launch/convert.py (read with
`igpt_jax.checkpoint.load`), local or gs://; `--out` may be either too. `--attention` and
`--dtype` override how the saved model runs here (default: as saved, with a kernel this host
cannot run, such as a TPU run's splash, replaced by "auto"). Writes `samples.png` +
`samples.npy` (tokens [num, T]), or
`completions.png` (rows: input | completions | original) + `completions.npy` (tokens
[num, samples_per_image, T]) and `originals.npy` (tokens [num, T]). With several accelerators
the batch is split over as many of them as divide it evenly; on a CPU host every core is one
device (`sharding.use_one_cpu_device_per_core`), since one XLA CPU device decodes on about one
core, and the model is split over them by heads (`sample.host_mesh`). `--mesh=1,-1,1` restores
the parameters split over this host's devices instead (iGPT-XL's 27 GB of float32 weights on
16 GB chips).
"""

# pylint: disable=wrong-import-position
from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from igpt_jax import checkpoint
from igpt_jax import data
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import sample as sample_lib
from igpt_jax import sharding

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run or converted weights.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples).")
_NUM = flags.DEFINE_integer("num", 8, "Images to draw, or real images to complete.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens only.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the smallest set of mass >= top_p.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed draws the same images.")
_COMPLETE = flags.DEFINE_bool("complete", False, "Complete real images from --data or --images.")
_IMAGES = flags.DEFINE_list("images", None, "Image files to complete (--complete), any size: "
                            "--images a.jpg b.png, or comma-separated.")
_DATA = flags.DEFINE_string("data", None, "tfds name or local .npz / directory (--complete).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir.")
_SPLIT = flags.DEFINE_string("split", "train[45000:]", "Split of --data (tfds slicing syntax).")
_SAMPLES_PER_IMAGE = flags.DEFINE_integer("samples_per_image", 4, "Completions per image.")
_PREFIX_ROWS = flags.DEFINE_integer("prefix_rows", None,
                                    "Pixel rows given as the prompt (default: the top half).")
_PREFIX_FRACTION = flags.DEFINE_float("prefix_fraction", None,
                                      "Or the fraction of rows given (instead of prefix_rows).")
_SCALE = flags.DEFINE_integer("scale", None, "Upscaling of the PNG grid (nearest neighbour; "
                              "default: each image about 128 pixels wide).")
_ATTENTION = flags.DEFINE_enum("attention", None, ["auto", "blocked", "xla", "cudnn", "splash"],
                               "Attention kernel (default: the checkpoint's, for this host).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype (default: the checkpoint's).")
_MESH = flags.DEFINE_list(
    "mesh", None, "data,fsdp,tensor sizes of a mesh over this host's devices (-1: the rest), "
    "e.g. 1,-1,1: the parameters are restored split over it, for models larger than one "
    "device, and the images split over data x fsdp. Default: sample.host_mesh (on a CPU host "
    "the model split by heads over its cores; accelerators split the batch).")


def main(argv):
  # `--images a.jpg b.png` (or a shell glob): the files after the first come as arguments.
  files = _IMAGES.value + argv[1:] if _IMAGES.value else []
  if len(argv) > 1 and not _IMAGES.value:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  sharding.use_one_cpu_device_per_core()
  sharding.require_one_process("launch/sample.py")  # every process would write the same files
  mesh = None
  if _MESH.value:
    try:
      shape = [int(n) for n in _MESH.value]
    except ValueError:
      raise app.UsageError(f"--mesh takes three sizes like 1,-1,1, not {_MESH.value}") from None
    mesh = sharding.make_mesh(shape, jax.local_devices())
  with console.status(f"loading {_WORKDIR.value}"):
    cfg, params, palette = checkpoint.load(_WORKDIR.value, _STEP.value, mesh=mesh,
                                           attention=_ATTENTION.value, dtype=_DTYPE.value)
  out = paths.path(_OUT.value or paths.path(_WORKDIR.value) / "samples")
  rng = jax.random.key(_SEED.value)
  kw = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  scale = _SCALE.value or sample_lib.display_scale(cfg.n_px)

  if not _COMPLETE.value:
    with console.status(f"sampling {_NUM.value} images of {cfg.n_ctx} tokens"):
      tokens = np.asarray(sample_lib.sample(
          cfg, params, rng, batch_size=_NUM.value,
          mesh=mesh or sample_lib.host_mesh(cfg, _NUM.value), **kw))
    paths.save_npy(out / "samples.npy", tokens)
    path = out / "samples.png"
    sample_lib.save_grid(path, [palette_lib.dequantize(tokens, palette, cfg.n_px)],
                         scale=scale)
    logging.info("wrote %d samples to %s", len(tokens), path)
    return

  if bool(_DATA.value) == bool(files):
    raise app.UsageError("--complete needs --data (a tfds name or a local .npz / directory) or "
                         "--images (files), one of them")
  if _PREFIX_FRACTION.value is None:
    rows = cfg.n_px // 2 if _PREFIX_ROWS.value is None else _PREFIX_ROWS.value
    prefix_len = sample_lib.prefix_length(cfg, rows=rows)
  else:
    prefix_len = sample_lib.prefix_length(cfg, fraction=_PREFIX_FRACTION.value)
  if files:
    with console.status(f"reading {len(files)} image files"):
      images = sample_lib.read_image_files(files, cfg.n_px)
  else:
    with console.status(f"reading {_NUM.value} images of {_DATA.value} {_SPLIT.value}"):
      images, _ = data.load_images({"name": _DATA.value, "data_dir": _DATA_DIR.value},
                                   _SPLIT.value, _NUM.value, n_px=cfg.n_px)
  originals = np.asarray(palette_lib.quantize(images, palette))  # [N, T]
  with console.status(f"completing {len(originals)} images x {_SAMPLES_PER_IMAGE.value} "
                      f"({cfg.n_ctx - prefix_len} of {cfg.n_ctx} tokens each)"):
    completions = np.asarray(sample_lib.complete(
        cfg, params, rng, originals, prefix_len, samples=_SAMPLES_PER_IMAGE.value,
        mesh=mesh or sample_lib.host_mesh(cfg, len(originals) * _SAMPLES_PER_IMAGE.value),
        **kw))
  paths.save_npy(out / "completions.npy", completions)
  paths.save_npy(out / "originals.npy", originals)
  path = out / "completions.png"
  sample_lib.save_grid(path, sample_lib.completion_rows(originals, completions, prefix_len,
                                                        palette, cfg.n_px), scale=scale)
  logging.info("wrote completions of %d images (%d of %d tokens given) to %s", len(originals),
               prefix_len, cfg.n_ctx, path)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
