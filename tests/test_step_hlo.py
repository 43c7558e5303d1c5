"""The compiled pre-training step never talks to the host (fixed capacity),
checked through benchmarks/bench_pretrain.py so the benchmark stays runnable."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_pretrain  # noqa: E402


def test_step_has_no_host_sync(capsys):
  bench_pretrain.main(["--sizes", "tiny", "--batch", "4", "--steps", "1", "--dtype", "float32",
                       "--methods", "random,sbam", "--inspect"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["method"] for r in rows] == ["random", "sbam"]
  for r in rows:
    hlo = r["hlo"]
    assert hlo["host_callback"] == hlo["outfeed"] == hlo["infeed"] == hlo["send_recv"] == 0
    assert hlo["gather"] >= 2  # the keep gather and the decoder's un-shuffle
    assert r["img_per_s"] > 0 and r["gflops_per_img"] > 0
