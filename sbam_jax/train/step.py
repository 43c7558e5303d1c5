"""The pre-training step: one pure function of (state, batch).

Masking is chosen per step (random masking during the warm-up epochs of a
"random first, then SBAM" schedule), the gradient is averaged over
`accum_steps` micro-batches with `lax.scan`, AdamW (optax) updates float32
parameters, and masking diagnostics come back with the loss. A non-finite
loss or gradient leaves the state unchanged and is reported (`finite`), so
the loop can stop with the last good state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sbam_jax import masking
from sbam_jax.data import device as device_ops


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any            # nested dict of the model's nnx.Param arrays
  fixed: Any             # nested dict of the rest (fixed sin-cos tables)
  opt_state: Any
  rng: jax.Array


def make_optimizer(lr_fn, *, b1: float, b2: float, weight_decay: float, decay_mask):
  return optax.adamw(lr_fn, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay, mask=decay_mask)


STAT_KEYS = ("mask_ratio_mean", "mask_ratio_min", "mask_ratio_max", "frac_above_delta",
             "salience_entropy")


def _grads(graphdef, params, fixed, imgs, key, spec, capacity):
  """((loss, diagnostics), grads); salience diagnostics are NaN for random masking."""

  def loss_fn(p):
    out = nnx.merge(graphdef, p, fixed)(imgs, key, spec, capacity=capacity)
    stats = masking.masking_stats(out.plan, out.salience, spec.delta)
    return out.loss, {k: stats.get(k, jnp.float32(jnp.nan)) for k in STAT_KEYS}

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def make_train_step(graphdef, tx, *, spec: masking.MaskingSpec, warmup_spec: masking.MaskingSpec,
                    random_steps: int, capacity: int, warmup_capacity: int, accum_steps: int):
  """(state, images uint8 (accum * B, H, W, 3)) -> (state, metrics).

  Steps below `random_steps` use `warmup_spec` (random masking), the rest
  `spec`; `lax.cond` runs only the branch in force.
  """

  def loss_for(params, fixed, imgs, key, step):
    imgs = device_ops.normalize(imgs, jnp.float32)
    run = lambda s, c: (lambda _: _grads(graphdef, params, fixed, imgs, key, s, c))
    if random_steps <= 0:
      return run(spec, capacity)(None)
    return jax.lax.cond(step < random_steps, run(warmup_spec, warmup_capacity),
                        run(spec, capacity), None)

  def train_step(state: TrainState, images: jax.Array):
    rng, step_key = jax.random.split(state.rng)
    micro = images.reshape((accum_steps, -1) + images.shape[1:])
    keys = jax.random.split(step_key, accum_steps)

    def one(carry, xs):
      imgs, key = xs
      (loss, stats), grads = loss_for(state.params, state.fixed, imgs, key, state.step)
      acc_g, acc_l, acc_s = carry
      acc_g = jax.tree.map(lambda a, g: a + g / accum_steps, acc_g, grads)
      acc_s = {k: acc_s[k] + stats[k] / accum_steps for k in acc_s}
      return (acc_g, acc_l + loss / accum_steps, acc_s), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in STAT_KEYS})
    (grads, loss, stats), _ = jax.lax.scan(one, init, (micro, keys))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + jnp.where(finite, 1, 0),
                              params=keep(new_params, state.params),
                              opt_state=keep(opt_state, state.opt_state), rng=rng)
    metrics = {"loss": loss, "grad_norm": gnorm, "finite": finite, **stats}
    return new_state, metrics

  return train_step
