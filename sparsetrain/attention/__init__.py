"""Per-layer attention specs and the one dispatcher that runs dense or sparse attention."""

from sparsetrain.attention.dense import dense_causal_attention
from sparsetrain.attention.dispatch import AuxLoss, attention_density, build_attention, report_aux_loss
from sparsetrain.attention.spec import METHODS, AttentionSpec, parse_layers, spec_for_layer

__all__ = ["AttentionSpec", "AuxLoss", "METHODS", "attention_density", "build_attention", "dense_causal_attention",
           "parse_layers", "report_aux_loss", "spec_for_layer"]
