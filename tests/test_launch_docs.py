"""The launch recipes (docs/launch.md, scripts/launch/*, the README's
"Launching on many hosts") must name only train.py flags and config keys
that exist, pass the trainer's own config checks on the machines they are
written for, parse as shell and YAML, agree with themselves (pod 0's DNS
name, the process count), and their cost table must follow from the FLOP
audit's numbers. Nothing here trains or starts jax."""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LAUNCH = os.path.join(ROOT, "scripts", "launch")
DOC = os.path.join(ROOT, "docs", "launch.md")

# (devices, processes) each file's run is written for; the TPU worker script
# serves a v4-128 (16 hosts of 4 chips) as is and a v5e-256 with accum 1.
MACHINES = {
    "tpu_worker.sh": [((64, 16), []), ((256, 32), ["--config.accum_steps=1"]),
                      ((256, 64), ["--config.accum_steps=1"])],
    "slurm_gpu.sbatch": [((64, 64), []), ((64, 8), [])],
    "k8s_jobset.yaml": [((64, 8), [])],
    "k8s_indexed_job.yaml": [((64, 8), [])],
}
# Vendor spec-sheet peaks (dense bf16, per chip) the cost table must use.
PEAK = {"TPU v4-128": 275e12, "TPU v5e-256": 197e12, "8 x 8 H100 SXM": 989e12}


def read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def readme_section() -> str:
  text = read(os.path.join(ROOT, "README.md"))
  start = text.index("## Launching on many hosts")
  return text[start:text.index("\n## ", start + 1)]


def launch_files():
  return sorted(os.path.join(LAUNCH, n) for n in os.listdir(LAUNCH))


def texts():
  out = {"docs/launch.md": read(DOC), "README.md": readme_section()}
  out.update({os.path.basename(p): read(p) for p in launch_files()})
  return out


def train_flags() -> set:
  """Flag names train.py defines, read from its source."""
  names = set()
  for node in ast.walk(ast.parse(read(os.path.join(ROOT, "train.py")))):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("DEFINE_") and node.args
        and isinstance(node.args[0], ast.Constant)):
      names.add(node.args[0].value)
  return names


def train_commands(text: str) -> list:
  """Each train.py command line in `text`, continuation lines joined."""
  joined = re.sub(r"\\\n", " ", text)
  return [m.group(0) for m in re.finditer(r"train\.py[^\n]*", joined)]


def invocations(text: str) -> list:
  """The train.py commands that set config keys (the runs a file starts)."""
  return [c for c in train_commands(text) if "--config." in c]


def overrides(command: str) -> list:
  return re.findall(r"--config\.([\w.]+)=(\"[^\"]*\"|'[^']*'|\S+)", command)


def base_config():
  from configs import pretrain as recipe  # pylint: disable=g-import-not-at-top
  return recipe.get_config("large,sbam")


def lookup(cfg, key: str):
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def apply(cfg, key: str, raw: str):
  """An override as absl's config flags apply it: a Python literal, else a string."""
  raw = raw.strip("\"'")
  if "$" in raw or "<" in raw or not raw.strip("."):
    raw = "gs://bucket/placeholder"
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = key.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  node[leaf] = value


def test_every_train_flag_named_exists():
  known = train_flags()
  assert {"config", "workdir", "coordinator_address", "num_processes", "process_id",
          "dry_run", "distributed_timeout"} <= known
  for name, text in texts().items():
    for command in train_commands(text):
      for flag in re.findall(r"(?<![\w-])--([a-z][\w]*)(?=[=\s]|$)", command):
        assert flag in known, f"{name}: train.py has no flag --{flag}: {command}"
    # Prose names a train.py flag as a quoted `--snake_case`; other tools'
    # flags are hyphenated or quoted inside their own command.
    for flag in re.findall(r"`--([a-z]+_[a-z_]+)\b", text):
      assert flag in known, f"{name}: train.py has no flag --{flag}"


def test_every_config_key_named_exists_and_takes_its_value():
  cfg = base_config()
  seen = 0
  for name, text in texts().items():
    for key, raw in re.findall(r"--config\.([\w.]+)=(\"[^\"]*\"|'[^']*'|[^\s`]+)", text):
      if key == "key":  # the placeholder of a usage line
        continue
      lookup(cfg, key)  # KeyError names a key the recipe does not have
      trial = copy.deepcopy(cfg)
      apply(trial, key, raw)  # a value of the wrong type raises here
      seen += 1
  assert seen > 20
  table = read(DOC).split("## Config keys that change with scale")[1].split("\n## ")[0]
  keys = re.findall(r"^\| `([\w.]+)`(?:, `([\w.]+)`)?", table, flags=re.M)
  assert len(keys) >= 7
  for pair in keys:
    for key in filter(None, pair):
      lookup(cfg, key)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_recipe_configs_pass_the_trainers_checks(name):
  from sbam_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  commands = invocations(read(os.path.join(LAUNCH, name)))
  assert commands, name
  for (devices, processes), extra in MACHINES[name]:
    for command in commands:
      cfg = base_config()
      for key, raw in overrides(command) + overrides(" ".join(extra)):
        apply(cfg, key, raw)
      pretrain.check_config(cfg, num_devices=devices, num_processes=processes)
      assert cfg.epochs == 800 and cfg.batch_size == 4096
      assert cfg.batch_size // (cfg.accum_steps * devices) in (16, 32, 64)


