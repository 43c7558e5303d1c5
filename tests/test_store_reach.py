"""A bucket that cannot be reached or used is one line and exit status 2
within seconds (not a minute of client retries and tracebacks), and a
storage client's own errors reach the callers as OSError, so a failed write
in a bucket stops the run as a WriteError like a failed local write."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from gcs_server import GcsServer, free_port, gcs  # noqa: F401  (gcs: the fixture)
from sbam_jax import files, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, env_extra, timeout=90):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **env_extra)
  t0 = time.time()
  p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=timeout)
  return p, time.time() - t0


def one_line(p) -> str:
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
  assert "Traceback" not in p.stderr + p.stdout
  return lines[0]


def emulator_env(endpoint: str) -> dict:
  env = dict(GcsServer().env)
  env.update(STORAGE_EMULATOR_HOST=endpoint, TENSORSTORE_GCS_HTTP_URL=endpoint)
  return env


TRAIN = ["train.py", "--config", "configs/demo.py"]


def test_stopped_emulator_is_one_line_naming_the_endpoint():
  port = free_port()  # nothing listens there
  p, took = run_cli([*TRAIN, "--workdir", "gs://bkt/run"], emulator_env(f"http://127.0.0.1:{port}"))
  line = one_line(p)
  assert "--workdir" in line and "gs://bkt/run" in line, line
  assert f"nothing answers at 127.0.0.1:{port}" in line and "STORAGE_EMULATOR_HOST" in line, line
  assert took < 30, took


def test_unresolvable_endpoint_is_a_dns_error():
  # '.invalid' never resolves (RFC 2606), with or without a network.
  env = emulator_env("http://sbam-no-such-host.invalid:4443")
  p, took = run_cli(["convert_checkpoints.py", "to-torch", "gs://bkt/ckpt", "/tmp/never.pth"], env)
  line = one_line(p)
  assert "gs://bkt/ckpt" in line and "sbam-no-such-host.invalid does not resolve" in line, line
  assert took < 30, took
  assert not os.path.exists("/tmp/never.pth")


def test_missing_bucket_is_named(gcs):
  p, took = run_cli([*TRAIN, "--workdir", "gs://no-such-bucket/run"], {})
  line = one_line(p)
  assert "bucket no-such-bucket does not exist" in line and "gcloud storage buckets create" in line
  assert took < 30, took


def test_silent_server_times_out_in_the_stated_time():
  """A server that accepts connections and never answers: the probe gives up
  after PROBE_S with one line (run in a child: gcsfs's clients are cached
  per process, and the stuck request goes on in a daemon thread)."""
  with socket.socket() as srv:
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
      srv.settimeout(0.2)
      while not stop.is_set():
        try:
          accepted.append(srv.accept()[0])  # held open, never answered
        except OSError:
          pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    code = ("import sys; from sbam_jax import store; store.PROBE_S = 3.0\n"
            "try:\n  store.check('gs://bkt/x')\nexcept store.StoreError as e:\n"
            "  print(e); sys.exit(2)\n")
    try:
      p, took = run_cli(["-c", code], emulator_env(f"http://127.0.0.1:{srv.getsockname()[1]}"))
    finally:
      stop.set()
      t.join()
      for c in accepted:
        c.close()
  assert p.returncode == 2, p.stderr[-2000:]
  assert "no answer from gs://bkt/x in 3 s" in p.stdout, p.stdout
  assert accepted and took < 25, took


class Refusing:
  """A filesystem whose every call fails as gcsfs fails on an HTTP error."""

  def __init__(self, code):
    self.code = code

  def _fail(self, *args, **kwargs):
    from gcsfs.retry import HttpError
    raise HttpError({"code": self.code, "message": "backend unavailable"})

  pipe_file = put_file = info = cat_file = _fail

  def exists(self, path):
    return True

  def walk(self, path):
    yield path, [], ["a"]
    self._fail()


def test_client_errors_become_oserror(monkeypatch):
  monkeypatch.setattr(files, "_fs", lambda path: (files._Translated(Refusing(503)), "b/x"))
  with pytest.raises(OSError, match=r"HttpError \(HTTP 503\): backend unavailable"):
    files.write_atomic("gs://b/x", b"data")
  with pytest.raises(OSError, match="HTTP 503"):
    files.read_bytes("gs://b/x")
  walked = files.walk("gs://b/x")
  assert next(walked) == ("gs://b/x", [], ["a"])
  with pytest.raises(OSError, match="HTTP 503"):
    next(walked)  # (an error raised while a listing is consumed, too)
  assert files.stat("gs://b/x") is None  # stat's contract: unreadable -> None
  assert store.as_oserror(KeyError("x")) is None  # other errors keep their type


def test_failed_bucket_write_stops_the_run_as_a_write_error(monkeypatch, tmp_path):
  from sbam_jax.errors import WriteError
  from sbam_jax.train import logging_utils
  writer = logging_utils.MetricWriter(str(tmp_path))  # opened locally, then the store fails
  writer.jsonl, writer.remote = "gs://b/run/metrics.jsonl", True
  monkeypatch.setattr(files, "_fs", lambda path: (files._Translated(Refusing(500)), "b/x"))
  with pytest.raises(WriteError, match="metrics.jsonl.*HTTP 500"):
    writer.scalars(1, {"loss": 1.0})


def test_refused_access_says_whether_credentials_were_found():
  from gcsfs.retry import HttpError
  refused = HttpError({"code": 403, "message": "caller does not have storage.objects.list"})
  anon = store._refusal("gs://b/x", "b", refused, "anon")
  assert anon.startswith("access to gs://b/x was refused (HTTP 403) without credentials (none")
  assert "GOOGLE_APPLICATION_CREDENTIALS" in anon
  found = store._refusal("gs://b/x", "b", refused, "google_default")
  assert "with the credentials found (google_default)" in found
  other = store._refusal("gs://b/x", "b", HttpError({"code": 500, "message": "oops"}), None)
  assert other.startswith("cannot use gs://b/x: HttpError: oops")


def test_failed_event_upload_is_a_write_error(monkeypatch, tmp_path):
  from sbam_jax.errors import WriteError
  from sbam_jax.train import logging_utils
  writer = logging_utils.MetricWriter(str(tmp_path / "run"))
  writer.tb_dir, writer.remote = "gs://b/run/tensorboard", True  # staged locally, uploaded
  monkeypatch.setattr(files, "_fs", lambda path: (files._Translated(Refusing(503)), "b/x"))
  with pytest.raises(WriteError, match="TensorBoard events to gs://b/run/tensorboard.*HTTP 503"):
    writer.scalars(1, {"loss": 1.0})  # the first upload; metrics.jsonl stays local here
  assert [r["step"] for r in writer.records()] == [1]


def test_metric_log_in_a_bucket_is_read_once(gcs, monkeypatch):
  """The writer keeps the log it uploaded: no download per record (a long
  run's log would otherwise cost a growing download at every record)."""
  from sbam_jax.train import logging_utils
  url = gcs.url("read_once")
  reads = []
  plain = files.read_bytes
  monkeypatch.setattr(files, "read_bytes", lambda p: reads.append(p) or plain(p))
  writer = logging_utils.MetricWriter(url)
  for step in range(1, 5):
    writer._append({"step": step})
  writer.truncate(2)
  writer._append({"step": 3})
  assert len(reads) <= 1, reads
  fresh = logging_utils.MetricWriter(url)  # another reader downloads what was uploaded
  assert [r["step"] for r in fresh.records()] == [1, 2, 3]


class PrefixOnly:
  """A bucket whose metadata and listing are refused (HTTP 403), with access
  granted to one prefix only."""

  def __init__(self, allowed):
    self.allowed = allowed

  def info(self, path):
    raise OSError(f"Forbidden: {path}\ncaller does not have storage.buckets.get")

  def exists(self, path):
    if not path.startswith(self.allowed):
      raise OSError(f"Forbidden: {path}\ncaller does not have storage.objects.list")
    return False


def test_access_to_a_prefix_only_passes_the_probe(monkeypatch):
  import fsspec
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:1")  # (skips the DNS / TCP checks)
  monkeypatch.setattr(fsspec, "filesystem", lambda *a, **k: PrefixOnly("prefix-bkt/mine/"))
  store.check("gs://prefix-bkt/mine/run")  # refused at the bucket, allowed at the path
  with pytest.raises(store.StoreError, match=r"access to gs://prefix-bkt2/theirs/run was refused"):
    store.check("gs://prefix-bkt2/theirs/run")
