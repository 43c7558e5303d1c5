"""Every path may be a gs:// URL: sbam_jax.files on local folders and on a
GCS emulator (checked against os and the emulator's plain HTTP API), the
outputs built on it, and the demo end to end with every path in the bucket."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gcs_server
from gcs_server import objects
from sbam_jax import files
from workdir_helpers import run_env

gcs = gcs_server.gcs  # the emulator fixture, found by pytest under this name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path):
  """A fresh folder: local, or a prefix in the emulated bucket."""
  if request.param == "local":
    return str(tmp_path / "root")
  server = request.getfixturevalue("gcs")
  return server.url(f"unit/{request.node.name.replace('[', '_').strip(']')}")


def listing(server, url) -> dict:
  """{relative name: bytes} under a gs:// URL, from the emulator's HTTP API."""
  prefix = url.split(f"gs://{server.bucket}/", 1)[1].rstrip("/") + "/"
  return {k[len(prefix):]: v for k, v in objects(server, prefix).items()}


def test_write_read_list_walk_stat(where):
  t0 = time.time()
  files.write_atomic(files.join(where, "a.txt"), "alpha")
  files.write_atomic(files.join(where, "sub", "b.bin"), b"\x00\x01")
  files.write_atomic(files.join(where, "sub", "deep", "c.txt"), "c")
  files.write_atomic(files.join(where, "a.txt"), "alpha 2")  # replaced whole
  assert files.read_text(files.join(where, "a.txt")) == "alpha 2"
  assert files.read_bytes(files.join(where, "sub", "b.bin")) == b"\x00\x01"
  assert files.isdir(where) and files.isdir(files.join(where, "sub"))
  assert files.isfile(files.join(where, "a.txt")) and not files.isdir(files.join(where, "a.txt"))
  assert not files.exists(files.join(where, "nothing")) and not files.isdir(files.join(where, "x"))
  assert sorted(files.listdir(where)) == ["a.txt", "sub"]
  assert sorted(files.listdir(files.join(where, "sub"))) == ["b.bin", "deep"]
  with pytest.raises(FileNotFoundError):
    files.listdir(files.join(where, "nothing"))
  found = [f[len(where) + 1:] for f in files.find(where)]
  assert found == ["a.txt", "sub/b.bin", "sub/deep/c.txt"]
  walked = {root[len(where):]: (dirs, names) for root, dirs, names in files.walk(where)}
  assert walked == {"": (["sub"], ["a.txt"]), "/sub": (["deep"], ["b.bin"]),
                    "/sub/deep": ([], ["c.txt"])}
  st = files.stat(files.join(where, "a.txt"))
  assert st.size == 7 and t0 - 2 <= st.mtime <= time.time() + 2
  assert files.stat(files.join(where, "gone")) is None


def test_local_writes_honour_the_umask_and_leave_no_temporary(tmp_path):
  path = str(tmp_path / "out" / "f.txt")
  files.write_atomic(path, "x")
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~files.umask()
  assert os.listdir(tmp_path / "out") == ["f.txt"]


def test_move_remove_rmtree_and_exclusive_create(where):
  files.write_atomic(files.join(where, "d", "x", "1.txt"), "one")
  files.write_atomic(files.join(where, "d", "2.txt"), "two")
  files.move(files.join(where, "d"), files.join(where, "e"))
  assert not files.exists(files.join(where, "d"))
  assert files.read_text(files.join(where, "e", "x", "1.txt")) == "one"
  files.move(files.join(where, "e", "2.txt"), files.join(where, "f.txt"))
  assert files.read_text(files.join(where, "f.txt")) == "two"
  files.remove(files.join(where, "f.txt"))
  with pytest.raises(FileNotFoundError):
    files.remove(files.join(where, "f.txt"))
  files.rmtree(files.join(where, "e"))
  assert not files.exists(files.join(where, "e"))
  files.makedirs(where)
  lock = files.join(where, "lock")
  assert files.create_exclusive(lock, "first")
  assert not files.create_exclusive(lock, "second")
  assert files.read_text(lock) == "first"


def test_exclusive_create_loses_a_race_in_a_bucket(gcs, monkeypatch):
  """Two creators both saw no object: the store's precondition
  (ifGenerationMatch=0) refuses the second upload, which then reports
  False and leaves the first creator's object."""
  import fsspec
  lock = gcs.url("race/lock")
  assert files.create_exclusive(lock, "first")
  fs = fsspec.filesystem("gs", use_listings_cache=False)
  monkeypatch.setattr(fs, "exists", lambda path: False)  # the second creator looked too early
  assert not files.create_exclusive(lock, "second")
  assert files.read_text(lock) == "first"
  assert files.create_exclusive(gcs.url("race/other"), "new")  # (absent: created)


