"""What the configs of the two workflows share (docs/workflows.md), so that the runs of a workflow
differ only in how their layers attend. (Modules named _x are listed as no config.)

**Pretraining from scratch** (`pretrain_*.py`, `pretrain(name, attention)`): one 36.5M-parameter
byte-level Llama (12 layers, d_model 512, 8 query / 2 KV heads of 64: GQA groups of 4, a power of
two as the token-level kernel needs; SwiGLU 1536; vocabulary 320, the byte tokenizer's 258 padded),
T=8192, batch 8 (65,536 tokens per step), 600 steps: 39.3M tokens, the same data order and seed for
every method. A new method is one file (as `configs/pretrain_nsa.py`):

    from configs._workflows import pretrain
    from sparsetrain.attention.spec import method_options

    def get_config():
        return pretrain("pretrain_nsa", (method_options("nsa", ...),))

**Short to long** (`pretrain_short_dense.py`, then `long_*.py`, `long_context(name, attention)`): the
same model trained dense at 2048 tokens, then RoPE extended 8x by YaRN to 16384 and trained on
through a length curriculum, 2048 -> 8192 -> 16384 tokens per sequence at 65,536 tokens per step
(100, 200 and 300 steps: 39.3M tokens), from `checkpoint.init_from` (the short run by default).

Size on one H100, an estimate, not measured: model FLOPs (`flops_per_token`, dense attention) are
0.29 / 0.52 / 0.82 GFLOP per token at 2048 / 8192 / 16384. The 125M config ran at 335 TFLOP/s of
model FLOPs (33.9% MFU, docs/benchmarks.md); at half that for this narrower model, dense
pretraining takes about 2 minutes, the short run 1.2 and the curriculum 2.5, plus compiling and
validation. Sparse layers do less attention work but pay for their selection (InfLLM-V2 only broke
even with dense at 16k, and per-token selection has not been timed on a GPU), hence the headroom
under 10 minutes per run. The data is the interpreter's standard library (about 11.4M training
tokens), so a run sees it about 3.5 times; `data.source=files data.path=...` gives more text.

`tiny=True`: the same workflows at CPU size, on the default tiny model (3.1M parameters, T=256 for
pretraining; 128 -> 512 for the long context).
"""

from __future__ import annotations

import dataclasses

from configs.tiny import get_config as tiny_config
from sparsetrain.attention.spec import MethodOptions
from sparsetrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig, PhaseConfig,
                                RetrievalDataConfig,
                                RopeConfig, RunConfig, TrainerConfig)

MODEL = ModelConfig(vocab_size=320, d_model=512, num_layers=12, num_heads=8, num_kv_heads=2, head_dim=64,
                    mlp_dim=1536, max_seq_len=8192)
# Packed files attend across each other (GPT-style): the standard library's files are mostly shorter
# than these windows, so per-document masking would leave sparse layers little context to select
# from. Evaluation's held-out windows are joined files too.
# Half the windows are synthetic retrieval documents (passkey, NIAH, MQAR, variable tracking, copy;
# docs/eval.md): without them no model here retrieved at all (passkey 0%, dense included), and with
# a fifth of the windows for 600 steps it still did not (docs/results.md).
RETRIEVAL = RetrievalDataConfig(weight=0.5)
DATA = DataConfig(seq_len=8192, batch_size=8, cross_document_attention=True, retrieval=RETRIEVAL)

PRETRAIN = RunConfig(
    name="pretrain", model=MODEL, data=DATA,
    optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=60),
    trainer=TrainerConfig(steps=600, eval_every=150, eval_batches=4, log_every=10),
    checkpoint=CheckpointConfig(every=150, keep=2))

SHORT, LONG = 2048, 16384
SHORT_DENSE = dataclasses.replace(
    PRETRAIN, name="pretrain_short_dense", model=dataclasses.replace(MODEL, max_seq_len=SHORT),
    data=dataclasses.replace(DATA, seq_len=SHORT, batch_size=32))

