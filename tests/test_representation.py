"""The representation monitor's maths against float64 numpy references:
DINO's weighted k-NN (with its tie rules), big_vision's ridge few-shot, the
seeded few-shot choice, and the sharded path on 1, 2 and 8 devices."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sbam_jax.evals import representation as rep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- references

def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_reference(bank, labels, valid, queries, num_classes, k, temperature):
  """DINO's weighted k-NN in float64, one query at a time, with the stated ties."""
  bank = _unit(np.reshape(bank, (-1, np.shape(bank)[-1])))
  labels, valid = np.ravel(labels), np.ravel(valid).astype(bool)
  queries = _unit(np.reshape(queries, (-1, np.shape(queries)[-1])))
  rows = np.flatnonzero(valid)
  preds = []
  for q in queries:
    sims = bank[rows] @ q
    order = np.lexsort((rows, -sims))[:k]        # similarity desc, then bank index asc
    votes = np.zeros(num_classes)
    for i in order:                               # rank order
      votes[labels[rows[i]]] += np.exp(sims[i] / temperature)
    preds.append(int(np.argmax(votes)))           # first maximum = lower class
  return np.asarray(preds)


def ridge_reference(train_x, train_y, test_x, num_classes, l2_reg):
  """big_vision's few-shot regression on L2-normalised rows, primal form, float64."""
  x, t = _unit(train_x), _unit(test_x)
  mean, std = x.mean(0), x.std(0) + 1e-5
  design = lambda f: np.concatenate([(f - mean) / std, np.full((len(f), 1), 100.0)], axis=1)
  x, t = design(x), design(t)
  y = 2.0 * np.eye(num_classes)[train_y] - 1.0
  w = np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ y)
  return t @ w


def _grid_vectors(rng, n, dim=8):
  """Rows with four entries of +-1 (norm exactly 2): cosine similarities are
  multiples of 1/4, exact in float32, so ties are real ties."""
  out = np.zeros((n, dim), np.float32)
  for row in out:
    row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
  return out


# ---------------------------------------------------------------- k-NN

def test_knn_hand_worked_ties():
  e = np.eye(4, dtype=np.float32)
  bank = np.stack([e[0], e[0], e[1], e[0] + e[1]])      # rows 0 and 1 are duplicates
  labels = np.array([2, 1, 0, 3])
  valid = np.ones(4, bool)
  pred = lambda k, lab=labels, val=valid: int(rep.knn_predict(
      bank, lab, val, e[:1], num_classes=4, k=k, temperature=0.1)[0])
  assert pred(1) == 2                                   # equal similarity: lower bank index
  assert pred(1, val=np.array([False, True, True, True])) == 1   # invalid row 0 never votes
  assert pred(2) == 1                                   # equal votes (2 vs 1): lower class
  assert pred(2, lab=np.array([1, 2, 0, 3])) == 1
  # k = 3 adds row 3 (cos 0.707): classes 1, 2 stay tied above class 3's smaller vote
  assert pred(3) == 1
  # k > bank: row 2 (cos 0) votes too but is outweighed; same answer as k = 4
  assert pred(50) == pred(4) == 1


@pytest.mark.parametrize("k", [1, 7, 20, 300])
def test_knn_matches_reference_with_ties(k):
  rng = np.random.default_rng(k)
  base = _grid_vectors(rng, 12)
  bank = base[rng.integers(0, 12, 96)]          # many exact duplicates
  labels = rng.integers(0, 5, 96)               # ~19 per class: k = 20 exceeds a class
  valid = rng.random(96) > 0.15
  queries = np.concatenate([_grid_vectors(rng, 20), base[:4]])
  got = np.asarray(rep.knn_predict(bank, labels, valid, queries, num_classes=5, k=k,
                                   temperature=0.07, query_chunk=8))
  np.testing.assert_array_equal(got, knn_reference(bank, labels, valid, queries, 5, k, 0.07))
  # the case really exercises ties at the k-th neighbour (unless k covers the bank)
  sims = _unit(queries) @ _unit(bank[valid]).T
  kth = -np.sort(-sims, axis=1)
  if k < valid.sum():
    assert np.sum(kth[:, k - 1] == kth[:, k]) >= 5


def test_knn_equal_votes_pick_lower_class():
  rng = np.random.default_rng(3)
  base = _grid_vectors(rng, 6)
  # each vector appears twice in a row, labelled 3 then 1: for even k the
  # neighbours come in such pairs, votes tie exactly and class 1 must win
  bank = np.repeat(base, 2, axis=0)
  labels = np.tile([3, 1], 6)
  valid = np.ones(12, bool)
  queries = _grid_vectors(rng, 16)
  for k in (2, 4, 12):
    got = np.asarray(rep.knn_predict(bank, labels, valid, queries, num_classes=4, k=k))
    ref = knn_reference(bank, labels, valid, queries, 4, k, 0.07)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, np.ones(16))