def test_bucket_objects_are_what_was_written(gcs):
  url = gcs.url("raw")
  files.write_atomic(files.join(url, "k", "v.json"), json.dumps({"a": 1}))
  files.copy_file(__file__, files.join(url, "copy.py"))
  with open(__file__, "rb") as f:
    assert listing(gcs, url) == {"k/v.json": b'{"a": 1}', "copy.py": f.read()}
  with files.local_copy(files.join(url, "copy.py")) as local:
    assert os.path.isfile(local) and open(local, "rb").read() == listing(gcs, url)["copy.py"]
  assert not os.path.exists(local)  # the download was temporary


def test_metric_log_and_events_in_a_bucket(gcs):
  from sbam_jax.train import logging_utils
  url = gcs.url("metrics")
  writer = logging_utils.MetricWriter(url)
  for step in range(1, 6):
    writer.scalars(step, {"loss": 1.0 / step})
  writer.close()
  lines = [json.loads(l) for l in listing(gcs, url)["metrics.jsonl"].decode().splitlines()]
  assert [(r["step"], r["loss"]) for r in lines] == [(s, 1.0 / s) for s in range(1, 6)]
  events = {k: v for k, v in listing(gcs, url).items() if k.startswith("tensorboard/")}
  assert len(events) == 1 and all("tfevents" in k for k in events)
  writer = logging_utils.MetricWriter(url)
  writer.truncate(3)  # a resume from step 3: later records go from both logs
  assert [r["step"] for r in writer.records()] == [1, 2, 3]
  assert event_steps(listing(gcs, url)) == [1, 2, 3]


def event_steps(listed: dict) -> list:
  """The steps of the 'loss' events, parsed from the TFRecord frames by hand."""
  import struct
  from tensorboard.compat.proto import event_pb2
  steps = []
  for name, data in listed.items():
    if not name.startswith("tensorboard/"):
      continue
    at = 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      steps += [event.step for v in event.summary.value if v.tag == "loss"]
      at += 16 + n
  return sorted(steps)


def test_lock_in_a_bucket_has_no_pid_to_ask(gcs):
  from sbam_jax.errors import ConfigError
  from sbam_jax.train import workdir
  url = gcs.url("locked")
  first = workdir.Lock(url)
  first.acquire()
  owner = json.loads(listing(gcs, url)[workdir.LOCK])
  assert owner["pid"] == os.getpid()
  # Same host, a pid that is not running: locally taken over, in a bucket not
  # (another machine may share the host name); only the heartbeat's age counts.
  files.write_atomic(first.path, json.dumps({**owner, "pid": 2**22 + 1}))
  with pytest.raises(ConfigError, match="in use by pid"):
    workdir.Lock(url).acquire()
  files.write_atomic(first.path, json.dumps(owner))
  first.release()
  assert workdir.LOCK not in listing(gcs, url)


def test_integrity_records_and_damaged_steps_in_a_bucket(gcs):
  from sbam_jax.train import checkpointing
  url = gcs.url("ckpt")
  for step in (5, 10):
    files.write_atomic(files.join(url, str(step), "default", "a"), b"a" * step)
    checkpointing.write_record(files.join(url, str(step)), step)
  assert checkpointing.list_steps(url) == [5, 10] and checkpointing.has_records(url)
  assert checkpointing.verify_step(url, 10) == (None, True)
  files.write_atomic(files.join(url, "10", "default", "a"), b"b" * 10)  # same size, other bytes
  assert checkpointing.verify_step(url, 10)[0] == "default/a does not match its sha256"
  checkpointing.move_aside(url, 10)
  assert checkpointing.list_steps(url) == [5]
  assert listing(gcs, url)["damaged/10.1/default/a"] == b"b" * 10


def test_folder_source_in_a_bucket_matches_the_local_one(gcs, tmp_path):
  from sbam_jax.data import sources
  from sbam_jax.data.tf_env import import_tf
  local = tmp_path / "data"
  for rel, data in {"train/cat/b.jpg": b"1", "train/cat/a.png": b"2\x00", "train/cat/x/z.jpg": b"3",
                    "train/cat/notes.txt": b"-", "train/dog/c.JPEG": b"4444"}.items():
    (local / rel).parent.mkdir(parents=True, exist_ok=True)
    (local / rel).write_bytes(data)
  url = gcs.url("data")
  files.upload_tree(str(local), url)
  a, b = sources.folder_source(str(local), "train"), sources.folder_source(url, "train")
  assert b.classes == a.classes == ("cat", "dog")
  rel = lambda src, root: [str(p)[len(root):] for p in src.paths]
  assert rel(b, url) == rel(a, str(local)) and list(b.labels) == list(a.labels)
  tf = import_tf()
  read = b.reader()
  assert [read(tf.constant(str(p))).numpy() for p in b.paths] == [b"2\x00", b"1", b"3", b"4444"]
  with pytest.raises(sources.DataError, match="does not exist"):
    sources.folder_source(gcs.url("nothing"), "train")


