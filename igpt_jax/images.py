"""What one example becomes in the tf.data graph: raw image -> window -> n_px x n_px -> tokens.

The input pipeline (igpt_jax/data.py) builds its graph from these. A source's raw image is a
uint8 array, an encoded image (tfds records) or an image file's path; `preprocess` asks the
source's view for the window it keeps (the centre square, or the ImageNet augmentation's random
crop) from the image's height and width, and a JPEG is then decoded only there: its size comes
from its header, and `decode_and_crop_jpeg` skips the rows below the window and the IDCT outside
it. The window is resized (area averaging) to n_px x n_px, and each pixel becomes its token by
one lookup in `palette.nearest_table`.

  load_tf()                                TensorFlow, imported on first use, off the GPUs
  array_view / encoded_view / file_view    (raw, window) -> uint8 [h, w, 3]
  whole / centre_square / imagenet_crop    (height, width) -> window (y, x, h, w)
  preprocess(raw, augment, n_px, seed, view) -> uint8 [n_px, n_px, 3]
  quantize(image, table)                   -> int32 [n_px * n_px] tokens
"""

from __future__ import annotations

import functools


@functools.cache
def load_tf():
  """TensorFlow, imported when a pipeline is first built (GPU and TPU hosts may lack it) and kept
  off the GPUs, which belong to JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tf


def array_view(image, window):
  """uint8 [H, W, 3] -> its window."""
  y, x, h, w = window(load_tf().shape(image)[0], load_tf().shape(image)[1])
  return image[y:y + h, x:x + w]


def encoded_view(contents, window, decode):
  """An encoded image (a tf string) -> uint8 window. A JPEG is decoded only in the window;
  other formats are decoded whole by `decode` (bytes -> uint8 [H, W, 3]), then cut."""
  tf = load_tf()

  def jpeg():
    shape = tf.io.extract_jpeg_shape(contents)
    return tf.io.decode_and_crop_jpeg(contents, tf.stack(window(shape[0], shape[1])), channels=3)
  return tf.cond(tf.io.is_jpeg(contents), jpeg, lambda: array_view(decode(contents), window))


def file_view(path, window):
  """An image file's path (local or gs://, read by TensorFlow) -> uint8 window."""
  tf = load_tf()
  return encoded_view(tf.io.read_file(path), window,
                      lambda c: tf.io.decode_image(c, channels=3, expand_animations=False))


def whole(h, w):
  return 0, 0, h, w


def centre_square(h, w):
  side = load_tf().minimum(h, w)
  return (h - side) // 2, (w - side) // 2, side, side


def imagenet_crop(h, w, seed):
  """Paper: short side resized to s ~ U[256, 384], random 224 crop. Cropping the matching
  224/s fraction of the original first gives the same view with a single resize."""
  tf = load_tf()
  s_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  short = tf.minimum(h, w)
  s = tf.random.stateless_uniform([], s_seed, 256, 385, tf.int32)
  side = tf.clip_by_value(
      tf.cast(tf.round(224.0 * tf.cast(short, tf.float32) / tf.cast(s, tf.float32)), tf.int32),
      1, short)
  y = tf.random.stateless_uniform([], y_seed, 0, h - side + 1, tf.int32)
  x = tf.random.stateless_uniform([], x_seed, 0, w - side + 1, tf.int32)
  return y, x, side, side


def resize(image, n_px: int):
  """uint8 [h, w, 3] -> uint8 [n_px, n_px, 3]; area averaging, so downsampling is antialiased."""
  tf = load_tf()
  out = tf.image.resize(image, [n_px, n_px], method="area")
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def cifar_augment(image, seed):
  """Paper (CIFAR fine-tuning): 4 px reflect pad, random crop back to size, random flip.

  The pad is 1/8 of the side (4 px at 32x32), so other resolutions shift by the same fraction.
  """
  tf = load_tf()
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  pad = tf.maximum(tf.shape(image)[0] // 8, 1)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  image = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def preprocess(raw, augment: str, n_px: int, seed, view=array_view):
  """A source's raw image (uint8 [h, w, 3] by default) -> uint8 [n_px, n_px, 3], through
  view(raw, window); seed (int64 [2]) None = eval (no randomness)."""
  if seed is not None and augment == "imagenet":
    return resize(view(raw, functools.partial(imagenet_crop, seed=seed)), n_px)
  # Eval of every augment (the paper's short side 224 + centre 224 crop is the centre square).
  image = resize(view(raw, centre_square), n_px)
  if seed is not None and augment == "cifar":
    image = cifar_augment(image, seed)
  return image


def quantize(image, table):
  """uint8 [H, W, 3] -> int32 [H*W] tokens: one lookup per pixel in the uint16 [2^24] table of
  `palette.nearest_table` (flattened: colour r, g, b at 65536 r + 256 g + b)."""
  tf = load_tf()
  v = tf.reshape(tf.cast(image, tf.int32), [-1, 3])
  return tf.cast(tf.gather(table, v[:, 0] * 65536 + v[:, 1] * 256 + v[:, 2]), tf.int32)
