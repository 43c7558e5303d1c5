"""The training step: one pure function of (state, batch), for every task.

A task supplies `loss_fn(params, fixed, stats, batch, key, step) -> (loss,
(metrics, stats))`; the step averages the gradient over `accum_steps`
micro-batches with `lax.scan` (carrying mutable statistics such as the linear
probe's BatchNorm), applies the optax update to the float32 parameters, and
reports `grad_norm` and `finite`.

A non-finite loss or gradient leaves the state unchanged and marks it halted
by storing the failed step as a negative `step` (-n: step n was not
finite); a halted state is never updated again. So the loop needs to look
only when it logs or saves (no read per step), and then knows which step
failed, while the parameters are still those of step n - 1. The losses
live with their tasks (`pretrain.py`, `classify.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any            # nested dict of the trainable arrays (what the optimizer updates)
  fixed: Any             # nested dict of constants (sin-cos tables, a probe's frozen encoder)
  opt_state: Any
  rng: jax.Array
  stats: Any = struct.field(default_factory=dict)  # updated by the forward pass (BatchNorm)


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
    ok = finite & (state.step >= 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    halted = jnp.where(state.step < 0, state.step, -(state.step + 1))
    new_state = state.replace(step=jnp.where(ok, state.step + 1, halted),
                              params=keep(new_params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              stats=keep(stats, state.stats), rng=rng)
    return new_state, {"loss": loss, "grad_norm": gnorm, "finite": finite, **metrics}

  return train_step
