"""metrics.jsonl and the TensorBoard events: the writer's files, read back by their readers."""

import json

import numpy as np

from igpt_jax import metrics
from igpt_jax import paths
from conftest import GCS_BUCKET


def tensorboard_scalars(event_file) -> dict:
  """{(step, tag): value} as TensorFlow's own event reader parses the file."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out = {}
  for event in tf.compat.v1.train.summary_iterator(str(event_file)):
    for value in event.summary.value:
      out[(event.step, value.tag)] = value.simple_value
  return out


def write_run(workdir):
  """Two writers, as a run and its resume: step 2 is logged by both."""
  first = metrics.Writer(workdir)
  first.write(1, {"train_loss": 3.0})
  first.write(2, {"train_loss": 2.5, "eval_loss": 2.75})
  second = metrics.Writer(workdir)
  second.write(2, {"train_loss": 2.25})
  second.write(3, {"train_loss": 2.0})
  return first, second


def test_last_record_per_step_and_events_tensorflow_reads(tmp_path):
  first, second = write_run(tmp_path)
  assert metrics.read(tmp_path) == {1: {"step": 1, "train_loss": 3.0},
                                     2: {"step": 2, "train_loss": 2.25},
                                     3: {"step": 3, "train_loss": 2.0}}
  assert first.events != second.events  # one events file per start, as TensorBoard expects
  assert tensorboard_scalars(first.events) == {(1, "train_loss"): 3.0, (2, "train_loss"): 2.5,
                                               (2, "eval_loss"): 2.75}
  assert tensorboard_scalars(second.events) == {(2, "train_loss"): 2.25, (3, "train_loss"): 2.0}
  assert metrics.read(tmp_path / "no_run") == {}


def test_images_go_to_tensorboard_not_to_the_jsonl(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  png = tf.io.encode_png(np.zeros((3, 5, 3), np.uint8)).numpy()  # 5 wide, 3 high
  writer = metrics.Writer(tmp_path)
  writer.write(4, {"eval_loss": 2.0}, {"eval_loss_by_pixel": png})
  assert metrics.read(tmp_path) == {4: {"step": 4, "eval_loss": 2.0}}
  images = [(e.step, v.tag, v.image) for e in tf.compat.v1.train.summary_iterator(
      str(writer.events)) for v in e.summary.value if v.HasField("image")]
  [(step, tag, image)] = images
  assert (step, tag, image.width, image.height) == (4, "eval_loss_by_pixel", 5, 3)
  assert image.encoded_image_string == png


def test_inactive_writer_writes_nothing(tmp_path):
  metrics.Writer(tmp_path, active=False).write(1, {"train_loss": 1.0})
  assert list(tmp_path.iterdir()) == []


def test_a_write_cut_short_costs_only_its_own_line(tmp_path, caplog):
  metrics.Writer(tmp_path).write(1, {"train_loss": 3.0})
  with open(tmp_path / metrics.FILE, "a") as f:
    f.write('{"step": 2, "train_lo')  # the process died mid-append
  metrics.Writer(tmp_path).write(2, {"train_loss": 2.5})  # the resumed run starts a fresh line
  assert metrics.read(tmp_path) == {1: {"step": 1, "train_loss": 3.0},
                                     2: {"step": 2, "train_loss": 2.5}}
  assert "line 2 is not a metrics record" in caplog.text


def test_in_a_bucket_each_write_appends_only_its_bytes(gcs, tmp_path, monkeypatch):
  del gcs
  workdir = f"gs://{GCS_BUCKET}/metrics_run"
  sent = []
  upload = paths.epath.Path.write_bytes

  def counting(self, data):
    sent.append(len(data))
    return upload(self, data)

  monkeypatch.setattr(paths.epath.Path, "write_bytes", counting)
  first, second = write_run(workdir)
  write_run(tmp_path)
  assert metrics.read(workdir) == metrics.read(tmp_path)
  lines = [json.dumps(r) for r in ({"step": 1, "train_loss": 3.0},
                                   {"step": 2, "train_loss": 2.5, "eval_loss": 2.75})]
  # Per write: the JSON line and the event record(s), never the whole object so far.
  assert sent[0] == len(lines[0]) + 1 and sent[2] == len(lines[1]) + 1
  assert max(sent) < 200
  local = tmp_path / "events"
  local.write_bytes(paths.path(first.events).read_bytes())
  assert tensorboard_scalars(local) == {(1, "train_loss"): 3.0, (2, "train_loss"): 2.5,
                                        (2, "eval_loss"): 2.75}
  assert paths.path(second.events).exists()
