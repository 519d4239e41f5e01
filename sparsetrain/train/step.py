"""The pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

State is a dict {"params", "opt_state", "step"}; a batch is the data pipeline's dict of [B, T] arrays
(inputs, targets, loss_mask, segment_ids, positions). Both are jitted once by the loop with explicit
shardings; nothing here knows about meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sparsetrain.config import TrainerConfig
from sparsetrain.train.model_state import ModelDef


def aux_weights(cfg: TrainerConfig) -> dict[str, float]:
    return {name: float(w) for name, w in (item.rsplit("=", 1) for item in cfg.aux_loss_weights)}


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float) -> jax.Array:
    """Per-token cross-entropy [B, T] in float32, plus z_loss * logsumexp^2 (keeps logits from drifting)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (lse - target_logit) + z_loss * jnp.square(lse)


def _microbatch_loss(params, batch, model: ModelDef, cfg: TrainerConfig):
    """Sum of masked token losses (so microbatches add up exactly) and the metrics to report."""
    logits, aux = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    loss_sum = jnp.sum(token_losses(logits, batch["targets"], cfg.z_loss) * mask)
    count = jnp.sum(mask)
    weights = aux_weights(cfg)
    # Aux losses are per-sequence means; scale by the token count so dividing the total by all tokens
    # at the end gives loss = CE + sum_i w_i * aux_i.
    aux_sum = sum((weights.get(name, 1.0) * value for name, value in aux.items()), jnp.float32(0.0))
    return loss_sum + aux_sum * count, (loss_sum, count, aux)


def accumulate_gradients(params, batch, model: ModelDef, cfg: TrainerConfig):
    """Mean gradient over the batch's masked tokens, computed over `cfg.grad_accum` microbatches.

    A scan over microbatches keeps one microbatch of activations live; summing token losses (not
    means) makes the result exactly the full-batch mean. Returns (grads, loss, token count,
    {aux name: mean over microbatches})."""
    grad_fn = jax.value_and_grad(_microbatch_loss, has_aux=True)
    micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, -1, *x.shape[1:]), batch)

    def add(carry, mb):
        grads, loss_sum, count, aux_sums = carry
        (_, (l, c, aux)), g = grad_fn(params, mb, model, cfg)
        aux_sums = {k: aux_sums[k] + v for k, v in aux.items()}
        return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + c, aux_sums), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_names = jax.eval_shape(lambda: grad_fn(params, first, model, cfg)[0][1][2])
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.float32(0),
             jnp.float32(0), {k: jnp.float32(0) for k in aux_names})
    (grads, loss_sum, count, aux_sums), _ = jax.lax.scan(add, zeros, micro)
    denom = jnp.maximum(count, 1.0)
    aux = {k: v / cfg.grad_accum for k, v in aux_sums.items()}
    return jax.tree.map(lambda g: g / denom, grads), loss_sum / denom, count, aux


def make_train_step(model: ModelDef, optimizer: optax.GradientTransformation, cfg: TrainerConfig,
                    schedule: optax.Schedule):
    def train_step(state, batch):
        params = state["params"]
        grads, loss, count, aux = accumulate_gradients(params, batch, model, cfg)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step leaves parameters and optimizer state untouched (the loop applies the policy).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": count,
                   "learning_rate": schedule(state["step"]), **{f"aux/{k}": v for k, v in aux.items()}}
        return new_state, metrics

    return train_step


def make_eval_step(model: ModelDef):
    def eval_step(params, batch):
        logits, _ = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return {"loss_sum": jnp.sum(token_losses(logits, batch["targets"], 0.0) * mask),
                "tokens": jnp.sum(mask)}
    return eval_step
