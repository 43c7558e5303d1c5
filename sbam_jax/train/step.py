"""The training step: one pure function of (state, batch), for every task.

A task supplies `loss_fn(params, fixed, stats, batch, key, step) -> (loss,
(metrics, stats))`; the step averages the gradient over `accum_steps`
micro-batches with `lax.scan` (carrying mutable statistics such as the linear
probe's BatchNorm), applies the optax update to the float32 parameters, and
reports `grad_norm` and `finite`. A non-finite loss or gradient leaves the
state unchanged, so the loop can stop with the last good state.

`pretrain_loss` is the MAE / SBAM objective; masking is chosen per step
(random masking during the warm-up epochs of a "random first, then SBAM"
schedule, via `lax.cond`, which runs only the branch in force).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sbam_jax import masking, optim
from sbam_jax.data import device as device_ops


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any            # nested dict of the trainable arrays (what the optimizer updates)
  fixed: Any             # nested dict of constants (sin-cos tables, a probe's frozen encoder)
  opt_state: Any
  rng: jax.Array
  stats: Any = struct.field(default_factory=dict)  # updated by the forward pass (BatchNorm)


make_optimizer = optim.adamw  # pre-training's AdamW (the reference decay mask)


STAT_KEYS = ("mask_ratio_mean", "mask_ratio_min", "mask_ratio_max", "frac_above_delta",
             "salience_entropy")


def pretrain_loss(graphdef, *, spec: masking.MaskingSpec, warmup_spec: masking.MaskingSpec,
                  random_steps: int, capacity: int, warmup_capacity: int, image_size: int):
  """MAE loss of a batch {'image': uint8} (or host crops + 'size', resized
  here to `image_size`); steps below `random_steps` use
  `warmup_spec` (random masking), the rest `spec`. Salience diagnostics are
  NaN under random masking."""

  def run(params, fixed, imgs, key, s, c):
    out = nnx.merge(graphdef, params, fixed)(imgs, key, s, capacity=c)
    diag = masking.masking_stats(out.plan, out.salience, s.delta)
    return out.loss, {k: diag.get(k, jnp.float32(jnp.nan)) for k in STAT_KEYS}

  def loss_fn(params, fixed, stats, batch, key, step):
    imgs = device_ops.normalize(device_ops.pixels(batch, image_size), jnp.float32)
    branch = lambda s, c: (lambda _: run(params, fixed, imgs, key, s, c))
    if random_steps <= 0:
      loss, diag = branch(spec, capacity)(None)
    else:
      loss, diag = jax.lax.cond(step < random_steps, branch(warmup_spec, warmup_capacity),
                                branch(spec, capacity), None)
    return loss, (diag, stats)

  return loss_fn


def make_train_step(loss_fn, tx, *, accum_steps: int):
  """(state, batch dict, leading axis accum * B) -> (state, metrics)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    rng, step_key = jax.random.split(state.rng)
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, -1) + x.shape[1:]), batch)
    keys = jax.random.split(step_key, accum_steps)

    def one(carry, xs):
      acc_g, acc_l, acc_m, stats = carry
      b, key = xs
      (loss, (metrics, stats)), grads = grad_fn(state.params, state.fixed, stats, b, key,
                                                state.step)
      acc_g = jax.tree.map(lambda a, g: a + g / accum_steps, acc_g, grads)
      acc_m = jax.tree.map(lambda a, m: a + m / accum_steps, acc_m, metrics)
      return (acc_g, acc_l + loss / accum_steps, acc_m, stats), None

    first = jax.tree.map(lambda x: x[0], micro)
    _, (metric_shapes, _) = jax.eval_shape(loss_fn, state.params, state.fixed, state.stats,
                                           first, keys[0], state.step)
    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
    init = (zeros(state.params), jnp.zeros((), jnp.float32), zeros(metric_shapes), state.stats)
    (grads, loss, metrics, stats), _ = jax.lax.scan(one, init, (micro, keys))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + jnp.where(finite, 1, 0),
                              params=keep(new_params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              stats=keep(stats, state.stats), rng=rng)
    return new_state, {"loss": loss, "grad_norm": gnorm, "finite": finite, **metrics}

  return train_step