# ---- the demo end to end, every path in the bucket -------------------------------

SHORT = ["--config.epochs=2", "--config.warmup_epochs=1", "--config.random_epochs=1",
         "--config.evals.knn.every=0", "--config.log_every=1", "--config.checkpoint_every=5",
         "--config.figure_every=1000", "--config.data.source=folder"]


def launch(args, env, cwd, config="demo.py"):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", config), *args]
  return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc) -> tuple:
  out = proc.communicate(timeout=600)[0]
  return proc.returncode, out


def losses(text: str) -> list:
  return [(r["step"], r["loss"]) for r in map(json.loads, text.splitlines()) if "loss" in r]


def test_demo_in_a_bucket_resumes_evaluates_and_converts(gcs, tmp_path):
  from sbam_jax import checkpoints
  from sbam_jax.data import demo
  data = demo.write_demo_dataset(str(tmp_path / "demo"))
  files.upload_tree(data, gcs.url("demo"))
  cwd, scratch = tmp_path / "cwd", tmp_path / "scratch"
  cwd.mkdir()
  scratch.mkdir()
  env = run_env(**gcs.env, TMPDIR=str(scratch), SBAM_JAX_CACHE=str(cwd / "cache"),
                PYTHONPATH=ROOT)
  local = str(tmp_path / "local")  # the uninterrupted reference, beside the bucket's first run
  reference = launch(["--workdir", local, *SHORT, f"--config.data.path={data}"], env, cwd)
  run = gcs.url("run")
  bucket_args = ["--workdir", run, *SHORT, f"--config.data.path={gcs.url('demo')}"]
  proc = launch(bucket_args, env, cwd)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 7/"):
      proc.send_signal(signal.SIGTERM)
      break
  code, out = finish(proc)
  assert code == 128 + signal.SIGTERM, "".join(lines) + out
  code, out = finish(reference)
  assert code == 0, out
  code, out = finish(launch(bucket_args, env, cwd))
  assert code == 0 and "resuming from gs://bkt/run/checkpoints/" in out, out
  listed = listing(gcs, run)
  # The resumed run's log: each step once, the losses of the uninterrupted local run.
  with open(os.path.join(local, "metrics.jsonl")) as f:
    assert losses(listed["metrics.jsonl"].decode()) == losses(f.read())
  assert event_steps(listed) == list(range(1, 31))
  assert {"sbam_jax.json", "figures/progress.npz", "figures/step_0000030.png",
          "figures/metrics.png", "checkpoints/30/sbam_integrity.json"} <= set(listed)
  # Fine-tune from the bucket's workdir, then evaluate it only (MAE's --eval).
  ft, ev = gcs.url("ft"), gcs.url("ev")
  cls = [f"--config.data.path={gcs.url('demo')}", "--config.data.source=folder",
         "--config.epochs=1", "--config.warmup_epochs=0"]
  code, out = finish(launch(["--workdir", ft, *cls, f"--config.init_from={run}"], env, cwd,
                            "demo_finetune.py"))
  assert code == 0, out
  code, out = finish(launch(["--workdir", ev, *cls, f"--config.init_from={ft}",
                             "--config.eval_only=True"], env, cwd, "demo_finetune.py"))
  assert code == 0, out
  final = lambda url: [json.loads(l) for l in listing(gcs, url)["metrics.jsonl"].decode()
                       .splitlines() if "eval/top1" in l][-1]
  assert final(ev)["eval/count"] == 160 and final(ev)["eval/top1"] == final(ft)["eval/top1"]
  # The converters, from and to the bucket: the round trip keeps the weights.
  convert = [sys.executable, os.path.join(ROOT, "convert_checkpoints.py")]
  for args in (["to-torch", run, gcs.url("x.pth")], ["to-jax", gcs.url("x.pth"), gcs.url("back")]):
    done = subprocess.run(convert + args, env=env, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
  back, card = checkpoints.load_weights(gcs.url("back"))
  want, _ = checkpoints.load_weights(local)
  assert card["kind"] == "pretrain" and card["source"] == gcs.url("x.pth")
  import jax
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(cwd) == [] and os.listdir(scratch) == []  # nothing local outside tmp
