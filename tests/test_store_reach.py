"""A bucket that cannot be reached or used is one line and exit status 2
within seconds (not a minute of client retries and tracebacks), a bucket
name Cloud Storage cannot hold is refused before any request, and a
storage client's own errors reach the callers as OSError, so a failed write
in a bucket stops the run as a WriteError like a failed local write. In
the input pipeline an image that cannot be read is a named skip; a store
lost mid-run stops it with one StoreError."""

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gcs_server
from gcs_server import GcsServer, free_port
from sbam_jax import files, store

gcs = gcs_server.gcs  # the emulator fixture, found by pytest under this name

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


# ---- bucket names -----------------------------------------------------------------

def no_network(monkeypatch):
  """Any name lookup, connection or client made from here on fails the test."""
  import fsspec

  def refuse(*args, **kwargs):
    raise AssertionError(f"network used: {args}")
  for module, name in ((socket, "getaddrinfo"), (socket, "create_connection"),
                       (fsspec, "filesystem")):
    monkeypatch.setattr(module, name, refuse)


def test_bad_bucket_name_is_one_line_before_any_request():
  # An endpoint that never resolves: a request made before the name check
  # would end as a DNS error, not as the naming rule.
  env = emulator_env("http://sbam-no-such-host.invalid:4443")
  p, took = run_cli([*TRAIN, "--workdir", "gs://Bad Bucket!/x"], env)
  line = one_line(p)
  assert line.startswith("error: --workdir: 'gs://Bad Bucket!/x' is not a usable bucket URL: "
                         "the bucket name holds ' ', '!', 'B'; "), line
  assert "3-63 characters" in line and "lowercase letters" in line, line
  assert "resolve" not in line and took < 30, (line, took)


# (bucket, the reason named), from Cloud Storage's naming rules.
BAD_NAMES = [
    ("", "is empty"),
    ("ab", "has 2 characters"),
    ("a" * 64, "has 64 characters"),
    ("my_Bucket", "holds 'B'"),
    ("bucket:1", "holds ':'"),
    ("-bucket", "does not start and end with a letter or digit"),
    ("bucket_", "does not start and end with a letter or digit"),
    ("my..bucket", "two dots in a row"),
    ("a" * 64 + ".example.com", "part aaaaaaaaaaaaaaaa... has 64 characters"),
    (".".join(["a" * 60] * 4), "has 243 characters"),
]
GOOD_NAMES = ["abc", "a" * 63, "my_bucket-1.2", "0-9", ".".join(["a" * 63] * 3) + ".ab"]


@pytest.mark.parametrize("bucket,reason", BAD_NAMES)
def test_bad_bucket_names_are_refused_without_network(monkeypatch, bucket, reason):
  no_network(monkeypatch)
  url = f"gs://{bucket}/run" if bucket else "gs://"
  with pytest.raises(store.StoreError) as e:
    store.check(url)
  text = str(e.value)
  assert text.startswith(f"{url!r} is not a usable bucket URL: ") and reason in text, text
  assert "\n" not in text and store.NAME_RULE in text


def test_good_bucket_names_pass_the_name_check(monkeypatch):
  no_network(monkeypatch)
  for bucket in GOOD_NAMES:
    assert len(bucket) <= 222 and store.name_problem(bucket) == "", bucket
    store.check_name(f"gs://{bucket}/x", bucket)
  assert len(GOOD_NAMES[-1]) == 194
  store.check("s3://Any Name/x")  # (other schemes are their client's business)


# ---- reading images from a bucket -------------------------------------------------

def png(value: int) -> bytes:
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def bucket_pipeline(server, prefix: str, per_class: int = 4):
  """An evaluation pipeline (batches of 4) over 2 classes of `per_class`
  one-colour PNGs in the emulator: image i of class c has value 10 c + i."""
  from sbam_jax.data import pipeline, sources
  from sbam_jax.data.tf_env import import_tf
  tf = import_tf()
  for c in range(2):
    for i in range(per_class):
      files.write_atomic(server.url(f"{prefix}/train/c{c}/{i}.png"), png(10 * c + i))
  source = sources.folder_source(server.url(prefix), "train")
  decode = lambda data, seed: tf.ensure_shape(
      tf.io.decode_png(data, channels=3), (4, 4, 3))
  return source, pipeline.InputPipeline(source, decode, global_batch=4, image_size=4,
                                        train=False, threads=2)


def test_unreadable_bucket_images_are_named_skips(gcs, monkeypatch):
  """A file removed after the listing, and one object whose read fails while
  the store answers: both are counted, named skips; the others arrive."""
  source, pipe = bucket_pipeline(gcs, "skips")
  files.remove(gcs.url("skips/train/c0/1.png"))
  plain, broken = files.read_bytes, gcs.url("skips/train/c1/2.png")

  def read(path):
    if path == broken:
      raise OSError(5, "Input/output error", path)
    return plain(path)
  monkeypatch.setattr(files, "read_bytes", read)
  batches = list(pipe)
  valid = np.concatenate([b["valid"] for b in batches])
  values = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  paths = [str(p) for p in source.paths]
  assert pipe.skipped == 2 and sorted(pipe.skipped_names) == sorted(
      [gcs.url("skips/train/c0/1.png"), broken])
  assert [p for p, ok in zip(paths, valid) if not ok] == sorted(pipe.skipped_names)
  expected = [10 * int(p.split("/c")[1][0]) + int(p.rsplit("/", 1)[1][0]) for p in paths]
  np.testing.assert_array_equal(values[valid], np.array(expected)[valid])
  assert not source.watch.lost


@pytest.mark.parametrize("names", [20, 0])
def test_store_lost_mid_run_stops_with_one_store_error(monkeypatch, names):
  """The emulator stops after the first batch: the next failed read probes
  the store, which does not answer, and the pipeline raises one StoreError
  naming the endpoint (the reads after it fail at once, unretried). With
  names=0 no skipped image is named (as after the first 20): the stop still
  comes, from the pipeline's check of each batch with failed images."""
  server = GcsServer(bucket="lost").start()
  for k, v in server.env.items():
    monkeypatch.setenv(k, v)
  calls, plain, gone, one_at_a_time = [], files.read_bytes, threading.Event(), threading.Lock()

  def read(path):  # (what the client raises after its ~30 s of retries, at once)
    with one_at_a_time:  # (no read is cut by the stop: the client would retry it)
      calls.append(path)
      if gone.is_set():
        raise ConnectionRefusedError(111, "Connect call failed", path)
      return plain(path)
  try:
    source, pipe = bucket_pipeline(server, "run", per_class=16)  # (more than prefetched)
    pipe._max_names = names
    monkeypatch.setattr(files, "read_bytes", read)
    it = iter(pipe)
    first = next(it)
    assert first["valid"].all() and pipe.skipped == 0
    with one_at_a_time:
      server.stop()
      gone.set()
    t0 = time.time()
    with pytest.raises(store.StoreError) as e:
      for _ in it:
        pass
  finally:
    server.stop()
  text = str(e.value)
  assert text.startswith("images of gs://lost/run cannot be read any more: cannot reach "), text
  assert f"nothing answers at 127.0.0.1:{server.port}" in text and "\n" not in text, text
  assert time.time() - t0 < 20 and len(calls) <= source.num_examples
  assert pipe.skipped <= 4, pipe.skipped  # (at most the batch in which it stopped)
  with pytest.raises(store.StoreError):
    source.describe()  # (every host-side use of the source stops too)
