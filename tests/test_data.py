"""Input pipelines: sources, splits, augmentation, in-graph quantization, resume, hosts, errors."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tie_palette
from igpt_jax import data, images, palette as palette_lib

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")


# A small palette that spreads colours over many ids, so different pixels give different tokens.
PALETTE = np.random.default_rng(0).uniform(-1, 1, (64, 3)).astype(np.float32)


def _tokens(cfg, **kw):
  kw = {"split": "train", "batch_size": 4, "n_px": 8, "train": True, **kw}
  return data.make_dataset(cfg, palette=PALETTE, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def npz(tmp_path_factory, cifar10_sample):
  """24 real 32x32 images whose labels are their indices (labels identify examples)."""
  path = tmp_path_factory.mktemp("npz") / "real.npz"
  np.savez(path, images=cifar10_sample[0][:24], labels=np.arange(24))
  return {"name": str(path), "augment": "none", "shuffle_buffer": 24}


def test_import_does_not_load_tensorflow():
  out = subprocess.run(
      [sys.executable, "-c", "import sys, igpt_jax.data; print('tensorflow' in sys.modules)"],
      capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == "False"


def distance_table_tokens(images, palette):
  """uint8 [N, H, W, 3] -> (int32 [N, H*W], pixels at a tie): the pipeline's quantization before
  the lookup table (data.py's `_distance_tables` and `_quantize` until issue 33), as it ran."""
  levels = np.asarray(jnp.asarray(np.arange(256, dtype=np.uint8), jnp.float32) / 127.5 - 1.0)
  tables = tf.constant(np.stack([(levels[:, None] - palette[:, i]) ** 2 for i in range(3)]))
  out, ties = [], 0
  for chunk in np.array_split(images, -(-len(images) // 16)):
    v = tf.reshape(tf.cast(chunk, tf.int32), [-1, 3])
    scores = sum(tf.gather(tables[i], v[:, i]) for i in range(3))
    out.append(tf.argmin(scores, -1, output_type=tf.int32).numpy().reshape(len(chunk), -1))
    least = (scores == tf.reduce_min(scores, -1, keepdims=True)).numpy()
    ties += int((least.sum(-1) > 1).sum())
  return np.concatenate(out), ties


@pytest.mark.parametrize("source", ["cifar10", "imagenet"])
def test_tokens_equal_the_distance_table_quantization_on_real_images_ties_included(
    source, tmp_path, request):
  if source == "cifar10":
    images = request.getfixturevalue("cifar10_sample")[0][:256]
    np.savez(tmp_path / "q.npz", images=images, labels=np.arange(256))
    cfg = {"name": str(tmp_path / "q.npz")}
  else:
    cfg = {"name": str(request.getfixturevalue("imagenet_sample")), "augment": "imagenet"}
    images = data.load_images(cfg, "train[:128]", n_px=32)[0]  # as the eval pipeline sees them
  pal = tie_palette(palette_lib.fit_palette(images, 500, steps=30, batch_size=8192))
  split = "train" if source == "cifar10" else "train[:128]"
  batches = data.make_dataset(cfg, split=split, batch_size=64, palette=pal, n_px=32, train=False)
  tokens = np.concatenate([b["tokens"] for b in batches])
  want, ties = distance_table_tokens(images, pal)
  assert ties > 1000  # the duplicated centres' pixels, at least
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(tokens, np.asarray(palette_lib.quantize(images, pal)))


def test_eval_is_one_ordered_padded_pass(npz):
  batches = list(_tokens(npz, split="train[:10]", batch_size=4, train=False))
  assert len(batches) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(12) < 10)
  np.testing.assert_array_equal(labels[:10], np.arange(10))
  assert all(b["tokens"].shape == (4, 64) and b["tokens"].dtype == np.int32 for b in batches)


def test_tfds_split_syntax_selects_the_named_rows(npz):
  def labels(split):
    batches = _tokens(npz, split=split, batch_size=2, train=False)
    return np.concatenate([b["labels"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(labels("train[20:]"), [20, 21, 22, 23])
  np.testing.assert_array_equal(labels("train[:2]+train[-2:]"), [0, 1, 22, 23])
  np.testing.assert_array_equal(labels("train[:25%]"), np.arange(6))


def test_train_epochs_are_permutations(npz):
  epochs = np.concatenate([b["labels"] for b in _take(_tokens(npz), 12)]).reshape(2, 24)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(24))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  assert not np.array_equal(epochs[0], np.arange(24))


def test_train_stream_is_a_function_of_seed(npz):
  cfg = {**npz, "augment": "cifar"}
  a, b, c = (_take(_tokens(cfg, seed=s), 3) for s in (1, 1, 2))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  assert not all(np.array_equal(x["labels"], z["labels"]) for x, z in zip(a, c))


@pytest.mark.parametrize("start_step", [3, 7])  # mid-epoch, and into the second epoch
@pytest.mark.parametrize("host", [(0, 1), (1, 2)])  # (process_index, process_count)
def test_resume_continues_the_stream_exactly(npz, start_step, host):
  cfg = {**npz, "augment": "cifar", "shuffle_buffer": 8}
  kw = dict(batch_size=6, seed=3, process_index=host[0], process_count=host[1])
  full = _take(_tokens(cfg, **kw), start_step + 3)
  resumed = _take(_tokens(cfg, start_step=start_step, **kw), 3)
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x["labels"], y["labels"])
    np.testing.assert_array_equal(x["tokens"], y["tokens"])  # same augmentation draws too


def test_hosts_read_disjoint_halves(npz):
  epoch = [np.concatenate([b["labels"] for b in _take(
      _tokens(npz, batch_size=4, process_index=i, process_count=2), 6)]) for i in (0, 1)]
  assert all(len(set(e)) == 12 for e in epoch)  # one full pass of 12 examples each
  assert not set(epoch[0]) & set(epoch[1])
  assert set(epoch[0]) | set(epoch[1]) == set(range(24))


def test_hosts_draw_their_own_augmentations(cifar10_sample, tmp_path):
  """64 copies of one real image, augment "cifar": rows differ only by their random crop and
  flip, so a host that repeats another's draws repeats its rows."""
  np.savez(tmp_path / "same.npz", images=np.repeat(cifar10_sample[0][:1], 64, axis=0),
           labels=np.zeros(64, np.int32))
  cfg = {"name": str(tmp_path / "same.npz"), "augment": "cifar", "shuffle_buffer": 64}
  first = [next(_tokens(cfg, batch_size=16, n_px=32, process_index=i, process_count=2))["tokens"]
           for i in (0, 1)]  # [8, 1024] each: the two halves of global batch 0
  within = len({row.tobytes() for row in first[0]})
  assert within >= 7, within  # one host's rows are (nearly all) different draws
  same_rows = sum(np.array_equal(a, b) for a, b in zip(*first))
  assert same_rows <= 1, f"{same_rows} of 8 rows of process 1 repeat process 0's draws"
  rows = {row.tobytes() for f in first for row in f}
  assert len(rows) >= 14, len(rows)  # the global batch: 16 draws, not 2 copies of 8


def test_eval_hosts_yield_equal_batch_counts(npz):
  # 10 examples over 3 hosts: 4, 3, 3. Every host must step the same number of times.
  runs = [list(_tokens(npz, split="train[:10]", batch_size=6, train=False, process_index=i,
                       process_count=3)) for i in range(3)]
  assert [len(r) for r in runs] == [2, 2, 2]
  labels = np.concatenate([b["labels"][b["valid"]] for r in runs for b in r])
  np.testing.assert_array_equal(np.sort(labels), np.arange(10))


def test_host_sizes_are_counted_once_per_split(npz, monkeypatch):
  # Every evaluation pass pads each host to the largest host's share; counting the shares reads
  # every host's slice of the split, which must happen once, not at every evaluation.
  calls = []
  real = data._local_slices
  monkeypatch.setattr(data, "_local_slices", lambda *a: calls.append(a) or real(*a))
  for _ in range(3):
    list(_tokens(npz, split="train[:9]", batch_size=6, train=False, process_index=1,
                 process_count=3))
    assert data.num_examples(npz, "train[:9]") == 9  # one process: all of it
  counted = [a for a in calls if a[3] == 3 and a[2] != 1]  # other hosts' shares
  assert len(counted) == 2  # hosts 0 and 2, once each


def _preprocess(image, augment, n_px, seed):
  seed = None if seed is None else tf.constant([0, seed], tf.int64)
  return images.preprocess(tf.constant(image), augment, n_px, seed).numpy()


def test_area_resize_averages_blocks(cifar10_sample):
  image = cifar10_sample[0][0]
  want = np.rint(image.reshape(8, 4, 8, 4, 3).astype(np.float64).mean((1, 3)))
  np.testing.assert_allclose(_preprocess(image, "none", 8, None), want, atol=1)


@pytest.mark.parametrize("side, pad", [(32, 4), (16, 2)])  # the paper's 4 px at 32x32
def test_cifar_augment_is_a_padded_crop_or_its_mirror(cifar10_sample, side, pad):
  image = cifar10_sample[0][1][:side, :side]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  views = [v for y in range(2 * pad + 1) for x in range(2 * pad + 1)
           for v in (padded[y:y + side, x:x + side], padded[y:y + side, x:x + side][:, ::-1])]
  outs = [_preprocess(image, "cifar", side, s) for s in range(6)]
  for out in outs:
    assert any(np.array_equal(out, v) for v in views)
  assert len({o.tobytes() for o in outs}) > 1
  np.testing.assert_array_equal(_preprocess(image, "cifar", side, None), image)  # eval: as is


def test_imagenet_augment_crops_then_downscales():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  outs = [_preprocess(image, "imagenet", 16, s) for s in range(4)]
  assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) == 4
  np.testing.assert_array_equal(outs[0], _preprocess(image, "imagenet", 16, 0))
  # Eval: the centre 300x300 square (the paper's short side 224 + centre crop), downscaled.
  want = np.rint(image[:, 50:350].astype(np.float64).reshape(15, 20, 15, 20, 3).mean((1, 3)))
  np.testing.assert_allclose(_preprocess(image, "imagenet", 15, None), want, atol=1)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory, cifar10_sample):
  """An image folder (class = index % 2) of 12 JPEGs, real CIFAR-10 images enlarged to 72x96 or
  96x72 (libjpeg's default 4:2:0 chroma), and 2 PNGs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("jpegs")
  for i, image in enumerate(cifar10_sample[0][:14]):
    os.makedirs(root / f"c{i % 2}", exist_ok=True)
    image = Image.fromarray(image).resize((96, 72) if i % 3 else (72, 96), Image.BICUBIC)
    image.save(root / f"c{i % 2}" / f"{i:02d}.{'png' if i >= 12 else 'jpg'}", quality=90)
  return root


def crop_decode_differences(files, n_px: int, seeds) -> np.ndarray:
  """|window decoded alone - window of the whole decode| after the resize to n_px, for each file
  and seed (None: the eval centre square): int [files * seeds, n_px, n_px]."""
  out = []
  for f in files:
    whole = tf.io.decode_jpeg(tf.io.read_file(str(f)), channels=3)
    for seed in seeds:
      seed = None if seed is None else tf.constant([7, seed], tf.int64)
      alone = images.preprocess(tf.constant(str(f)), "imagenet", n_px, seed, images.file_view)
      cut = images.preprocess(whole, "imagenet", n_px, seed)
      out.append(np.abs(alone.numpy().astype(int) - cut.numpy().astype(int)).max(-1))
  return np.stack(out)


def test_a_jpeg_window_decoded_alone_is_the_whole_decodes_but_at_its_border(jpegs):
  diff = crop_decode_differences(sorted(jpegs.rglob("*.jpg")), 16, [None, *range(8)])
  assert not diff[:, 1:-1, 1:-1].any()  # chroma upsampling differs at the window's edge only
  assert diff.max() <= 8 and diff.mean() < 0.05


def test_real_imagenet_windows_decoded_alone_differ_only_at_their_border(imagenet_sample):
  files = sorted((imagenet_sample / "train").rglob("*.JPEG"))[::10]
  diff = crop_decode_differences(files, 32, [None, 0, 1])
  assert not diff[:, 2:-2, 2:-2].any()
  assert (diff > 0).mean() < 1e-3


def test_jpeg_folder_stream_resumes_exactly_and_splits_over_hosts(jpegs):
  cfg = {"name": str(jpegs), "augment": "imagenet", "shuffle_buffer": 14}
  full = _take(_tokens(cfg, seed=4, n_px=16), 8)  # 14 files, batch 4: into the third epoch
  for x, y in zip(full[5:], _take(_tokens(cfg, seed=4, n_px=16, start_step=5), 3)):
    for key in ("tokens", "labels"):
      np.testing.assert_array_equal(x[key], y[key])
  hosts = [{r.tobytes() for b in _tokens(cfg, n_px=16, train=False, process_index=i,
                                         process_count=2) for r in b["tokens"][b["valid"]]}
           for i in (0, 1)]
  assert len(hosts[0]) == len(hosts[1]) == 7 and not hosts[0] & hosts[1]


def test_local_npz_directory_and_image_folder(tmp_path, cifar10_sample):
  images, labels = cifar10_sample
  npz_dir = tmp_path / "shards"
  npz_dir.mkdir()
  np.savez(npz_dir / "train-0.npz", images=images[:5], labels=labels[:5])
  np.savez(npz_dir / "train-1.npz", images=images[5:8], labels=labels[5:8])
  np.savez(npz_dir / "test.npz", images=images[8:10], labels=labels[8:10])
  got, got_labels = data.load_images({"name": str(npz_dir)}, "train")
  np.testing.assert_array_equal(got, images[:8])
  np.testing.assert_array_equal(got_labels, labels[:8])
  assert len(data.load_images({"name": str(npz_dir)}, "test")[0]) == 2

  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i, cls in enumerate(["cat", "cat", "dog"]):
    os.makedirs(tmp_path / "folder" / cls, exist_ok=True)
    Image.fromarray(images[i]).save(tmp_path / "folder" / cls / f"{i}.png")
  got, got_labels = data.load_images({"name": str(tmp_path / "folder")}, "train")
  np.testing.assert_array_equal(got, images[:3])
  np.testing.assert_array_equal(got_labels, [0, 0, 1])
  np.savez(tmp_path / "same.npz", images=images[:3], labels=[0, 0, 1])
  from_folder, from_npz = (next(_tokens({"name": str(tmp_path / n)}, batch_size=3, train=False))
                           for n in ("folder", "same.npz"))
  for key in ("tokens", "labels", "valid"):
    np.testing.assert_array_equal(from_folder[key], from_npz[key])


@pytest.fixture(scope="module")
def tfds_cifar10(tmp_path_factory, cifar10_sample):
  """A real prepared tfds `cifar10` (20 train, 10 test real images) in a temporary data_dir."""
  images, labels = cifar10_sample

  class SmallCifar10(tfds.image_classification.Cifar10, skip_registration=True):
    name = "cifar10"
    url_infos = {}  # nothing to download

    def _split_generators(self, dl_manager):
      return {"train": self._examples(0, 20), "test": self._examples(20, 30)}

    def _examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {"id": str(i), "image": images[i], "label": int(labels[i])}

  data_dir = tmp_path_factory.mktemp("tfds")
  SmallCifar10(data_dir=str(data_dir)).download_and_prepare(download_dir=str(data_dir / "dl"))
  return {"name": "cifar10", "data_dir": str(data_dir), "augment": "cifar"}, images[:20]


def test_prepared_tfds_dataset_per_host(tfds_cifar10):
  cfg, originals = tfds_cifar10
  images, _ = data.load_images(cfg, "train")
  assert sorted(i.tobytes() for i in images) == sorted(i.tobytes() for i in originals)
  hosts = [np.concatenate([b["tokens"][b["valid"]] for b in _tokens(
      cfg, n_px=32, batch_size=4, train=False, process_index=i, process_count=2)]) for i in (0, 1)]
  rows = [{r.tobytes() for r in h} for h in hosts]
  assert len(rows[0]) == len(rows[1]) == 10 and not rows[0] & rows[1]
  assert rows[0] | rows[1] == {r.tobytes() for r in np.asarray(
      palette_lib.quantize(originals, PALETTE))}
  full = _take(_tokens(cfg, seed=2), 8)  # 20 examples, batch 4: steps 6 and 7 are in epoch 2
  for x, y in zip(full[6:], _take(_tokens(cfg, seed=2, start_step=6), 2)):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


@pytest.mark.parametrize("name", ["imagenet2012", "imagenet_resized/32x32", "cifar10"])
def test_tfds_pipelines_on_mock_data(name):
  # mock_data ignores the split (every host and split sees the same fake examples).
  with tfds.testing.mock_data(num_examples=6):
    cfg = {"name": name, "augment": "imagenet" if "imagenet" in name else "cifar"}
    a = _take(_tokens(cfg, n_px=8, seed=5), 4)
    b = _take(_tokens(cfg, n_px=8, seed=5, start_step=2), 2)
    images, labels = data.load_images(cfg, "train", 5, n_px=8)
  assert a[0]["tokens"].shape == (4, 64)
  np.testing.assert_array_equal(a[2]["tokens"], b[0]["tokens"])
  np.testing.assert_array_equal(a[3]["labels"], b[1]["labels"])
  assert images.shape == (5, 8, 8, 3) and labels.shape == (5,)


@pytest.mark.parametrize("cfg, kw, match", [
    ({"name": "imagenet9000"}, {}, "imagenet2012, imagenet_resized/32x32"),
    ({"name": "/no/such/images.npz"}, {}, "no such file or directory"),
    ({"name": "cifar10", "data_dir": "/no/such/dir"}, {}, "data_dir"),
    ({"name": "cifar10", "shuffle_bufer": 5}, {}, "shuffle_bufer"),
    ({"name": "cifar10", "augment": "flip"}, {}, "augment"),
    (None, {"palette": np.zeros((512, 4), np.float32)}, "palette"),
    (None, {"batch_size": 5, "process_index": 0, "process_count": 2}, "multiple"),
    (None, {"split": "test"}, "only split"),
])
def test_bad_input_is_a_clear_error(npz, cfg, kw, match):
  with pytest.raises(ValueError, match=match):
    next(data.make_dataset(cfg or npz, **{"split": "train", "batch_size": 4, "n_px": 8,
                                          "train": True, "palette": PALETTE, **kw}))


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="not prepared in"):  # offline; ImageNet is manual anyway
    data.load_images({"name": "imagenet2012", "data_dir": str(tmp_path)}, "train", 1)


@pytest.mark.parametrize("images", [
    np.zeros((4, 8, 8), np.uint8),  # grayscale
    np.zeros((4, 8, 8, 3), np.float32),
    np.zeros((4, 8, 8, 4), np.uint8),
])
def test_wrong_image_arrays_are_rejected(tmp_path, images):
  np.savez(tmp_path / "bad.npz", images=images, labels=np.zeros(4, int))
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    data.load_images({"name": str(tmp_path / "bad.npz")}, "train")