def test_knn_generic_features_and_layout():
  rng = np.random.default_rng(7)
  bank = rng.normal(size=(3, 40, 16)).astype(np.float32)   # (num_batches, B, D)
  labels = rng.integers(0, 6, (3, 40))
  valid = np.ones((3, 40), bool)
  valid[-1, 25:] = False                                    # a padded last batch
  queries = rng.normal(size=(2, 30, 16)).astype(np.float32)
  got = np.asarray(rep.knn_predict(bank, labels, valid, queries, num_classes=6, k=20,
                                   temperature=0.07, query_chunk=16))
  assert got.shape == (2, 30)
  ref = knn_reference(bank, labels, valid, queries, 6, 20, 0.07)
  np.testing.assert_array_equal(got.reshape(-1), ref)
  # a tiny temperature would overflow exp(s / T) in float32; the shifted weights do not
  got = np.asarray(rep.knn_predict(bank, labels, valid, queries, num_classes=6, k=20,
                                   temperature=0.005))
  np.testing.assert_array_equal(got.reshape(-1),
                                knn_reference(bank, labels, valid, queries, 6, 20, 0.005))


# ---------------------------------------------------------------- few-shot

@pytest.mark.parametrize("n_train,dim", [(60, 8), (24, 40)])   # primal and dual forms
def test_ridge_matches_closed_form(n_train, dim, assert_close):
  rng = np.random.default_rng(n_train)
  centres = rng.normal(size=(4, dim))
  y = np.arange(n_train) % 4
  x = (centres[y] + 0.8 * rng.normal(size=(n_train, dim))) * rng.uniform(0.5, 3, (n_train, 1))
  ty = rng.integers(0, 4, 50)
  t = centres[ty] + 0.8 * rng.normal(size=(50, dim))
  for l2_reg in (2.0 ** 10, 1.0):
    ref = ridge_reference(x, y, t, 4, l2_reg)
    got = rep.ridge_fewshot_scores(x.astype(np.float32), y, t.astype(np.float32),
                                   num_classes=4, l2_reg=l2_reg)
    assert_close(got, ref, 1e-5, f"ridge scores, l2_reg={l2_reg}")
    preds = np.asarray(rep.ridge_fewshot_predict(x.astype(np.float32), y, t.astype(np.float32),
                                                 num_classes=4, l2_reg=l2_reg))
    np.testing.assert_array_equal(preds, ref.argmax(1))
  assert np.mean(preds == ty) > 0.5                   # the regressor really classifies


def test_ridge_ignores_feature_scale():
  rng = np.random.default_rng(1)
  x, t = rng.normal(size=(30, 12)), rng.normal(size=(20, 12))
  y = np.arange(30) % 3
  a = rep.ridge_fewshot_scores(x, y, t, num_classes=3, l2_reg=4.0)
  b = rep.ridge_fewshot_scores(x * rng.uniform(0.1, 10, (30, 1)), y,
                               t * rng.uniform(0.1, 10, (20, 1)), num_classes=3, l2_reg=4.0)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_fewshot_indices():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (6, 16))
  valid = rng.random((6, 16)) > 0.2
  idx = rep.fewshot_indices(labels, valid, 3, seed=11)
  np.testing.assert_array_equal(idx, rep.fewshot_indices(labels.copy(), valid.copy(), 3, 11))
  flat_l, flat_v = labels.reshape(-1), valid.reshape(-1)
  assert len(np.unique(idx)) == len(idx) == 15 and flat_v[idx].all()
  np.testing.assert_array_equal(flat_l[idx], np.repeat(np.arange(5), 3))
  other = rep.fewshot_indices(labels, valid, 3, seed=12)
  assert not np.array_equal(np.sort(idx), np.sort(other))
  # a class's pick depends only on its own examples: relabelling others keeps it
  relabelled = np.where(labels == 0, 0, (labels % 4) + 1)
  keep = rep.fewshot_indices(relabelled, valid, 3, seed=11)
  np.testing.assert_array_equal(keep[:3], idx[:3])
  with pytest.raises(ValueError, match="class 5 has 0 labelled"):
    rep.fewshot_indices(labels, valid, 3, seed=11, num_classes=6)
  with pytest.raises(ValueError, match="fewer than shots=40"):
    rep.fewshot_indices(labels, valid, 40, seed=11)


# ---------------------------------------------------------------- sharded path

