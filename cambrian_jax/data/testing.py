"""Small model configurations for data tests and benchmarks (no weights: only shapes matter here)."""
from __future__ import annotations

from cambrian_jax import config as C

RELEASED_TOWERS = ("siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336",
                   "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage")


def tiny_model_config(image_position: int, max_len: int = 128, vocab_size: int = 512) -> C.CambrianConfig:
    """Four towers of the released kinds at small resolutions (56/42/42/64 px, grids 4/4/4/8) and an
    LLM image grid of n = 2 (a 2×3 image block)."""
    small = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    towers = (C.tower_config(RELEASED_TOWERS[0], 16, image_size=56, **small),
              C.tower_config(RELEASED_TOWERS[1], 16, image_size=42, **small),
              C.tower_config(RELEASED_TOWERS[2], 16, image_size=42, **small),
              C.tower_config(RELEASED_TOWERS[3], 64, image_size=64, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)))
    con = C.ConnectorConfig(vision_hidden_size=32, num_heads=2, query_num_list=(4,), image_token_len=4,
                            num_of_vision_sampler_layers=1, stride_of_vision_sampler_layers=1)
    dec = C.DecoderConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1)
    return C.CambrianConfig(towers, con, dec, image_position=image_position, max_len=max_len).validate()


def released_towers() -> tuple[C.TowerConfig, ...]:
    """The four released towers at their real sizes (384/336/378/1024) with their preprocessing."""
    return tuple(C.tower_config(n, t) for n, t in zip(RELEASED_TOWERS, (576, 576, 576, 9216)))
