"""Deep-model training: TrainState, pure steps, the optimizer, a sharded `fit` driver.

Pure core: `train_step` (background splitting, `BGSplitModel`), `pretrain_step` (supervised
`M_pre`, `Classifier`), `eval_step` and `predict` take their dependencies as keyword-only
arguments and never jit themselves. Drivers bind them with `functools.partial` and jit once
(`jit_step`, `jit_predict`), with the state born sharded (`init_sharded_state`).

Batches (fixed shapes, global arrays under jit):
  train_step:    image [B,H,W,C] float, labels [B,C] float, label_mask [B,C] bool,
                 aux_labels [B] int, mask [B] bool (false = padding),
                 optional label_weights [B,C] float (per-label BCE weights)
  pretrain_step: image, label [B] int, mask [B]
  predict:       image, (mask)

BatchNorm and padding: under `jax.jit` the batch statistics are over the global batch (no
`axis_name`; XLA inserts the cross-device reductions). Padded rows (`mask` false) are excluded
from the statistics (Flax `BatchNorm(mask=...)`), and from the loss, so a padded batch trains
exactly like the same batch without its padding rows (up to float rounding). `fit` also pads
only the last batch of an epoch (see `step_batch_indices`).

bf16: build the model with `dtype=jnp.bfloat16`; parameters, optimizer state, BatchNorm
statistics and losses stay float32.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from rare_jax.deep import losses
from rare_jax.infra import sharding
from rare_jax.models import init_from_pretrained

TRAIN_BATCH_KEYS = ("image", "labels", "label_mask", "aux_labels", "mask")
PRETRAIN_BATCH_KEYS = ("image", "label", "mask")


@flax.struct.dataclass
class TrainState:
  """Arrays only: the step count, parameters, BatchNorm statistics and optimizer state."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    """`{"params", "batch_stats"}` for `model.apply`."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
  rng: jax.Array,
  *,
  model: Any,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, ...],
) -> TrainState:
  """Initial TrainState (pure: jit it with `out_shardings` to create it sharded).

  Args:
    rng: PRNG key.
    model: a Flax module called as `model(x, train=..., mask=...)`.
    tx: the optimizer.
    input_shape: one batch's image shape, e.g. (1, 28, 28, 1).
  """
  if len(input_shape) != 4:
    raise ValueError(f"input_shape must be [B, H, W, C], got {input_shape}")
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
  )


