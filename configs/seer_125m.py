"""SeerAttention gates for the 125M model at T=16384: distill them from a dense checkpoint, then run
sparse. The paper's recipe (method notes §1.3): base frozen, only the gates train on the KL to the
block-pooled attention map, AdamW lr 1e-3, cosine, warmup 20, no weight decay.

    python train.py --config configs/seer_125m.py --init_from runs/dense_16k          # distill
    python train.py --config configs/seer_125m.py --init_from runs/seer_125m \\
        name=seer_125m_sparse model.attention.0.mode=sparse trainer.steps=1             # use sparse

Evaluation reports the recall of the selection (10% of each row's causal blocks) and its measured
density; `model.attention.0.select=topk|threshold|topp` choose other rules.
"""

import dataclasses

from configs.small_125m import get_config as small_125m
from sparsetrain.config import CheckpointConfig, OptimizerConfig, TrainerConfig
from sparsetrain.sparse.seer import SeerOptions

SEQ = 16384


def get_config():
    base = small_125m()
    return dataclasses.replace(
        base, name="seer_125m",
        model=dataclasses.replace(base.model, max_seq_len=SEQ, attention=(
            SeerOptions(mode="distill", select="density", target_density=0.1),)),
        data=dataclasses.replace(base.data, seq_len=SEQ, batch_size=4),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0),
        trainer=TrainerConfig(steps=300, eval_every=100, eval_batches=4, log_every=10),
        checkpoint=CheckpointConfig(every=100, keep=2))
