"""Building blocks of the Llama-style decoder: RMSNorm, grouped-query attention, SwiGLU MLP.

Parameters are float32 masters cast to the compute dtype at use, and carry logical axis names
(`nnx.with_partitioning`) that the trainer maps to mesh axes. Kernels keep heads as their own axis
([D, N, H] for q/k/v, [N, H, D] for o) so export to PyTorch is a reshape and a transpose.

Axis legend: B batch, T sequence, D model width, N query heads, K kv heads, H head dim, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.rope import apply_rope
from sparsetrain.attention import build_attention
from sparsetrain.attention.spec import AttentionSpec
from sparsetrain.config import ModelConfig
from sparsetrain.partitioning import constrain


RESIDUAL = ("batch", None, None)  # logical axes of [B, T, D] activations


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
          init=None) -> nnx.Param:
    init = init or nnx.initializers.normal(cfg.init_std)
    # Logical axis names only: the trainer maps them to mesh axes and places the state itself, so
    # models can also be built with no mesh (tests, export, CPU inference).
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), out_sharding=axes,
                     eager_sharding=False)


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
    def __init__(self, cfg: ModelConfig, spec: AttentionSpec, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg)
        self.attend = build_attention(spec, num_heads=n, num_kv_heads=k, head_dim=h, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        dt = x.dtype
        q_raw = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
        k_raw = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dt))
        q = constrain(apply_rope(q_raw, positions, self.cfg.rope), ("batch", None, "heads", "head_dim"))
        k = constrain(apply_rope(k_raw, positions, self.cfg.rope), ("batch", None, "kv_heads", "head_dim"))
        v = constrain(v, ("batch", None, "kv_heads", "head_dim"))
        out = self.attend(q, k, v, q_raw=q_raw, k_raw=k_raw, segment_ids=segment_ids)  # [B, T, N, H]
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
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", None, "mlp"))
        return jnp.einsum("BTF,FD->BTD", hidden, self.down_proj[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, spec: AttentionSpec, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, spec, rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, segment_ids):
        # The residual stream stays split by batch only: without the pins GSPMD may follow the
        # FSDP-sharded weights and split activations along the model width (measured 2x slower).
        x = constrain(x + self.attn(self.input_norm(x), positions, segment_ids), RESIDUAL)
        return constrain(x + self.mlp(self.post_attn_norm(x)), RESIDUAL)
