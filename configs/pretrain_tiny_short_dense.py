"""configs/pretrain_short_dense.py at CPU size: the tiny model trained dense at 128 tokens."""

from configs._workflows import short_dense


def get_config():
    return short_dense(tiny=True)
