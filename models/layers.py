"""Building blocks of the Llama-style decoder: RMSNorm, grouped-query attention, SwiGLU MLP.

Parameters are float32 masters cast to the compute dtype at use, and carry logical axis names
(`nnx.with_partitioning`) that the trainer maps to mesh axes. Kernels keep heads as their own axis
([D, N, H] for q/k/v, [N, H, D] for o) so export to PyTorch is a reshape and a transpose.

Axis legend: B batch, T sequence, D model width, N query heads, K kv heads, H head dim, F MLP width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.rope import apply_rope
from sparsetrain.attention.context_parallel import context_size, to_load_balanced, to_natural
from sparsetrain.attention.dense import DenseAttention
from sparsetrain.attention.method import AttentionInputs, StepContext
from sparsetrain.attention.sharded import causal_attention
from sparsetrain.attention.spec import MethodOptions
from sparsetrain.config import ModelConfig
from sparsetrain.partitioning import constrain


RESIDUAL = ("batch", "sequence", None)  # logical axes of [B, T, D] activations


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
          init=None) -> nnx.Param:
    init = init or nnx.initializers.normal(cfg.init_std)
    # Logical axis names only: the trainer maps them to mesh axes and places the state itself, so
    # models can also be built with no mesh (tests, export, CPU inference).
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), out_sharding=axes,
                     eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def logits_matmul(h: jax.Array, head: jax.Array, dtype) -> jax.Array:
    """float32 logits [..., V] = h [..., D] @ head [D, V], computed in `dtype` (the model's compute
    dtype) with float32 accumulation; `head` is the float32 master weight.

    Differentiated by hand so the backward pass also runs in `dtype`: JAX's own transpose of a
    float32-output matmul multiplies the float32 logit gradient in float32: 20.9 ms per step against
    8.1 ms in bf16 for the 125M model at T=4096, batch 16, on an H100 (docs/benchmarks.md). The
    logit gradient is rounded to `dtype` once, as mixed-precision autocast does; the head's
    gradient still accumulates in float32.
    """
    return jnp.einsum("...D,DV->...V", h.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)


def _logits_matmul_fwd(h, head, dtype):
    return logits_matmul(h, head, dtype), (h, head)


def _logits_matmul_bwd(dtype, residuals, g):
    h, head = residuals
    g = g.astype(dtype)
    dh = jnp.einsum("...V,DV->...D", g, head.astype(dtype), preferred_element_type=jnp.float32)
    dhead = jnp.einsum("...D,...V->DV", h.astype(dtype), g, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dhead.astype(head.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.eps = cfg.rms_eps
        self.scale = param(rngs, (dim,), ("norm",), cfg, nnx.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 statistics, weight multiplies (not 1 + weight): the Hugging Face Llama convention.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, spec: MethodOptions, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg)
        # The attention method of this layer (its rule's `build`); its parameters live under attend/.
        self.attend = spec.build(num_heads=n, num_kv_heads=k, head_dim=h, model_dim=d, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 ctx: StepContext) -> jax.Array:
        dt = x.dtype
        q_nope = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
        k_nope = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dt))
        rope = functools.partial(apply_rope, cfg=self.cfg.rope)
        q = constrain(rope(q_nope, positions), ("batch", "sequence", "heads", "head_dim"))
        k = constrain(rope(k_nope, positions), ("batch", "sequence", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "sequence", "kv_heads", "head_dim"))
        inputs = AttentionInputs(q=q, k=k, v=v, q_nope=q_nope, k_nope=k_nope, x=x, positions=positions,
                                 segment_ids=segment_ids, ctx=ctx, rope=rope)
        if context_size() == 1:
            out = self.attend(inputs)                                       # [B, T, N, H]
        elif isinstance(self.attend, DenseAttention):
            # Tokens are in the load-balanced order of a context split: causal by true order.
            out = causal_attention(q, k, v, segment_ids=segment_ids)
        else:
            # A method selects over the whole sequence: it sees natural order (T still split; only
            # its kernels go back to the layout, attention/context_parallel.py).
            out = to_load_balanced(self.attend(inputs.reordered(to_natural)))
        return jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...].astype(dt))



class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj[...].astype(dt))
        up = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(dt))
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "sequence", "mlp"))
        return jnp.einsum("BTF,FD->BTD", hidden, self.down_proj[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, spec: MethodOptions, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, spec, rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, segment_ids, ctx: StepContext):
        # The residual stream stays split by batch only: without the pins GSPMD may follow the
        # FSDP-sharded weights and split activations along the model width (measured 2x slower).
        x = constrain(x + self.attn(self.input_norm(x), positions, segment_ids, ctx), RESIDUAL)
        return constrain(x + self.mlp(self.post_attn_norm(x)), RESIDUAL)
