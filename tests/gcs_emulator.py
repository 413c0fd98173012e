"""gcp-storage-emulator with the x-goog-generation header GCS sends on every download.

  python tests/gcs_emulator.py start --port PORT --in-memory --default-bucket BUCKET

tensorstore takes an object's generation from that header; without it, the OCDBT manifest
reads of a resumed orbax save fail ("Malformed StorageGeneration") on the emulator, not on GCS.
"""

import sys

from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.exceptions import NotFound

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return
  response["x-goog-generation"] = obj["generation"]
  response["x-goog-metageneration"] = obj["metageneration"]


objects.download = download
from gcp_storage_emulator.__main__ import main  # noqa: E402  (its routes bind objects.download)

if __name__ == "__main__":
  sys.exit(main())
