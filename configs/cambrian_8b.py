"""Cambrian-1 8B: the released architecture (spec §5.2, §6.1) and its two-stage recipe (spec §7.1)."""
import ml_collections

from configs import common


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.model = common.released_model("8b")
    return config
