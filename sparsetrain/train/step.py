"""The pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

State is a dict {"params", "opt_state", "step"}; a batch is the data pipeline's dict of [B, T] arrays
(inputs, targets, loss_mask, positions, and segment_ids unless data.cross_document_attention: without
them attention crosses documents). Both are jitted once by the loop with explicit shardings; nothing
here knows about meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sparsetrain.attention.context_parallel import to_load_balanced
from sparsetrain.attention.method import StepContext
from sparsetrain.checkpoint.model_def import ModelDef, Params, flatten, path_str
from sparsetrain.config import TrainerConfig
from sparsetrain.train.cross_entropy import head_loss


def sequence_losses(params, batch, model: ModelDef, ctx: StepContext, z_loss: float, loss_chunk: int):
    """(sum of the masked token losses, layer losses, metrics) of `batch` under `params`. The output
    head runs `loss_chunk` tokens at a time (0: whole, materialising [B, T, V] logits), its gradient
    computed with the loss (`head_loss`). Under a context-split mesh the model runs on the
    load-balanced order; the sum does not care."""
    batch = jax.tree.map(to_load_balanced, batch)
    hidden, losses, metrics = model.hidden_states(params, batch["inputs"], batch["positions"],
                                                  batch.get("segment_ids"), ctx)
    logits_fn, head = model.head(params)
    loss_sum = head_loss(logits_fn, hidden, head, batch["targets"], batch["loss_mask"], z_loss, loss_chunk)
    return loss_sum, losses, metrics


def split_trainable(params: Params, trainable: frozenset[str]) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts of `params` by path."""
    flat = flatten(params)
    return ({k: v for k, v in flat.items() if k in trainable},
            {k: v for k, v in flat.items() if k not in trainable})


def _microbatch_loss(trainable, frozen, batch, model: ModelDef, cfg: TrainerConfig, ctx: StepContext):
    """Sum of masked token losses plus the layers' (already weighted) losses, scaled so that
    microbatches add up exactly; and the values to report."""
    params = model.params_from_flat({**trainable, **frozen})
    loss_sum, losses, metrics = sequence_losses(params, batch, model, ctx, cfg.z_loss, cfg.loss_chunk)
    count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    # Layer losses are per-sequence means; scaling by the token count makes the final division by
    # all tokens give loss = CE + sum of the layer losses.
    aux_sum = sum(losses.values(), jnp.float32(0.0))
    return loss_sum + aux_sum * count, (loss_sum, count, {**losses, **metrics})


def accumulate_gradients(params, batch, model: ModelDef, cfg: TrainerConfig, ctx: StepContext,
                         trainable: frozenset[str]):
    """Mean gradient over the batch's masked tokens, computed over `cfg.grad_accum` microbatches.

    Only the `trainable` parameters are differentiated, so frozen parts of the model (a distilled
    gate's base model) cost no backward pass; their gradients are zeros. A scan over microbatches
    keeps one microbatch of activations live; summing token losses (not means) makes the result
    exactly the full-batch mean. Returns (grads, loss, token count, {reported name: mean over
    microbatches})."""
    grad_fn = jax.value_and_grad(_microbatch_loss, has_aux=True)
    train_p, frozen_p = split_trainable(params, trainable)
    micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, -1, *x.shape[1:]), batch)

    def add(carry, mb):
        grads, loss_sum, count, reported = carry
        (_, (l, c, values)), g = grad_fn(train_p, frozen_p, mb, model, cfg, ctx)
        reported = {k: reported[k] + v for k, v in values.items()}
        return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + c, reported), None

    first = jax.tree.map(lambda x: x[0], micro)
    names = jax.eval_shape(lambda: grad_fn(train_p, frozen_p, first, model, cfg, ctx)[0][1][2])
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_p), jnp.float32(0),
             jnp.float32(0), {k: jnp.float32(0) for k in names})
    (grads, loss_sum, count, sums), _ = jax.lax.scan(add, zeros, micro)
    denom = jnp.maximum(count, 1.0)
    grads = {k: g / denom for k, g in grads.items()}
    grads.update({k: jnp.zeros(p.shape, jnp.float32) for k, p in frozen_p.items()})
    return (model.params_from_flat(grads), loss_sum / denom, count,
            {k: v / cfg.grad_accum for k, v in sums.items()})


def make_train_step(model: ModelDef, optimizer: optax.GradientTransformation, cfg: TrainerConfig,
                    schedule: optax.Schedule, trainable: frozenset[str], phase: int = 0):
    def train_step(state, batch):
        params = state["params"]
        ctx = StepContext(step=state["step"], train=True, phase=phase,
                          rng=jax.random.fold_in(jax.random.key(cfg.seed), state["step"]))
        grads, loss, count, reported = accumulate_gradients(params, batch, model, cfg, ctx, trainable)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        # Parameters frozen in this phase only still have optimizer state (another phase trains
        # them); no update reaches them here, weight decay included.
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: u if path_str(path) in trainable else jnp.zeros_like(u), updates)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step leaves parameters and optimizer state untouched (the loop applies the policy).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": count,
                   "learning_rate": schedule(state["step"]), **reported}
        return new_state, metrics

    return train_step


def make_eval_step(model: ModelDef, cfg: TrainerConfig, phase: int = 0):
    def eval_step(params, batch):
        # Validation reports the plain cross-entropy: no z-loss.
        loss_sum, _, metrics = sequence_losses(params, batch, model, StepContext(train=False, phase=phase),
                                               0.0, cfg.loss_chunk)
        return {"loss_sum": loss_sum, "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)), **metrics}
    return eval_step
