"""Test setup: CPU only, quiet TensorFlow, shared helpers for the parity tests."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64 (0 when both are zero)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  denom = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))


@pytest.fixture
def assert_close():
  def check(a, b, tol, what=""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
  return check
