"""train.py end to end: the demo, exact resume after SIGKILL, SIGTERM, NaN,
bad configs, and 8 simulated devices (data x FSDP) against one."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sbam_jax import config as C
from sbam_jax.train import pretrain
from workdir_helpers import final_state, metrics, run_env, tensorboard_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo as demo_config  # noqa: E402

SHORT = ["--config.epochs=3", "--config.warmup_epochs=1", "--config.random_epochs=1",
         "--config.evals.knn.every=0",
         "--config.log_every=1", "--config.checkpoint_every=5", "--config.figure_every=1000"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def launch(workdir, cache, *overrides, devices=1, flags=()):
  env = run_env(flags, SBAM_JAX_CACHE=cache,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", "demo.py"), "--workdir", str(workdir), *flags, *overrides]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run(workdir, cache, *overrides, devices=1):
  proc = launch(workdir, cache, *overrides, devices=devices)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def test_demo_run_learns_and_writes_everything(tmp_path, cache):
  code, out = run(tmp_path, cache, "--config.epochs=6", "--config.figure_every=45",
                  "--config.log_every=15", "--config.checkpoint_every=45",
                  "--config.evals.knn.every=4")
  assert code == 0, out
  rows = metrics(tmp_path)
  losses = [m["loss"] for m in rows if "loss" in m]
  assert losses[-1] < losses[0] - 0.1, losses
  train_rows = [m for m in rows if "loss" in m]
  assert train_rows[0]["mask_ratio_mean"] == pytest.approx(0.75)  # random masking first
  assert train_rows[-1]["mask_ratio_mean"] < 0.75 and "frac_above_delta" in train_rows[-1]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["45", "90"]
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
  figs = sorted(os.listdir(tmp_path / "figures"))
  assert figs == ["metrics.png", "progress.npz", "progress.png", "step_0000045.png",
                  "step_0000090.png"]
  assert "step 90/90" in out
  # The representation monitor (configs/demo.py, here every 4 epochs): start, epoch 4, end.
  knn = {r["step"]: r for r in rows if "knn/cls_top1" in r}
  assert sorted(knn) == [0, 60, 90], knn
  assert all(0 <= r["knn/cls_top1"] <= 100 and 0 <= r["knn/mean_top1"] <= 100
             for r in knn.values())
  assert "knn step 60 ep 4.00: k-NN top-1 cls" in out and "chance 10.0%" in out


def test_resume_after_sigkill_is_bit_identical(tmp_path, cache):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  code, out = run(straight, cache, *SHORT)
  assert code == 0, out
  proc = launch(killed, cache, *SHORT)
  deadline = time.time() + 300
  while time.time() < deadline:
    ckpts = killed / "checkpoints"
    done = [d for d in (os.listdir(ckpts) if ckpts.exists() else []) if d.isdigit()]
    if any(int(d) >= 20 for d in done):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out = run(killed, cache, *SHORT)
  assert code == 0, out
  step_a, a = final_state(straight)
  step_b, b = final_state(killed)
  assert step_a == step_b == 45
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The logs match the state: each step once, the same losses as the straight run.
  loss = lambda w: [(m["step"], m["loss"]) for m in metrics(w) if "loss" in m]
  assert [s for s, _ in loss(killed)] == list(range(1, 46))
  assert loss(killed) == loss(straight)
  assert tensorboard_steps(killed, "loss") == list(range(1, 46))


def test_bucketed_capacity_trains_like_maximum_capacity(tmp_path, cache):
  overrides = ["--config.epochs=3", "--config.warmup_epochs=1", "--config.random_epochs=1",
               "--config.log_every=1", "--config.checkpoint_every=100",
               "--config.figure_every=1000", "--config.masking.group=global",
               "--config.masking.ratio_var=0.2", "--config.masking.delta=0.1",
               "--config.evals.knn.every=0"]  # (a low delta: more salient tokens, higher ratios)
  code, out = run(tmp_path / "max", cache, *overrides)
  assert code == 0, out
  code, out = run(tmp_path / "bucketed", cache, *overrides, "--config.masking.capacity=bucketed",
                  "--config.masking.num_buckets=8")
  assert code == 0, out
  used = out.split("encoder capacities compiled: ")[1].split(" of buckets")[0]
  assert len(json.loads(used)) >= 2, out  # smaller buckets were chosen at times
  a = [m["loss"] for m in metrics(tmp_path / "max") if "loss" in m]
  b = [m["loss"] for m in metrics(tmp_path / "bucketed") if "loss" in m]
  np.testing.assert_allclose(b, a, rtol=1e-5)


def test_packed_capacity_trains_like_maximum_capacity_under_fsdp(tmp_path, cache):
  """The recipe's 'packed' encoder (per-image ratios, kept tokens packed per
  device) through the trainer on 2 devices sharded FSDP: the same losses
  and weights as 'max', which pads every image to the largest keep length."""
  overrides = ["--config.epochs=2", "--config.warmup_epochs=1", "--config.random_epochs=1",
               "--config.log_every=1", "--config.checkpoint_every=30",
               "--config.figure_every=1000", "--config.evals.knn.every=0",
               "--config.masking.group=sample", "--config.mesh.fsdp=2"]
  code, out = run(tmp_path / "max", cache, *overrides, devices=2)
  assert code == 0, out
  code, out = run(tmp_path / "packed", cache, *overrides, "--config.masking.capacity=packed",
                  "--config.masking.num_budgets=6", devices=2)
  assert code == 0, out
  assert "encoder: kept tokens packed per device (6 budgets" in out, out
  a = [m["loss"] for m in metrics(tmp_path / "max") if "loss" in m]
  b = [m["loss"] for m in metrics(tmp_path / "packed") if "loss" in m]
  assert len(a) == len(b) == 30
  np.testing.assert_allclose(b, a, rtol=1e-5)
  (sa, wa), (sb, wb) = final_state(tmp_path / "max"), final_state(tmp_path / "packed")
  assert sa == sb == 30
  # (atol: the attention key biases' gradient is rounding noise, which Adam scales up)
  for x, y in zip(jax.tree.leaves(wa), jax.tree.leaves(wb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_save_and_exit(tmp_path, cache, sig):
  proc = launch(tmp_path, cache, *SHORT, "--config.epochs=40")
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 7/"):
      proc.send_signal(sig)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + sig, out
  name = signal.Signals(sig).name
  assert f"{name}: saving step" in out
  saved = int(out.split(f"{name}: saving step ")[1].split()[0])
  assert str(saved) in os.listdir(tmp_path / "checkpoints")
  # the summary comes after the save has committed, and names it
  wrote = [l for l in out.splitlines() if l.startswith("wrote") and "checkpoints/ steps" in l]
  assert wrote and f"{saved}]" in wrote[0], out


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, cache):
  code, out = run(tmp_path, cache, *SHORT, "--config.blr=1e12", "--config.warmup_epochs=0")
  assert code == 3, out
  assert "not finite" in out and "last good checkpoint" in out
  failed = int(out.split(": loss or gradient is not finite")[0].split("step ")[-1])
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert all(s < failed for s in saved), (failed, saved)  # nothing saved past the failure
  for s in saved:  # each checkpoint holds the step it is named after
    assert int(final_state_at(tmp_path, s)["step"]) == s
  logged = [m["step"] for m in metrics(tmp_path) if "loss" in m]
  assert logged == list(range(1, failed)), (failed, logged)  # every step checked, one by one


def final_state_at(workdir, step):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "default"))


def test_eight_devices_with_fsdp_match_one_device(tmp_path, cache):
  overrides = ["--config.epochs=2", "--config.warmup_epochs=1", "--config.random_epochs=1",
               "--config.log_every=1", "--config.checkpoint_every=100",
               "--config.figure_every=1000", "--config.masking.group=global"]
  code, out = run(tmp_path / "one", cache, *overrides)
  assert code == 0, out
  # Elastic: data 4 x fsdp 2 on 8 devices, stopped; resumed on 2 devices, stopped; ended on 1.
  eight = tmp_path / "eight"
  out = stop_at(eight, cache, 8, overrides + ["--config.mesh.fsdp=2"], devices=8)
  assert "{'data': 4, 'fsdp': 2} on 8 cpu devices" in out
  stop_at(eight, cache, 18, overrides + ["--config.mesh.fsdp=2"], devices=2)
  code, out = run(eight, cache, *overrides)
  assert code == 0 and "{'data': 1, 'fsdp': 1} on 1 cpu devices" in out, out
  one = [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m]
  eight_losses = [m["loss"] for m in metrics(eight) if "loss" in m]
  np.testing.assert_allclose(eight_losses, one, rtol=2e-4)
  # The k-NN monitor over 8 devices (features sharded, local top-k merged) equals 1 device.
  knn = lambda w: [(m["step"], m["knn/cls_top1"], m["knn/mean_top1"]) for m in metrics(w)
                   if "knn/cls_top1" in m]
  assert knn(tmp_path / "eight") == knn(tmp_path / "one") and len(knn(tmp_path / "one")) == 2


def stop_at(workdir, cache, step, overrides, devices):
  """Run until a progress line at `step` or later, then SIGTERM (saves, exits 143)."""
  proc = launch(workdir, cache, *overrides, devices=devices)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 143, out
  return out


def test_fsdp_splits_parameters_and_moments():
  from jax.sharding import Mesh
  from sbam_jax.models import model_config, MaskedAutoencoder
  from sbam_jax import sharding
  from flax import nnx
  import optax
  devices = [jax.devices()[0]] * 1
  model = nnx.eval_shape(lambda: MaskedAutoencoder(model_config("base"), rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  opt = jax.eval_shape(optax.adamw(1e-3).init, params)
  total = sum(np.prod(x.shape) for x in jax.tree.leaves((params, opt)))
  for fsdp in (2, 4, 8):
    specs = jax.tree.map(lambda x: sharding.leaf_spec(x.shape, fsdp), (params, opt))
    per_device = sum(np.prod(x.shape) / (fsdp if "fsdp" in tuple(s) else 1)
                     for x, s in zip(jax.tree.leaves((params, opt)), jax.tree.leaves(
                         specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))))
    assert per_device / total < 1 / fsdp * 1.01, (fsdp, per_device / total)
  del devices, Mesh


def demo():
  return demo_config.get_config()


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c, "batch_size", 33), "batch_size 33"),
    (lambda c: setattr(c, "accum_steps", 0), "accum_steps"),
    (lambda c: setattr(c.masking, "mask_ratio", 1.2), "mask_ratio"),
    (lambda c: setattr(c.masking, "ratio_var", 0.4), "inside"),
    (lambda c: setattr(c.masking, "capacity", "auto"), "masking.capacity"),
    (lambda c: setattr(c.masking, "num_buckets", 0), "num_buckets"),
    (lambda c: setattr(c, "warmup_epochs", 50), "warmup_epochs"),  # > epochs (40)
    (lambda c: setattr(c, "random_epochs", 99), "random_epochs"),
    (lambda c: setattr(c.data, "source", "s3"), "data.source"),
    (lambda c: setattr(c.model, "img_size", 60), "multiple of patch_size"),
    (lambda c: setattr(c.mesh, "fsdp", 3), "batch_size|mesh.fsdp"),
    (lambda c: setattr(c, "blr", -1.0), "blr"),
    (lambda c: setattr(c.masking, "group", "node"), "masking.group"),
])
def test_bad_configs_fail_before_compilation(change, match):
  c = demo()
  c.unlock()
  change(c)
  with pytest.raises(C.ConfigError, match=match):
    pretrain.check_config(c, num_devices=2, num_processes=1)


def test_bad_data_path_is_a_clean_error(tmp_path, cache):
  code, out = run(tmp_path, cache, "--config.data.source=folder",
                  f"--config.data.path={tmp_path / 'nowhere'}")
  assert code == 2 and "error:" in out and "nowhere" in out and "Traceback" not in out
  assert os.listdir(tmp_path) == []  # a failed start leaves nothing behind


def test_unknown_config_key_is_named():
  c = demo()
  c.unlock()
  c.lr = 1e-3
  with pytest.raises(C.ConfigError, match=r"unknown config field lr \(did you mean blr\?\); known in the top level"):
    pretrain.check_config(c, num_devices=1, num_processes=1)
  c = demo()
  c.unlock()
  c.masking.mask_ration = 0.6
  with pytest.raises(C.ConfigError, match=r"masking.mask_ration \(did you mean masking.mask_ratio\?\)"):
    pretrain.check_config(c, num_devices=1, num_processes=1)


@pytest.mark.parametrize("args,line", [
    (["--config", "configs/nope.py"],
     "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'"),
    (["--config", "configs/pretrain.py:large,sbamm"],
     "error: --config: ValueError: method must be one of ['mae', 'sbam', 'sbm'], got 'sbamm'"),
    (["--config", "configs/demo.py", "--config.masking.mask_ration=0.6"],
     "error: --config.masking.mask_ration: unknown key 'mask_ration'; Did you mean "
     "\"mask_ratio\" instead of \"mask_ration\"?"),
    (["--config", "configs/demo.py", "--config.blr=abc"],
     "error: flag --config.blr=abc: could not convert string to float: 'abc'"),
    (["--config", "configs/demo.py", "--config.data.path=/my/images"],
     "error: data.path='/my/images' is set but data.source='demo' uses the bundled demo "
     "photos: add --config.data.source=folder to train on that folder, or drop data.path"),
])
def test_command_line_mistakes_are_one_line(tmp_path, args, line):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "train.py", *args, "--workdir", str(tmp_path / "w")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip() == line, out.stderr
  assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()
