"""Optimizers and per-parameter rules of the reference recipes.

Pre-training (MAE main_pretrain, timm `add_weight_decay`): AdamW; every
trainable tensor that is 1-D or named `*.bias` gets no weight decay; all
others are decayed, cls_token and mask_token included, as the reference does.

Fine-tuning (MAE `param_groups_lrd`): AdamW with layer-wise lr decay; no
weight decay on 1-D tensors and on `pos_embed` / `cls_token`; parameter
`name` gets lr scale `ld ** (n - layer_id(name))`, n = depth + 1, layer_id 0
for patch_embed / cls_token / pos_embed, k + 1 for `blocks.k.*`, n for the
rest (fc_norm, head). Scaling the whole AdamW update (weight decay included)
by the scale is what the reference's per-group `lr * lr_scale` does.

Linear probing (MAE util/lars.py): LARS on the head; weight decay and the
trust ratio only for tensors of 2+ dims; momentum accumulates the raw
(trust-scaled) update and the lr multiplies the momentum, so the optax chain
is decay -> trust ratio -> trace -> lr (not optax.lars, which scales by the
lr before the momentum and so differs while the lr changes).

Rules are stated on the reference's torch names (`torch_key_for`), so they
read exactly like the reference code.

By name (`config.optimizer`): each task states its decay mask and lr scales;
`build` turns a name into an optax transformation with them: the registered
`adamw` and `lars` above, or any optax optimizer (`"lamb"`, `"sgd(momentum=0.9)"`,
keyword arguments also from `config.optimizer_args`), whose weight decay, if
it has one, gets the task's mask. Resume needs nothing per optimizer: the
whole optimizer state is checkpointed as a tree.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sbam_jax import registry
from sbam_jax.convert.torch_keys import torch_key_for
from sbam_jax.errors import ConfigError

FINETUNE_NO_DECAY = ("pos_embed", "cls_token", "dist_token")


def _per_tensor(params: dict, rule: Callable[[str, int], object]) -> dict:
  """Same tree as `params`, `rule(torch key, torch ndim)` per tensor; stacked
  blocks give one value per layer (key formatted with its index)."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    key, _, stacked = torch_key_for(path)
    if stacked:
      out[path] = [rule(key.format(i=i), len(leaf.shape) - 1) for i in range(leaf.shape[0])]
    else:
      out[path] = rule(key, len(leaf.shape))
  return traverse_util.unflatten_dict(out)


def _all_same(values) -> bool:
  return all(v == values[0] for v in values)


def _collapse(tree: dict) -> dict:
  """A per-layer list of equal booleans -> one boolean (optax masks are per leaf)."""
  def one(v):
    if isinstance(v, list):
      if not _all_same(v):
        raise ValueError("a stacked tensor needs one mask value for all its layers")
      return v[0]
    return v
  return jax.tree.map(one, tree, is_leaf=lambda v: isinstance(v, list))


def reference_decay_mask(params: dict) -> dict:
  """Pre-training: True where weight decay applies."""
  return _collapse(_per_tensor(params, lambda k, nd: not (nd == 1 or k.endswith(".bias"))))


def finetune_decay_mask(params: dict) -> dict:
  """Fine-tuning: True where weight decay applies."""
  return _collapse(_per_tensor(params, lambda k, nd: not (nd == 1 or k in FINETUNE_NO_DECAY)))


def vit_layer_id(key: str, num_layers: int) -> int:
  """MAE's get_layer_id_for_vit on a reference parameter name."""
  if key in ("cls_token", "pos_embed") or key.startswith("patch_embed"):
    return 0
  if key.startswith("blocks."):
    return int(key.split(".")[1]) + 1
  return num_layers


def layer_decay_scales(params: dict, depth: int, layer_decay: float) -> dict:
  """Same tree as `params`: lr scale per tensor; stacked blocks get a
  (depth, 1, ...) array so the scale broadcasts over each layer's slice."""
  n = depth + 1
  scales = _per_tensor(params, lambda k, nd: float(layer_decay ** (n - vit_layer_id(k, n))))
  flat = traverse_util.flatten_dict(params)

  def as_array(path, v):
    if isinstance(v, list):
      return np.asarray(v, np.float32).reshape((-1,) + (1,) * (len(flat[path].shape) - 1))
    return np.float32(v)
  return traverse_util.unflatten_dict(
      {p: as_array(p, v) for p, v in traverse_util.flatten_dict(scales).items()})


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiply each update by a fixed per-leaf (broadcastable) factor."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def matrices(params) -> dict:
  """True for tensors of 2+ dims: where MAE's LARS decays and applies the trust ratio."""
  return jax.tree.map(lambda p: len(p.shape) > 1, params)


def lars(lr_fn, *, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """MAE's LARS (see the module docstring for the order of operations)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=matrices),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(lr_fn))


def parameter_rules(params: dict, decay_mask: dict, scales: dict | None = None) -> dict:
  """{reference tensor name: (shape, weight decay?, lr scale)}, stacked blocks per layer."""
  flat_m = traverse_util.flatten_dict(decay_mask)
  flat_s = traverse_util.flatten_dict(scales) if scales is not None else {}
  rules = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    key, _, stacked = torch_key_for(path)
    scale = np.asarray(flat_s.get(path, 1.0), np.float64).reshape(-1)
    for i in (range(leaf.shape[0]) if stacked else [None]):
      shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
      s = scale[i if stacked and scale.size > 1 else 0]
      rules[key.format(i=i)] = (shape, bool(flat_m[path]), float(s))
  return rules


def param_table(rules: dict) -> list[str]:
  """One line per reference tensor of `parameter_rules`: name, shape, weight
  decay on/off, lr scale."""
  return [f"{key:40s} {str(shape):18s} wd={'yes' if decay else 'no ':3s} lr_scale={s:.6g}"
          for key, (shape, decay, s) in rules.items()]


def takes_weight_decay(spec: str) -> bool:
  """Whether the optimizer `spec` names applies the recipe's weight decay."""
  name, _ = parse_name(spec)
  fn = registry.lookup("optimizer", name) if name in registry.names("optimizer") else \
      getattr(optax, name)
  return "weight_decay" in inspect.signature(fn).parameters


def check_update(tx, params, spec: str) -> None:
  """Trace one update on abstract parameters: a wrong argument value fails
  here, as a ConfigError, not inside the first compiled step."""
  try:
    jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), params)
  except (TypeError, ValueError, AttributeError) as e:
    raise ConfigError(f"optimizer {spec!r} cannot update the parameters: {e}") from None


