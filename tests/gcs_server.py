"""A GCS-compatible server on the loopback for tests (gcp-storage-emulator).

`GcsServer` starts `gcp-storage-emulator` in memory on a free 127.0.0.1 port
in a subprocess, with one bucket, and stops it. `env` holds the variables
that point every client at it: gcsfs (through etils.epath, which the project
sets to fsspec) reads STORAGE_EMULATOR_HOST, tensorstore (orbax's array I/O)
TENSORSTORE_GCS_HTTP_URL plus a dummy token. TensorFlow's own GCS client
has no endpoint setting, so nothing here reaches it.

Use the `gcs` fixture (session-wide; it also sets the variables in this
process, for child processes and in-process clients) or `GcsServer()` as a
context manager.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

BUCKET = "bkt"
# Two gaps of the emulator, filled here before it starts:
# - its http.server takes one connection at a time with a backlog of 5:
#   tensorstore's parallel requests beside the input pipeline's reads then
#   fail at times; each connection gets a thread, and one lock keeps its
#   in-memory store (which has no locks) at one request at a time;
# - media downloads carry no `x-goog-generation` header and ignore
#   `ifGenerationNotMatch` / `ifGenerationMatch`, which tensorstore's
#   conditional reads of an OCDBT manifest rely on ("Malformed
#   StorageGeneration"); both are answered as GCS does;
# - uploads ignore `ifGenerationMatch=0` (create only if absent), which the
#   workdir lock relies on: an existing object is answered 412 as GCS does.
_SERVE = """
import http.server, sys, threading
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
http.server.ThreadingHTTPServer.request_queue_size = 256
http.server.HTTPServer = http.server.ThreadingHTTPServer
lock, handle = threading.Lock(), server.Router.handle
def locked(self, *args, **kwargs):
  with lock:
    return handle(self, *args, **kwargs)
server.Router.handle = locked
plain = objects.download
def download(request, response, storage, *args, **kwargs):
  try:
    gen = str(storage.get_file_obj(request.params["bucket_name"],
                                   request.params["object_id"])["generation"])
  except NotFound:
    return plain(request, response, storage)
  if request.query.get("ifGenerationNotMatch", [None])[0] == gen:
    response.status = HTTPStatus.NOT_MODIFIED
    return
  want = request.query.get("ifGenerationMatch", [gen])[0]
  if want != gen:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return
  response["x-goog-generation"] = gen
  return plain(request, response, storage)
objects.download = download
from gcp_storage_emulator.storage import Storage
only_new, plain_create, plain_insert = threading.local(), Storage.create_file, objects.insert
class Exists(Exception):
  pass
def create_file(self, bucket_name, file_name, *args, **kwargs):
  if getattr(only_new, "on", False):
    try:
      self.get_file_obj(bucket_name, file_name)
    except NotFound:
      pass
    else:
      raise Exists()
  return plain_create(self, bucket_name, file_name, *args, **kwargs)
Storage.create_file = create_file
def insert(request, response, storage, *args, **kwargs):
  only_new.on = request.query.get("ifGenerationMatch", [None])[0] == "0"
  try:
    return plain_insert(request, response, storage, *args, **kwargs)
  except Exists:
    response.status = HTTPStatus.PRECONDITION_FAILED
  finally:
    only_new.on = False
objects.insert = insert
swap = {plain: download, plain_insert: insert}
server.HANDLERS = tuple((pattern, {m: swap.get(f, f) for m, f in methods.items()})
                        for pattern, methods in server.HANDLERS)
from gcp_storage_emulator.__main__ import main
sys.exit(main())
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """The emulator process; `url(path)` -> 'gs://bkt/path'."""

  def __init__(self, bucket: str = BUCKET):
    self.bucket, self.port, self.proc = bucket, free_port(), None
    endpoint = f"http://127.0.0.1:{self.port}"
    self.env = {"STORAGE_EMULATOR_HOST": endpoint, "TENSORSTORE_GCS_HTTP_URL": endpoint,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "EPATH_USE_TF": "false",
                # gcsfs's zonal-bucket probe needs real credentials; the emulator has plain buckets
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                # no metadata-server probing for credentials (there is none here)
                "GCE_METADATA_HOST": "127.0.0.1:1", "NO_GCE_CHECK": "true"}

  def url(self, path: str = "") -> str:
    return f"gs://{self.bucket}/{path}".rstrip("/")

  def start(self, timeout: float = 30.0) -> "GcsServer":
    cmd = [sys.executable, "-c", _SERVE, "start", "--host=127.0.0.1", f"--port={self.port}",
           "--in-memory", f"--default-bucket={self.bucket}"]
    # Its log goes to a file: a pipe nobody reads fills up and stalls the server.
    self.log = tempfile.TemporaryFile()
    self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        self.log.seek(0)
        raise RuntimeError(f"the GCS emulator exited: {self.log.read().decode()[-2000:]}")
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        return self
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"the GCS emulator did not listen on port {self.port} in {timeout} s")

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    if self.proc is not None:
      self.log.close()
    self.proc = None

  def __enter__(self) -> "GcsServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


@pytest.fixture(scope="session")
def gcs():
  """A running emulator; its variables are set in os.environ meanwhile."""
  with GcsServer() as server:
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
      yield server
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


def objects(server: GcsServer, prefix: str = "") -> dict:
  """{name: bytes} of the bucket's objects under `prefix`, read with plain
  HTTP from the JSON API (no client library: an independent view)."""
  import json  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  base = f"http://127.0.0.1:{server.port}"
  query = urllib.parse.urlencode({"prefix": prefix})
  with urllib.request.urlopen(f"{base}/storage/v1/b/{server.bucket}/o?{query}") as r:
    items = json.load(r).get("items", [])
  out = {}
  for item in items:
    name = urllib.parse.quote(item["name"], safe="")
    with urllib.request.urlopen(f"{base}/download/storage/v1/b/{server.bucket}/o/{name}"
                                f"?alt=media") as r:
      out[item["name"]] = r.read()
  return out
