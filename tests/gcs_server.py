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
import time

import pytest

BUCKET = "bkt"


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
    cmd = [sys.executable, "-c", "import sys; from gcp_storage_emulator.__main__ import main; "
           "sys.exit(main())", "start", "--host=127.0.0.1", f"--port={self.port}",
           "--in-memory", f"--default-bucket={self.bucket}"]
    self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited: {self.proc.stderr.read().decode()[-2000:]}")
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
