"""The FLOP / memory audits (benchmarks/audit_*.py): XLA's count of the real
trainer step against the written-down formula, and the memory table's arithmetic."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import audit_flops as af  # noqa: E402
import audit_memory as am  # noqa: E402

# The formula's elementwise constants were read off ViT-B; on the tiny model
# (width 64, where elementwise work is ~20 % of the step, not ~1.5 %) they
# must still hold to within this.
TINY_TOLERANCE = 0.03


def _counted(method, capacity, keeps, depths):
  task = af.make_task(af.make_config("tiny", method, capacity=capacity, batch=8, depths=depths))
  abstract, shardings = af.abstract_state(task)
  with af.keep_lengths(keeps):
    records = af.capture_step(task, af.light_state(abstract), shardings, af.host_batch(task))
  return task, abstract, records


@pytest.mark.parametrize("method", ["sbam", "random"])
def test_formula_matches_xla_count_tiny_unrolled(method):
  """Analytic FLOPs (formula at the compiled capacity, + optimizer) of the
  trainer's step on the tiny model, layers unrolled, against XLA's count."""
  task, abstract, records = _counted(method, "max", None, (2, 1))
  assert [name for name, _ in records] == ["step"]   # 'max': one program, no host pre-pass
  counted = af.flops_of(records[0][1])
  cfg = task.model_cfg
  assert not cfg.scan_layers and cfg.depth == 2
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  formula = (8 * af.ideal_flops(cfg, [task.capacity], salience=method == "sbam")
             + af.OPT_PER_PARAM * n_params)
  assert abs(formula / counted - 1) < TINY_TOLERANCE, (formula, counted)


def test_bucketed_step_follows_keep_lengths_and_counts_prepass():
  """Set keep lengths reach the compiled step: 'bucketed' runs its pre-pass
  (salience, counted) and compiles the bucket that holds the longest keep;
  smallest vs largest bucket differ by what the formula says."""
  from sbam_jax import masking  # pylint: disable=g-import-not-at-top
  buckets = masking.capacity_buckets(masking.MaskingSpec(), 64, 4)  # tiny: 64 patches
  runs = {}
  for cap in (buckets[0], buckets[-1]):
    task, _, records = _counted("sbam", "bucketed", (cap,) * 8, (2, 1))
    assert task.buckets == buckets and [n for n, _ in records][-1] == "step"
    assert len(records) == 2 and af.flops_of(records[0][1]) > 0   # the pre-pass
    runs[cap] = af.flops_of(records[-1][1])
  cfg = task.model_cfg
  want = 8 * (af.ideal_flops(cfg, [buckets[-1]], salience=True)
              - af.ideal_flops(cfg, [buckets[0]], salience=True))
  got = runs[buckets[-1]] - runs[buckets[0]]
  assert got > 0 and abs(got / want - 1) < TINY_TOLERANCE, (got, want)


def test_largest_batch_from_fitted_line():
  """Hand-worked: 1 GB fixed + 0.1 GB per image; 16 GB x 0.9 headroom ->
  (14.4 - 1) / 0.1 = 134 images -> 128 (multiple of 8)."""
  rows = [dict(per_device_batch=b, peak_bytes=1e9 + b * 1e8) for b in (64, 128, 256)]
  assert am.largest_batch(rows, 16) == 128
  assert am.largest_batch(rows, 0.5) == 0
  rows = [dict(per_device_batch=b, peak_bytes=20e9 + b * 1e8) for b in (64, 128)]
  assert am.largest_batch(rows, 16) == 0