@pytest.mark.parametrize("name", ["tpu_vm_pod.sh", "tpu_worker.sh", "slurm_gpu.sbatch"])
def test_shell_scripts_parse(name):
  proc = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr


def pod_specs(path):
  """(job spec, pod count, name pod 0 resolves as, container) of each Job in a file."""
  out = []
  for doc in yaml.safe_load_all(read(path)):
    if doc["kind"] == "JobSet":
      assert doc["spec"]["network"]["enableDNSHostnames"] is True
      for rjob in doc["spec"]["replicatedJobs"]:
        spec = rjob["template"]["spec"]
        host = f"{doc['metadata']['name']}-{rjob['name']}-0-0.{doc['metadata']['name']}"
        out.append((spec, spec["parallelism"] * rjob["replicas"], host))
    elif doc["kind"] == "Job":
      spec = doc["spec"]
      services = [d for d in yaml.safe_load_all(read(path)) if d["kind"] == "Service"]
      sub = spec["template"]["spec"]["subdomain"]
      assert [s["spec"]["clusterIP"] for s in services if s["metadata"]["name"] == sub] == ["None"]
      assert {"job-name": doc["metadata"]["name"]} == services[0]["spec"]["selector"]
      out.append((spec, spec["parallelism"], f"{doc['metadata']['name']}-0.{sub}"))
  return out


@pytest.mark.parametrize("name", ["k8s_jobset.yaml", "k8s_indexed_job.yaml"])
def test_kubernetes_files_agree_with_their_commands(name):
  specs = pod_specs(os.path.join(LAUNCH, name))
  assert specs
  for spec, pods, host in specs:
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 300
    script = pod["containers"][0]["command"][-1]
    assert re.search(r"^\s*exec python train\.py", script, flags=re.M), script
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    command = train_commands(script)[0]
    assert f"--coordinator_address={host}:" in command, (host, command)
    assert f"--num_processes={pods} " in command
    assert '--process_id="$JOB_COMPLETION_INDEX"' in command


def test_dockerfile_installs_the_pinned_jax():
  pinned = re.search(r"^jax==(\S+)", read(os.path.join(ROOT, "requirements.txt")), re.M)[1]
  assert f'"jax[cuda12]=={pinned}"' in read(os.path.join(LAUNCH, "Dockerfile.gpu"))


def audit_gflop(model: str, method: str, phase: str) -> float:
  """Counted GFLOP per image of a row of the FLOP audit table."""
  text = read(os.path.join(ROOT, "benchmarks", "RESULTS.md"))
  row = re.search(rf"^\| {model} \| {method} \| device \| max \| {phase} \| [\d.]+ \| ([\d.]+) \|",
                  text, flags=re.M)
  return float(row[1])


def test_cost_table_follows_from_the_flop_audit():
  doc = read(DOC)
  images = 1_281_167 // 4096 * 4096
  rand, sbam = audit_gflop("large", "random", "fixed"), audit_gflop("large", "sbam", "start")
  assert f"**{rand:.2f} GFLOP**" in doc and f"**{sbam:.2f} GFLOP**" in doc
  total = images * (100 * rand + 700 * sbam) * 1e9
  stated = float(re.search(r"\*\*([\d.]+) x 10\^20 FLOP\*\*", doc)[1]) * 1e20
  assert stated == pytest.approx(total, rel=5e-4)
  rows = re.findall(r"^\| ((?:TPU|8 x 8)[^|]*?) \| (\d+) \| ([\d.]+) \| (\d+) % \| ([\d.]+) \| "
                    r"([\d,]+) \| (\d+) \| ([\d,]+) \| ([\d.]+) \| \$([\d,]+) \|$", doc, flags=re.M)
  assert len(rows) == 6
  for machine, chips, peak, mfu, hours, chip_hours, step_ms, img_s, price, cost in rows:
    chips, mfu, price = int(chips), int(mfu) / 100, float(price)
    assert float(peak) * 1e15 == pytest.approx(chips * PEAK[machine], rel=5e-3)
    seconds = total / (chips * PEAK[machine] * mfu)
    assert float(hours) == pytest.approx(seconds / 3600, abs=0.006)
    assert int(chip_hours.replace(",", "")) == pytest.approx(seconds / 3600 * chips, abs=1)
    assert int(step_ms) == pytest.approx(seconds / (312 * 800) * 1e3, abs=1)
    assert int(img_s.replace(",", "")) == pytest.approx(images * 800 / seconds, rel=2e-3)
    assert int(cost.replace(",", "")) == pytest.approx(seconds / 3600 * chips * price, rel=0.01)
