"""configs/pretrain_nsa.py at CPU size: NSA scaled to the tiny model's 256 tokens as
configs/nsa_tiny.py (windows of 8 at stride 4, 4 blocks of 16, a 32-token window)."""

from configs._workflows import pretrain
from configs.nsa_tiny import get_config as nsa_tiny


def get_config():
    return pretrain("pretrain_tiny_nsa", nsa_tiny().model.attention, tiny=True)