def learning_rate_schedule(
  *,
  learning_rate: float = 0.01,
  warmup_steps: int = 0,
  total_steps: int,
  end_learning_rate: float = 0.0,
) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine to the end."""
  if total_steps < 1 or not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f"need total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
      f"warmup_steps={warmup_steps}, total_steps={total_steps}"
    )
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if warmup_steps == 0:  # optax warns about a zero-length warmup
    return optax.cosine_decay_schedule(
      learning_rate, decay_steps=total_steps, alpha=end_learning_rate / learning_rate
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=end_learning_rate,
  )


def make_optimizer(
  *,
  learning_rate: float = 0.01,
  momentum: float = 0.9,
  weight_decay: float = 1e-4,
  warmup_steps: int = 0,
  total_steps: int,
  decoupled_weight_decay: bool = False,
  nesterov: bool = False,
  weight_decay_mask: Any = None,
  frozen: Any = None,
) -> optax.GradientTransformation:
  """SGD with momentum, weight decay and a warmup + cosine schedule (the authors' trainer).

  Args:
    learning_rate: peak learning rate.
    momentum: heavy-ball momentum (0 disables it).
    weight_decay: decay coefficient.
    warmup_steps: linear warmup length.
    total_steps: schedule length (cosine reaches 0 there).
    decoupled_weight_decay: False adds `weight_decay * param` to the gradient before momentum
      (L2, PyTorch `SGD(weight_decay=...)`); True adds it after momentum, scaled by the
      learning rate only (SGDW, Loshchilov & Hutter).
    nesterov: Nesterov momentum.
    weight_decay_mask: optax mask (tree or callable) of the parameters to decay; None decays
      all (as PyTorch does by default).
    frozen: optax mask (tree or callable) of parameters to leave unchanged (no update, no
      decay), e.g. `frozen_mask(model)`; None trains all.
  """
  if momentum < 0 or weight_decay < 0:
    raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}")
  schedule = learning_rate_schedule(
    learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps
  )
  decay = optax.add_decayed_weights(weight_decay, mask=weight_decay_mask)
  trace = optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity()
  parts = [decay, trace] if not decoupled_weight_decay else [trace, decay]
  tx = optax.chain(*parts, optax.scale_by_learning_rate(schedule))
  if frozen is None:
    return tx

  def labels(params):
    mask = frozen(params) if callable(frozen) else frozen
    return jax.tree.map(lambda f: "frozen" if f else "train", mask)

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def frozen_mask(model: Any) -> Callable | None:
  """For a model whose trunk freezes some submodules (`trunk.frozen_modules()`), a callable
  params -> bool tree marking their parameters; None when nothing is frozen."""
  trunk = getattr(model, "trunk", None)
  names = trunk.frozen_modules() if hasattr(trunk, "frozen_modules") else frozenset()
  if not names:
    return None

  def mask(params):
    def frozen(path, _):
      keys = [getattr(k, "key", None) for k in path]
      return len(keys) > 1 and keys[0] == "trunk" and keys[1] in names

    return jax.tree_util.tree_map_with_path(frozen, params)

  return mask


def _check_batch(batch: Mapping[str, Any], keys: tuple[str, ...]) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}; expected keys {list(keys)}, got {list(batch)}")


def _gradient_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  model: Any,
  tx: optax.GradientTransformation,
  loss_from_outputs: Callable,
) -> tuple[TrainState, dict[str, jax.Array]]:
  def loss_fn(params):
    outputs, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"],
      train=True,
      mask=batch["mask"],
      mutable=["batch_stats"],
    )
    loss, metrics = loss_from_outputs(outputs)
    return loss, (metrics, updates["batch_stats"])

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads))
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  return new_state, metrics


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  model: Any,
  tx: optax.GradientTransformation,
  aux_weight: float = 0.1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One background-splitting step of a `BGSplitModel` (pure).

  Returns:
    (new state, metrics: see `losses.bgsplit_loss`, plus `grad_norm`).
  """
  _check_batch(batch, TRAIN_BATCH_KEYS)

  def loss_from_outputs(outputs):
    return losses.bgsplit_loss(
      outputs["main_logits"],
      batch["labels"],
      batch["label_mask"],
      outputs["aux_logits"],
      batch["aux_labels"],
      batch["mask"],
      aux_weight=aux_weight,
      label_weights=batch.get("label_weights"),  # optional: weighted pseudo-labels
    )

  return _gradient_step(state, batch, model=model, tx=tx, loss_from_outputs=loss_from_outputs)


def pretrain_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  model: Any,
  tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One supervised step of `M_pre` (a `Classifier`): softmax CE over real examples (pure).

  Returns:
    (new state, metrics `loss`, `accuracy`, `num_examples`, `grad_norm`).
  """
  _check_batch(batch, PRETRAIN_BATCH_KEYS)

  def loss_from_outputs(outputs):
    return losses.classification_loss(outputs["logits"], batch["label"], batch["mask"])

  return _gradient_step(state, batch, model=model, tx=tx, loss_from_outputs=loss_from_outputs)


def predict(state: TrainState, batch: Mapping[str, jax.Array], *, model: Any) -> dict:
  """Inference outputs (pure), BatchNorm in inference mode.

  Returns:
    dict with `embedding` [B,D] float32, and by model kind:
    `BGSplitModel`: `main_probs` [B,C] (sigmoid of the main head) and `aux_labels` [B] int32;
    `Classifier`: `probs` [B,K] (softmax) and `labels` [B] int32 (the hard auxiliary labels).
  """
  outputs = model.apply(state.variables, batch["image"], train=False)
  result = {"embedding": outputs["embedding"].astype(jnp.float32)}
  if "main_logits" in outputs:
    result["main_probs"] = jax.nn.sigmoid(outputs["main_logits"])
    result["aux_labels"] = jnp.argmax(outputs["aux_logits"], axis=-1).astype(jnp.int32)
  if "logits" in outputs:
    result["probs"] = jax.nn.softmax(outputs["logits"], axis=-1)
    result["labels"] = jnp.argmax(outputs["logits"], axis=-1).astype(jnp.int32)
  return result


def eval_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  model: Any,
  aux_weight: float = 0.1,
) -> dict[str, jax.Array]:
  """Background-splitting loss and metrics on a labeled batch, without updating (pure)."""
  _check_batch(batch, TRAIN_BATCH_KEYS)
  outputs = model.apply(state.variables, batch["image"], train=False)
  _, metrics = losses.bgsplit_loss(
    outputs["main_logits"],
    batch["labels"],
    batch["label_mask"],
    outputs["aux_logits"],
    batch["aux_labels"],
    batch["mask"],
    aux_weight=aux_weight,
  )
  return metrics


def transfer_from_pretrained(
  state: TrainState, pretrained: TrainState, *, tx: optax.GradientTransformation
) -> TrainState:
  """A `BGSplitModel` state whose trunk and auxiliary head come from `M_pre`'s state (pure).

  The main head keeps its initialisation; the optimizer state is re-initialised for the new
  parameters and the step count restarts at 0. See `models.init_from_pretrained`.
  """
  variables = init_from_pretrained(state.variables, pretrained.variables)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=tx.init(variables["params"]),
  )


# ---------------------------------------------------------------------------------------------
# Drivers: sharded state, jitted steps, fit, checkpoints.


def init_sharded_state(
  rng: jax.Array,
  *,
  model: Any,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, ...],
  mesh: Mesh,
  param_axis: str | None = None,
  min_shard_size: int = 2**18,
) -> tuple[TrainState, Any]:
  """Creates the TrainState born sharded (`jax.jit(init, out_shardings=...)`).

  Returns:
    (state, its tree of `NamedSharding`s) — pass the latter to `jit_step`/`jit_predict`.
  """
  init = functools.partial(create_train_state, model=model, tx=tx, input_shape=input_shape)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(
    abstract, mesh, param_axis=param_axis, min_shard_size=min_shard_size
  )
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def jit_step(
  step_fn: Callable, *, mesh: Mesh, state_shardings: Any, donate: bool = True, **kwargs
) -> Callable:
  """`jax.jit(partial(step_fn, **kwargs))` with the state's shardings in and out, the batch
  split over the data axes, metrics replicated and the input state donated."""
  return jax.jit(
    functools.partial(step_fn, **kwargs),
    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )


def jit_predict(*, model: Any, mesh: Mesh, state_shardings: Any) -> Callable:
  """Jitted `predict(state, batch)` with outputs split over the data axes like the batch."""
  data = sharding.batch_sharding(mesh)
  return jax.jit(
    functools.partial(predict, model=model),
    in_shardings=(state_shardings, data),
    out_shardings=data,
  )


def abstract_like(state: Any) -> Any:
  """`ShapeDtypeStruct`s (with shardings) of a state: the target to restore into."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
  )


