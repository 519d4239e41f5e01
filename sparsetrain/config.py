"""The run configuration: a tree of frozen, validated dataclasses.

`configs/NAME.py` files build one with `get_config()`; `train.py ... key.sub=value` overrides any leaf
(see `sparsetrain.configbase.apply_overrides`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from sparsetrain.attention.spec import DenseOptions, MethodOptions, parse_layers, spec_for_layer
from sparsetrain.configbase import Config, ConfigError, apply_overrides

DTypeName = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class RopeConfig(Config):
    theta: float = 10000.0       # RoPE base
    # Context extension (Hugging Face `rope_type` semantics, see models/rope.py and docs/long_context.md):
    # "linear" position interpolation, "ntk" NTK-aware base scaling, "yarn", "llama3".
    scaling: Literal["none", "linear", "ntk", "yarn", "llama3"] = "none"
    factor: float = 1.0          # context extension factor s (every scaling but "none")
    original_max_len: int = 0    # pretraining length before extension (yarn, llama3)
    beta_fast: float = 32.0      # yarn: rotations per original context above which pairs extrapolate
    beta_slow: float = 1.0       # yarn: rotations below which pairs interpolate (ramp in between)
    attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0 = 0.1 * ln(factor) + 1
    low_freq_factor: float = 1.0   # llama3: wavelengths above original_max_len / this interpolate
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept

    def validate(self) -> None:
        self.require(self.theta > 0, "theta", "must be > 0")
        self.require(self.factor >= 1.0, "factor", "must be >= 1")
        if self.scaling == "none":
            self.require(self.factor == 1.0, "factor",
                         "has no effect with scaling='none'; choose scaling 'linear', 'ntk', 'yarn' or 'llama3'")
        if self.scaling in ("yarn", "llama3"):
            self.require(self.original_max_len > 0, "original_max_len",
                         f"must be > 0 (the pretraining length) for scaling={self.scaling!r}")
        if self.scaling == "yarn":
            self.require(self.beta_slow > 0, "beta_slow", "must be > 0")
            self.require(self.beta_fast > self.beta_slow, "beta_fast", f"must be > beta_slow={self.beta_slow}")
            self.require(self.attention_factor >= 0, "attention_factor", "must be >= 0 (0: 0.1 * ln(factor) + 1)")
        if self.scaling == "llama3":
            self.require(self.low_freq_factor > 0, "low_freq_factor", "must be > 0")
            self.require(self.high_freq_factor > self.low_freq_factor, "high_freq_factor",
                         f"must be > low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    vocab_size: int = 320        # byte tokenizer needs 258; padded to a multiple of 64
    d_model: int = 256           # model width
    num_layers: int = 4          # decoder layers
    num_heads: int = 4           # query heads
    num_kv_heads: int = 2        # key/value heads (GQA); divides num_heads
    head_dim: int = 64           # channels per head (even: rotary pairs)
    mlp_dim: int = 704           # SwiGLU hidden width
    max_seq_len: int = 256       # longest sequence the model is built for
    rms_eps: float = 1e-5        # RMSNorm epsilon
    tie_embeddings: bool = False  # the output head reuses the embedding
    init_std: float = 0.02       # std of the normal weight init
    rope: RopeConfig = RopeConfig()
    dtype: DTypeName = "bfloat16"        # activations / matmul inputs
    param_dtype: DTypeName = "float32"   # master weights
    # Rematerialisation per layer: "none" keeps all activations, "full" recomputes the layer,
    # "dots" saves only matmul outputs without batch dims (attention/MLP projections).
    remat: Literal["none", "full", "dots"] = "none"
    scan_layers: bool = False    # one scanned layer stack (faster compiles; one attention rule)
    # Per-layer attention rules, last match wins (see --help's attention notes).
    attention: tuple[MethodOptions, ...] = (DenseOptions(),)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim", "max_seq_len"):
            self.require(getattr(self, name) > 0, name, "must be > 0")
        self.require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                     f"must divide num_heads={self.num_heads}")
        self.require(self.head_dim % 2 == 0, "head_dim", "must be even (rotary pairs)")
        self.require(len(self.attention) > 0, "attention", "needs at least one rule (DenseOptions())")
        covered = set()
        for spec in self.attention:
            covered |= parse_layers(spec.layers, self.num_layers)
        self.require(covered == set(range(self.num_layers)), "attention",
                     f"rules cover layers {sorted(covered)}, need all of 0..{self.num_layers - 1}")
        if self.scan_layers:
            distinct = {dataclasses.replace(spec, layers="all") for spec in self.layer_specs}
            self.require(len(distinct) == 1, "scan_layers", "needs the same attention spec on every layer")

    @property
    def layer_specs(self) -> tuple[MethodOptions, ...]:
        """The attention rule that applies to each layer, in layer order."""
        return tuple(spec_for_layer(self.attention, i, self.num_layers) for i in range(self.num_layers))


RetrievalTask = Literal["passkey", "niah_single", "niah_multikey", "niah_multivalue", "mqar", "vartrack", "copy"]
RETRIEVAL_TASKS: tuple[str, ...] = RetrievalTask.__args__


@dataclasses.dataclass(frozen=True)
class RetrievalDataConfig(Config):
    # Synthetic retrieval documents mixed into the training windows (sparsetrain/data/
    # retrieval_windows.py): a `weight` share of the windows, the rest text. Validation stays text.
    weight: float = 0.0          # share of training windows made of retrieval documents; 0 = off
    tasks: tuple[RetrievalTask, ...] = RETRIEVAL_TASKS   # drawn uniformly per document
    min_doc_len: int = 128       # shortest document in tokens; lengths spread log-uniformly up to seq_len
    # Share of retrieval windows holding one document as long as the window: log-uniform lengths
    # alone make retrieval across the whole trained length rare (a dense model then failed the
    # needles furthest back, docs/results.md).
    whole_window: float = 0.5
    # Share of needle documents whose haystack is training text rather than filler sentences.
    text_haystack: float = 0.5

    def validate(self) -> None:
        self.require(0.0 <= self.weight < 1.0, "weight", "must be in [0, 1) (0 = no retrieval documents)")
        self.require(bool(self.tasks), "tasks", f"give one or more of {', '.join(RETRIEVAL_TASKS)}")
        self.require(self.min_doc_len >= 32, "min_doc_len", "must be >= 32 tokens")
        self.require(0.0 <= self.text_haystack <= 1.0, "text_haystack", "must be in [0, 1]")
        self.require(0.0 <= self.whole_window <= 1.0, "whole_window", "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    # "stdlib": the running interpreter's standard library source (embedded default, no download);
    # "files": text/JSONL files under `path` (a directory or a glob);
    # "tokens": pre-tokenized `.npy` or ArrayRecord files under `path`.
    source: Literal["stdlib", "files", "tokens"] = "stdlib"
    path: str = ""               # directory or glob of the files (source=files|tokens)
    tokenizer: str = "byte"      # "byte" or a path to a Hugging Face tokenizers JSON file
    jsonl_field: str = "text"    # field holding the text in .jsonl files
    seq_len: int = 256           # tokens per training sequence (documents are packed)
    batch_size: int = 16         # global batch, in sequences
    val_fraction: float = 0.02   # fraction of documents held out for validation
    max_documents: int = 0       # 0 = all
    seed: int = 0                # shuffling and split seed
    shuffle: bool = True         # shuffle documents each epoch
    # True: packed documents also attend to the earlier documents of their window (GPT-style);
    # False: each token attends within its own document and positions restart per document.
    cross_document_attention: bool = False
    # A source file that is not text (NUL bytes, or too many undecodable bytes): "skip" it with a
    # warning naming it, or stop with an "error".
    on_bad_file: Literal["skip", "error"] = "skip"
    retrieval: RetrievalDataConfig = RetrievalDataConfig()

    def validate(self) -> None:
        self.require(self.seq_len > 0, "seq_len", "must be > 0")
        self.require(self.batch_size > 0, "batch_size", "must be > 0")
        self.require(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        self.require(self.max_documents >= 0, "max_documents", "must be >= 0")
        self.require(self.source == "stdlib" or bool(self.path), "path",
                     f"is required when source={self.source!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Config):
    learning_rate: float = 3e-3  # peak learning rate
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"   # after linear warmup
    warmup_steps: int = 50       # linear warmup: step n of it gets n / (warmup_steps + 1) of the peak
    decay_fraction: float = 0.2   # wsd: fraction of steps spent decaying at the end
    min_lr_ratio: float = 0.1    # final learning rate / peak
    b1: float = 0.9              # Adam beta1
    b2: float = 0.95             # Adam beta2
    eps: float = 1e-8            # Adam epsilon
    weight_decay: float = 0.1    # AdamW decoupled weight decay
    clip_norm: float = 1.0        # 0 disables global-norm clipping
    # Regexes over parameter paths like "layers/3/attn/q_proj/kernel".
    no_decay: tuple[str, ...] = ("norm", "embed")
    freeze: tuple[str, ...] = ()
    # "regex=multiplier" pairs: a learning-rate multiplier per parameter group (first match wins).
    lr_multipliers: tuple[str, ...] = ()

    def validate(self) -> None:
        self.require(self.learning_rate > 0, "learning_rate", "must be > 0")
        self.require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self.require(0.0 <= self.decay_fraction <= 1.0, "decay_fraction", "must be in [0, 1]")
        self.require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        self.require(self.clip_norm >= 0, "clip_norm", "must be >= 0")
        for item in self.lr_multipliers:
            ok = "=" in item
            if ok:
                try:
                    float(item.rsplit("=", 1)[1])
                except ValueError:
                    ok = False
            self.require(ok, "lr_multipliers", f"entry {item!r} must be 'regex=float'")


# The data fields a phase may change: a length curriculum (e.g. 2k -> 8k -> 16k tokens).
PHASE_DATA_FIELDS = ("data.seq_len", "data.batch_size")


@dataclasses.dataclass(frozen=True)
class PhaseConfig(Config):
    """From `start_step` on, the run uses these overrides (on top of the earlier phases'): `model.*`
    ones that change how layers attend, e.g. ("model.attention.0.mode=sparse",) to end a Seer
    distillation, and `data.seq_len` / `data.batch_size` for a length curriculum. Model changes that
    should happen when the curriculum reaches a length go in the phase that sets that length. The
    parameters must stay the same; a resumed run is in the phase its step says."""

    start_step: int = 1           # first step of the phase
    overrides: tuple[str, ...] = ()   # model.*, data.seq_len, data.batch_size overrides (key=value)

    def validate(self) -> None:
        self.require(self.start_step > 0, "start_step", "must be > 0 (phase 0 is the run's own config)")
        allowed = lambda o: o.startswith("model.") or o.split("=", 1)[0] in PHASE_DATA_FIELDS  # noqa: E731
        self.require(bool(self.overrides) and all(allowed(o) for o in self.overrides), "overrides",
                     f"give one or more model.* or {'/'.join(PHASE_DATA_FIELDS)} overrides (key=value)")


EvalTask = Literal["loss", "passkey", "niah_single", "niah_multikey", "niah_multivalue", "mqar", "vartrack", "copy"]
EVAL_TASKS: tuple[str, ...] = EvalTask.__args__


@dataclasses.dataclass(frozen=True)
class EvalSuiteConfig(Config):
    # At every validation pass also run the eval command's suite, written to RUN/eval/step_<N>/.
    # It measures the current parameters as the current phase attends (docs/eval.md); the fields
    # below are the command's options, and 0 or empty ones take its defaults.
    enabled: bool = False
    min_len: int = 0              # shortest length (lengths are powers of two); 0 = data.seq_len / 4
    max_len: int = 0              # longest length; 0 = 4 x data.seq_len
    modes: tuple[Literal["sparse", "dense"], ...] = ()   # sparse (as configured), dense (every layer dense)
    tasks: tuple[EvalTask, ...] = ()   # what to measure: loss and the retrieval tasks
    loss_tokens: int = 0          # held-out tokens per length
    depths: tuple[float, ...] = ()   # needle depths in [0, 1]
    samples: int = 0              # probes per task x length x depth
    mqar_pairs: tuple[int, ...] = ()  # key-value pairs per MQAR probe (empty: sized to each length)

    @classmethod
    def migrate(cls, data: dict) -> dict:
        # Before the retrieval tasks, passkey and MQAR had their own sample counts.
        data = dict(data)
        counts = [data.pop(name, 0) for name in ("passkey_samples", "mqar_samples")]
        data.setdefault("samples", max(counts))
        return data

    def validate(self) -> None:
        for name in ("min_len", "max_len", "loss_tokens", "samples"):
            self.require(getattr(self, name) >= 0, name, "must be >= 0 (0 = the eval command's default)")
        self.require(self.min_len != 1, "min_len", "must be >= 2 (or 0)")
        self.require(all(0.0 <= d <= 1.0 for d in self.depths), "depths", "must lie in [0, 1]")
        self.require(all(p > 0 for p in self.mqar_pairs), "mqar_pairs", "must be > 0")


@dataclasses.dataclass(frozen=True)
class TrainerConfig(Config):
    steps: int = 300              # optimizer steps to train to
    grad_accum: int = 1           # microbatches per step; batch_size must divide evenly
    seed: int = 0                 # parameter init and per-step rng seed
    z_loss: float = 0.0           # weight of logsumexp^2 (keeps logits from drifting)
    # Tokens per chunk of the output head and its loss (0 = all at once; divides microbatch tokens).
    # Logit memory becomes loss_chunk x vocab instead of batch x seq_len x vocab, for one extra head
    # matmul in the backward pass; microbatch tokens = data.batch_size / grad_accum x data.seq_len.
    loss_chunk: int = 0
    log_every: int = 10           # steps between metric lines
    eval_every: int = 100         # steps between validation passes
    eval_batches: int = 8         # validation batches per pass
    nonfinite: Literal["skip", "stop"] = "skip"   # a NaN/inf step: skip its update, or stop
    max_nonfinite_in_row: int = 10   # stop after this many non-finite steps in a row
    progress_bar: bool = True     # tqdm bar with loss, tokens/s and sparse metrics
    # Phase schedule: model changes at given steps (e.g. dense -> sparse, seer distill -> sparse),
    # and a length curriculum (data.seq_len / data.batch_size per phase).
    phases: tuple[PhaseConfig, ...] = ()
    # The evaluation suite (loss against length, passkey, MQAR, plots) at every validation pass.
    eval_suite: EvalSuiteConfig = EvalSuiteConfig()
    # Bytes one device may use; the compiled step's estimate must fit before training starts.
    # 0 = the device's own limit (GPUs report one; CPUs do not, so there is no check).
    memory_limit_bytes: int = 0

    def validate(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "eval_every", "eval_batches",
                     "max_nonfinite_in_row"):
            self.require(getattr(self, name) > 0, name, "must be > 0")
        self.require(self.z_loss >= 0, "z_loss", "must be >= 0")
        self.require(self.loss_chunk >= 0, "loss_chunk", "must be >= 0 (0 = unchunked)")
        self.require(self.memory_limit_bytes >= 0, "memory_limit_bytes", "must be >= 0 (0 = the device's limit)")
        starts = [phase.start_step for phase in self.phases]
        self.require(starts == sorted(set(starts)), "phases", "start_step must increase from phase to phase")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Config):
    # Device mesh axis sizes; exactly one may be -1 ("all remaining devices").
    data: int = -1                # pure data parallel (parameters replicated)
    fsdp: int = 1                 # data parallel with sharded parameters/optimizer state
    # Devices each sequence is split over along T (context parallel, attention/context_parallel.py):
    # a load-balanced causal layout, 2 chunks per device; docs/long_context.md says how to pick it.
    context: int = 1
    # How attention exchanges K/V between context devices: "all_gather" holds the whole sequence's
    # K/V on every device for a layer; "ring" passes one device's shard at a time (n - 1 ppermutes),
    # which at the 125M's shapes planned more memory, not less (docs/long_context.md).
    kv_exchange: Literal["all_gather", "ring"] = "all_gather"
    tensor: int = 1               # heads / MLP width split

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.context, self.tensor)
        self.require(all(s == -1 or s > 0 for s in sizes), "data", "axis sizes must be > 0 or -1")
        self.require(sum(s == -1 for s in sizes) <= 1, "data", "at most one axis size may be -1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Config):
    every: int = 0                # steps between saves; 0 = only at the end
    keep: int = 3                 # checkpoints kept
    async_save: bool = True       # save in the background while training continues
    keep_best: bool = False       # also keep the checkpoint with the best validation loss
    init_from: str = ""           # start a new run from another run's (or an import's) weights
    # With init_from: let parameters other than attention methods' own (gates) start fresh
    # (e.g. a deeper model); otherwise a base weight missing from the source is an error.
    init_missing_ok: bool = False
    # A latest checkpoint that fails validation on resume: "fallback" moves it aside (to
    # checkpoints/<step>.corrupt) and resumes from the newest good one; "fail" stops with an error.
    on_corrupt: Literal["fallback", "fail"] = "fallback"

    def validate(self) -> None:
        self.require(self.every >= 0, "every", "must be >= 0")
        self.require(self.keep > 0, "keep", "must be > 0")


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    name: str = "tiny"            # the run directory's name
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    trainer: TrainerConfig = TrainerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run_dir: str = "runs"         # outputs go to run_dir/name/
    tensorboard: bool = True      # also write TensorBoard event files

    def phase_configs(self) -> list[tuple[int, "RunConfig"]]:
        """(start step, config) of each phase: phase 0 is this config, each later phase adds its
        overrides to the previous one's."""
        configs, current = [(0, self)], self
        for i, phase in enumerate(self.trainer.phases):
            try:
                current = apply_overrides(current, list(phase.overrides))
            except ConfigError as e:
                raise ConfigError(f"trainer.phases.{i}: {e}") from None
            configs.append((phase.start_step, current))
        return configs

    def at_step(self, step: int) -> "RunConfig":
        """The config the run trains with from `step` on (a checkpoint saved at step N holds the model
        that phase describes, e.g. a SeerAttention run switched from distill to sparse)."""
        return [cfg for start, cfg in self.phase_configs() if start <= step][-1]

    def validate(self) -> None:
        self.require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty file name")
        self.require(self.data.seq_len <= self.model.max_seq_len, "data",
                     f"seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        self.require(self.data.batch_size % self.trainer.grad_accum == 0, "trainer",
                     f"grad_accum={self.trainer.grad_accum} must divide data.batch_size={self.data.batch_size}")
        if self.mesh.context > 1:
            for spec in self.model.attention:
                self.require(self.mesh.kv_exchange in spec.context_parallel, "mesh",
                             f"context={self.mesh.context} with kv_exchange={self.mesh.kv_exchange!r} is not "
                             f"supported by method {spec.method!r} (the rule for layers {spec.layers!r}); it runs "
                             f"under {list(spec.context_parallel) or 'no context split'}")
                # BLASST's skips depend on the kernel's loop over all of a row's keys, which a
                # context split cuts into per-device pieces (a dense layer would silently not skip).
                self.require(getattr(spec, "skip_threshold", None) is None, "mesh",
                             f"context={self.mesh.context} does not support skip_threshold (BLASST) on the rule "
                             f"for layers {spec.layers!r}; set skip_threshold=None or mesh.context=1")
            # Two chunks per device, each whole kernel tiles (16 for dense layers, else the block size).
            tile = max(getattr(spec, "block_size", 16) for spec in self.model.attention)
            self.require(self.data.seq_len % (2 * self.mesh.context * tile) == 0, "data",
                         f"seq_len={self.data.seq_len} must be a multiple of 2 x mesh.context x {tile} "
                         f"= {2 * self.mesh.context * tile} (two chunks per device, whole kernel tiles)")
        suite = self.trainer.eval_suite
        max_len = suite.max_len or 4 * self.data.seq_len
        self.require(suite.min_len <= max_len, "trainer",
                     f"eval_suite.min_len={suite.min_len} exceeds its longest length {max_len} "
                     "(eval_suite.max_len, or 4 x data.seq_len when 0)")
        micro_tokens = self.data.batch_size // self.trainer.grad_accum * self.data.seq_len
        self.require(micro_tokens % max(self.trainer.loss_chunk, 1) == 0, "trainer",
                     f"loss_chunk={self.trainer.loss_chunk} must divide the {micro_tokens} tokens of a "
                     "microbatch (data.batch_size / grad_accum x data.seq_len)")