def has_adam_state(state) -> bool:
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  return any(is_adam(s) for s in jax.tree.leaves(state, is_leaf=is_adam))


def adamw_state(optimizer, params, mu, nu, count: int):
  """An optax AdamW state for `params` holding the given moments and step count.

  Works for any chain whose state contains one `ScaleByAdamState`.
  """
  state = optimizer.init(params)

  def replace(s):
    if isinstance(s, optax.ScaleByAdamState):
      return optax.ScaleByAdamState(count=jnp.asarray(count, s.count.dtype), mu=mu, nu=nu)
    return s

  return jax.tree.map(replace, state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


# ---- optimizers by name ---------------------------------------------------------

@registry.register("optimizer", "adamw")
def adamw_named(lr_fn, *, decay_mask, scales=None, b1: float = 0.9, b2: float = 0.999,
                weight_decay: float = 0.0, eps: float = 1e-8) -> optax.GradientTransformation:
  """The recipes' AdamW (torch semantics), with the task's per-tensor lr scales.

  The betas are given as their float32 values: optax rounds `b` and `1 - b`
  to float32 apart and corrects the bias with the rounded `b`; with b2 =
  0.999 that made every update 6.5e-6 smaller than PyTorch's, always the
  same way (a drift the fine-tune parity run showed over 100 steps)."""
  b1, b2 = float(np.float32(b1)), float(np.float32(b2))
  tx = optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  return tx if scales is None else optax.chain(tx, scale_by_tree(scales))


@registry.register("optimizer", "lars")
def lars_named(lr_fn, *, decay_mask=None, scales=None, weight_decay: float = 0.0,
               momentum: float = 0.9, trust_coefficient: float = 0.001):
  """MAE's LARS; its decay and trust ratio apply to matrices (its own rule)."""
  del decay_mask
  tx = lars(lr_fn, weight_decay=weight_decay, momentum=momentum,
            trust_coefficient=trust_coefficient)
  return tx if scales is None else optax.chain(tx, scale_by_tree(scales))


def parse_name(spec: str) -> tuple[str, dict]:
  """'sgd(momentum=0.9, nesterov=True)' -> ('sgd', {...}); literal values only."""
  try:
    node = ast.parse(spec.strip(), mode="eval").body
    if isinstance(node, ast.Name):
      return node.id, {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
      return node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except (SyntaxError, ValueError):
    pass
  raise ConfigError(f"optimizer={spec!r}: write a name, or name(key=value, ...) with literal "
                    f"values, e.g. 'adamw' or 'sgd(momentum=0.9)'")


def build(spec: str, lr_fn, *, decay_mask, scales=None, defaults: dict | None = None,
          args: dict | None = None) -> optax.GradientTransformation:
  """The optimizer `spec` names (see the module docstring). `defaults`: the
  recipe's keyword arguments (b1, b2, weight_decay), used where the optimizer
  takes them; `args` (config.optimizer_args and the spec's own) override."""
  name, own = parse_name(spec)
  kwargs = {**(args or {}), **own}
  reserved = sorted(set(kwargs) & {"learning_rate", "lr_fn", "decay_mask", "scales", "mask"})
  if reserved:
    raise ConfigError(f"optimizer {name!r}: {', '.join(reserved)} come from the recipe "
                      f"(the lr schedule, the weight-decay mask, layer-wise scales), not from "
                      f"its arguments")
  custom = name in registry.names("optimizer")
  fn = registry.lookup("optimizer", name) if custom else getattr(optax, name, None)
  if name.startswith("_") or not callable(fn):
    known = registry.names("optimizer") + [n for n in dir(optax) if n.islower()
                                           and not n.startswith("_")]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"optimizer={name!r} is not a known optimizer{hint}; known: "
                      f"{', '.join(registry.names('optimizer'))} or any optax optimizer "
                      f"(sgd, lamb, adafactor, ...)")
  accepted = inspect.signature(fn).parameters
  if not custom and next(iter(accepted), None) != "learning_rate":
    raise ConfigError(f"optax.{name} is not an optimizer (its first argument is not "
                      f"learning_rate); name one such as adamw, sgd, lamb, adafactor")
  kwargs = {**{k: v for k, v in (defaults or {}).items() if k in accepted}, **kwargs}
  if custom:
    kwargs.update(decay_mask=decay_mask, scales=scales)
  elif "mask" in accepted and "weight_decay" in accepted:
    kwargs["mask"] = decay_mask
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
    internal = ("learning_rate", "lr_fn", "decay_mask", "scales", "mask")
    raise ConfigError(f"optimizer {name!r} takes no argument {', '.join(unknown)}; it takes "
                      f"{', '.join(k for k in accepted if k not in internal)}")
  try:
    tx = fn(lr_fn, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"optimizer {spec!r}: {e}") from None
  return tx if custom or scales is None else optax.chain(tx, scale_by_tree(scales))
