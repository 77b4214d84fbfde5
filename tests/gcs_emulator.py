r"""A GCS server on localhost: gcp-storage-emulator, plus the download header TensorStore needs.

  python tests/gcs_emulator.py --port 9023 --bucket igpt-demo [--data_dir DIR]

serves the GCS JSON API at http://127.0.0.1:9023 with the bucket created (objects in memory, or
under --data_dir so a restart keeps them), until stopped. Point the project at it with

  export STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 \
      TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:9023 GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator \
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false

(gcsfs and TensorStore, i.e. every path of igpt_jax.paths and orbax's arrays; the last turns off
a gRPC probe of the bucket type that the emulator does not serve). TensorFlow's own GCS
filesystem ignores these, so tfds data_dirs and image folders in the emulated bucket do not work.

Downloads here carry the x-goog-generation header that real GCS sends: TensorStore takes an
object's generation from it, and without it OCDBT's conditional rewrite of its manifest fails
("Malformed StorageGeneration") in about half of the checkpoint saves that have two items
(measured: 4 of 6 such saves against the plain emulator, 0 of 12 with the header).
"""

import argparse
import threading

from gcp_storage_emulator.handlers import objects

_plain_download = objects.download


def _download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  except Exception:  # pylint: disable=broad-except  # missing: the handler answers 404 itself
    pass
  _plain_download(request, response, storage, *args, **kwargs)


objects.download = _download  # before the server module builds its routes
from gcp_storage_emulator.server import create_server  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, default=9023)
  parser.add_argument("--bucket", default="igpt-demo")
  parser.add_argument("--data_dir", default=None, help="keep objects here (default: memory)")
  args = parser.parse_args()
  create_server("127.0.0.1", args.port, in_memory=args.data_dir is None,
                default_bucket=args.bucket, data_dir=args.data_dir).start()
  print(f"ready: http://127.0.0.1:{args.port}, bucket gs://{args.bucket}", flush=True)
  threading.Event().wait()


if __name__ == "__main__":
  main()