_SHARDED = r"""
import sys
import numpy as np
import jax, jax.numpy as jnp
from sbam_jax.evals import representation as rep
from sbam_jax import sharding

out, data, fsdp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mesh = sharding.make_mesh(data, fsdp)
rng = np.random.default_rng(0)
B, C = 16, 4

def make_set(n_batches, n_valid):
  labels = rng.integers(0, C, n_batches * B).astype(np.int32)
  tint = rng.integers(0, 256, (C, 1, 1, 3))
  img = np.clip(tint[labels] + rng.integers(-70, 70, (len(labels), 8, 8, 3)), 0, 255)
  valid = np.arange(len(labels)) < n_valid
  return [{"image": img[i * B:(i + 1) * B].astype(np.uint8), "label": labels[i * B:(i + 1) * B],
           "valid": valid[i * B:(i + 1) * B]} for i in range(n_batches)]

def feature_fn(w, images):   # integer arithmetic: bitwise the same however it is split
  x = images.reshape(images.shape[0], -1).astype(jnp.float32)
  return {"mean": x @ w[0], "cls": jnp.abs(x @ w[1]) - 2000.0}

w = jnp.asarray(np.random.default_rng(1).integers(-1, 2, (2, 192, 24)), jnp.float32)
bank, bank_y, bank_ok = rep.extract_features(feature_fn, make_set(6, 90), mesh, args=(w,))
qry, qry_y, qry_ok = rep.extract_features(feature_fn, make_set(3, 40), mesh, args=(w,))
assert bank["mean"].shape == (6, B, 24) and len(bank["mean"].sharding.device_set) == data * fsdp
res = {"bank_y": rep.to_host(bank_y), "bank_ok": rep.to_host(bank_ok), "qry_y": rep.to_host(qry_y),
       "qry_ok": rep.to_host(qry_ok)}
shots = rep.fewshot_indices(res["bank_y"], res["bank_ok"], 5, seed=3, num_classes=C)
for name in ("mean", "cls"):
  res[name + "_bank"], res[name + "_qry"] = rep.to_host(bank[name]), rep.to_host(qry[name])
  knn = rep.knn_predict(bank[name], bank_y, bank_ok, qry[name], num_classes=C, k=20,
                        query_chunk=32)
  assert knn.sharding.is_equivalent_to(qry_y.sharding, 2), (knn.sharding, qry_y.sharding)
  res[name + "_knn"] = rep.to_host(knn)
  res[name + "_knn_top1"] = float(rep.accuracy(knn, qry_y, qry_ok))
  train_x = rep.take_examples(bank[name], shots)
  res[name + "_shots"] = rep.to_host(train_x)
  ridge = rep.ridge_fewshot_predict(train_x, res["bank_y"].reshape(-1)[shots], qry[name],
                                    num_classes=C, l2_reg=1.0)
  res[name + "_ridge"] = rep.to_host(ridge)
res["shots"] = shots
# exact ties spread over the shards: duplicated rows with cosines in multiples of 1/4
base = np.zeros((12, 8), np.float32)
for row in base:
  row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
tie = {"bank": base[rng.integers(0, 12, 6 * B)].reshape(6, B, 8),
       "y": rng.integers(0, C, (6, B)), "ok": rng.random((6, B)) > 0.2,
       "q": base[rng.integers(0, 12, 2 * B)].reshape(2, B, 8)}
put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P(None, sharding.BATCH_AXES)))
for k in (7, 20):
  res[f"tie_knn{k}"] = rep.to_host(rep.knn_predict(
      put(tie["bank"]), put(tie["y"]), put(tie["ok"]), put(tie["q"]), num_classes=C, k=k,
      query_chunk=8))
res.update({"tie_" + key: value for key, value in tie.items()})
np.savez(out, **res)
"""


def _launch(path, devices, data, fsdp):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-c", _SHARDED, str(path), str(data), str(fsdp)],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_sharded_path_matches_one_device(tmp_path):
  layouts = {1: (1, 1), 2: (2, 1), 8: (4, 2)}
  procs = {n: _launch(tmp_path / f"{n}.npz", n, *layouts[n]) for n in layouts}
  for n, proc in procs.items():
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{n} devices:\n{log}"
  runs = {n: dict(np.load(tmp_path / f"{n}.npz")) for n in layouts}
  one = runs[1]
  for n in (2, 8):
    for key, value in one.items():
      np.testing.assert_array_equal(runs[n][key], value, err_msg=f"{key} on {n} devices")
  # and the one-device run is the numpy reference on the same features
  bank_y, bank_ok = one["bank_y"].reshape(-1), one["bank_ok"].reshape(-1)
  assert bank_ok.sum() == 90 and one["qry_ok"].sum() == 40
  for name in ("mean", "cls"):
    bank, qry = one[name + "_bank"].reshape(-1, 24), one[name + "_qry"].reshape(-1, 24)
    ref = knn_reference(bank, bank_y, bank_ok, qry, 4, 20, 0.07)
    np.testing.assert_array_equal(one[name + "_knn"].reshape(-1), ref)
    ok = one["qry_ok"].reshape(-1)
    top1 = np.mean(ref[ok] == one["qry_y"].reshape(-1)[ok])
    assert one[name + "_knn_top1"] == pytest.approx(top1)
    np.testing.assert_array_equal(one[name + "_shots"], bank[one["shots"]])
    ridge = ridge_reference(bank[one["shots"]], bank_y[one["shots"]], qry, 4, 1.0).argmax(1)
    np.testing.assert_array_equal(one[name + "_ridge"].reshape(-1), ridge)
  for k in (7, 20):
    ref = knn_reference(one["tie_bank"], one["tie_y"], one["tie_ok"], one["tie_q"], 4, k, 0.07)
    np.testing.assert_array_equal(one[f"tie_knn{k}"].reshape(-1), ref)
  assert one["mean_knn_top1"] > 0.5                 # tinted classes: far above chance (0.25)