def save_train_state(store: Any, state: TrainState, *, metadata: dict | None = None) -> int:
  """Saves `state` into a `rare_jax.infra.checkpoint.CheckpointStore` as step `state.step`."""
  step = int(jax.device_get(state.step))
  store.save(step, state, metadata)
  return step


def restore_train_state(
  store: Any, like: TrainState, *, step: int | None = None
) -> tuple[TrainState, dict]:
  """Restores a TrainState (the latest step by default) with `like`'s shapes and shardings.

  Raises:
    ValueError: if the store is empty or lacks `step`.
  """
  step = store.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no TrainState checkpoint in {store.directory}")
  return store.restore(step, abstract_like(like))


def step_batch_indices(
  num_examples: int, batch_size: int, step: int, *, seed: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Which examples form batch `step` of a seeded epoch-wise pass over `num_examples`.

  Epoch `e = step // ceil(num_examples / batch_size)` visits a permutation seeded by
  `(seed, e)`; only its last batch is padded (indices 0, mask false). A pure function of
  `step`, so resumed training sees exactly the batches an uninterrupted run sees.

  Returns:
    (indices int64 [batch_size], mask bool [batch_size]).
  """
  if num_examples < 1 or batch_size < 1 or step < 0:
    raise ValueError(
      f"need num_examples >= 1, batch_size >= 1, step >= 0; got {num_examples}, "
      f"{batch_size}, {step}"
    )
  steps_per_epoch = -(-num_examples // batch_size)
  epoch, within = divmod(step, steps_per_epoch)
  order = (
    np.random.default_rng([seed, epoch]).permutation(num_examples)
    if shuffle
    else np.arange(num_examples)
  )
  chosen = order[within * batch_size : (within + 1) * batch_size]
  indices = np.zeros(batch_size, np.int64)
  mask = np.zeros(batch_size, bool)
  indices[: len(chosen)] = chosen
  mask[: len(chosen)] = True
  return indices, mask


def fit(
  state: TrainState,
  get_batch: Callable[[int], Mapping[str, np.ndarray]],
  *,
  step_fn: Callable,
  mesh: Mesh,
  end_step: int,
  store: Any = None,
  save_every: int | None = None,
  log_every: int | None = 50,
  on_metrics: Callable[[int, dict], None] | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
  """Runs `step_fn` from `state.step` up to `end_step`, resuming from `store` if it is ahead.

  Args:
    state: the starting state (donated: do not use it afterwards).
    get_batch: step -> this process's rows of that step's batch (host arrays); must depend on
      the step only (e.g. via `step_batch_indices`) for exact resumption.
    step_fn: from `jit_step(train_step or pretrain_step, ...)`.
    mesh: the mesh the batch is placed on.
    end_step: the absolute step to stop at.
    store: a `rare_jax.infra.checkpoint.CheckpointStore`; its latest step, if beyond `state.step`,
      is restored first.
    save_every: save every this many steps and at `end_step` (requires `store`).
    log_every: log metrics every this many steps (None: never).
    on_metrics: called as `on_metrics(step, metrics)` with host floats after every step
      (this synchronises every step).

  Returns:
    (final state, per-step metrics of the steps run here as floats).
  """
  if save_every is not None and (store is None or save_every < 1):
    raise ValueError(f"save_every={save_every} needs a store and must be >= 1")
  if store is not None:
    latest = store.latest_step()
    if latest is not None and latest > int(jax.device_get(state.step)):
      state, _ = restore_train_state(store, state, step=latest)
      logging.info("fit: resumed from step %d in %s", latest, store.directory)
  start = int(jax.device_get(state.step))
  if end_step < start:
    raise ValueError(f"end_step {end_step} is before the state's step {start}")
  pending, history = [], []
  t0, last_logged = time.time(), start
  for step in range(start, end_step):
    batch = sharding.global_batch_from_local(get_batch(step), mesh)
    state, metrics = step_fn(state, batch)
    pending.append(metrics)
    done = step + 1
    if on_metrics is not None or (log_every and done % log_every == 0) or done == end_step:
      fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
      history.extend(fetched)
      pending = []
      if on_metrics is not None:
        on_metrics(done, fetched[-1])
      if log_every and (done % log_every == 0 or done == end_step):
        rate = (done - last_logged) / max(time.time() - t0, 1e-9)
        logging.info(
          "step %d/%d  %s  (%.2f steps/s)",
          done,
          end_step,
          " ".join(f"{k}={v:.4g}" for k, v in sorted(fetched[-1].items())),
          rate,
        )
        t0, last_logged = time.time(), done
    if store is not None and save_every and (done % save_every == 0 or done == end_step):
      if done not in store.all_steps():
        save_train_state(store, state)
  return state, history