# Continued training: a lower peak learning rate than from scratch, a short warmup.
LONG_RUN = RunConfig(
    name="long",
    model=dataclasses.replace(MODEL, max_seq_len=LONG, rope=RopeConfig(
        scaling="yarn", factor=LONG / SHORT, original_max_len=SHORT)),
    data=dataclasses.replace(DATA, seq_len=SHORT, batch_size=32),
    optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=30),
    trainer=TrainerConfig(steps=600, eval_every=100, eval_batches=4, log_every=10, phases=(
        PhaseConfig(start_step=100, overrides=("data.seq_len=8192", "data.batch_size=8")),
        PhaseConfig(start_step=300, overrides=(f"data.seq_len={LONG}", "data.batch_size=4")))),
    checkpoint=CheckpointConfig(every=100, keep=2, init_from="runs/pretrain_short_dense"))


def _tiny_pretrain() -> RunConfig:
    base = tiny_config()
    return dataclasses.replace(base, data=dataclasses.replace(base.data, cross_document_attention=True,
                                                              retrieval=RETRIEVAL))


TINY_SHORT, TINY_LONG = 128, 512


def _tiny_short_dense() -> RunConfig:
    base = _tiny_pretrain()
    return dataclasses.replace(base, name="pretrain_tiny_short_dense",
                               model=dataclasses.replace(base.model, max_seq_len=TINY_SHORT),
                               data=dataclasses.replace(base.data, seq_len=TINY_SHORT))


def _tiny_long() -> RunConfig:
    """LONG_RUN at CPU size: 128 -> 256 -> 512 tokens at 2048 per step, 100 steps each."""
    base = _tiny_pretrain()
    return dataclasses.replace(
        base, name="long_tiny",
        model=dataclasses.replace(base.model, max_seq_len=TINY_LONG, rope=RopeConfig(
            scaling="yarn", factor=TINY_LONG / TINY_SHORT, original_max_len=TINY_SHORT)),
        data=dataclasses.replace(base.data, seq_len=TINY_SHORT, batch_size=16),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10),
        trainer=dataclasses.replace(base.trainer, phases=(
            PhaseConfig(start_step=100, overrides=("data.seq_len=256", "data.batch_size=8")),
            PhaseConfig(start_step=200, overrides=(f"data.seq_len={TINY_LONG}", "data.batch_size=4")))),
        checkpoint=dataclasses.replace(base.checkpoint, init_from="runs/pretrain_tiny_short_dense"))


def _with_attention(cfg: RunConfig, name: str, attention: tuple[MethodOptions, ...]) -> RunConfig:
    return dataclasses.replace(cfg, name=name, model=dataclasses.replace(cfg.model, attention=attention))


def pretrain(name: str, attention: tuple[MethodOptions, ...], *, tiny: bool = False) -> RunConfig:
    """The pretraining run with these per-layer attention rules."""
    return _with_attention(_tiny_pretrain() if tiny else PRETRAIN, name, attention)


def short_dense(*, tiny: bool = False) -> RunConfig:
    """The dense run at the short length that the long-context runs start from."""
    return _tiny_short_dense() if tiny else SHORT_DENSE


def long_context(name: str, attention: tuple[MethodOptions, ...], *, tiny: bool = False) -> RunConfig:
    """The short dense run continued with YaRN through the length curriculum, attending by these rules."""
    return _with_attention(_tiny_long() if tiny else LONG_RUN, name, attention)


def distill_then_sparse(name: str, seer: MethodOptions, *, tiny: bool = False) -> RunConfig:
    """SeerAttention on the dense adapted run (long_dense): gates distilled at the long length (base
    frozen, the paper's recipe), then the model trained sparse (gates frozen) from the switch on."""
    base = long_context(name, (seer,), tiny=tiny)
    length, steps, switch, source = (TINY_LONG, 200, 100, "runs/long_tiny_dense") if tiny else (
        LONG, 400, 250, "runs/long_dense")
    return dataclasses.replace(
        base, data=dataclasses.replace(base.data, seq_len=length, batch_size=4),
        # SeerAttention's gate training: AdamW lr 1e-3, warmup 20, no weight decay.
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0),
        trainer=dataclasses.replace(base.trainer, steps=steps, phases=(
            PhaseConfig(start_step=switch, overrides=("model.attention.0.mode=sparse",)),)),
        checkpoint=dataclasses.replace(base.checkpoint, init_from=source))
