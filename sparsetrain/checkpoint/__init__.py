"""Parameter I/O below both the trainer and the exporter: the model/params bridge (`ModelDef`) and
parameter-only checkpoints."""

from sparsetrain.checkpoint.model_def import ModelDef, Params, flatten, path_str
from sparsetrain.checkpoint.params_io import load_params, merge_init_params, save_params

__all__ = ["ModelDef", "Params", "flatten", "load_params", "merge_init_params", "path_str", "save_params"]
