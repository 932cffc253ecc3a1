"""Shared pieces of the configs: released towers, connectors and decoders (spec §2.1, §3.7, §5.2, §6.1).

Each configs/cambrian_*.py composes these in a few lines. Field names follow the released
config.json wherever one exists, so a number can be checked against the checkpoint it came from.
"""
from __future__ import annotations

import ml_collections

RELEASED_TOWERS = (
    "siglip/CLIP-ViT-SO400M-14-384",
    "openai/clip-vit-large-patch14-336",
    "facebook/dinov2-giant-res378",
    "clip-convnext-XXL-multi-stage",
)
RELEASED_TOKEN_LENS = (576, 576, 576, 9216)

# Llama-family decoders of the released models (base LLM config.json values).
DECODERS = {
    # Phi-3-mini-4k-instruct
    "3b": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32,
               num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096),
    # Meta-Llama-3-8B-Instruct
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    # lmsys/vicuna-13b-v1.5
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                num_kv_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096),
    # NousResearch/Nous-Hermes-2-Yi-34B
    "34b": dict(vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_layers=60, num_heads=56,
                num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=5000000.0, max_position_embeddings=4096),
}

# Per size: image_position, and the in-LLM aggregator schedule (N, start, stride). The 3B's
# start/stride were not published (spec §3.4); 0/3 mirrors the 8B's 32-layer schedule.
RELEASED = {
    "3b": dict(image_position=13, template="phi3", num=10, start=0, stride=3),
    "8b": dict(image_position=91, template="llama_3", num=10, start=0, stride=3),
    "13b": dict(image_position=35, template="vicuna_v1", num=10, start=0, stride=4),
    "34b": dict(image_position=87, template="chatml_direct", num=9, start=0, stride=7),
}


def connector(num=10, start=0, stride=3, **overrides) -> ml_collections.ConfigDict:
    c = dict(vision_hidden_size=1024, num_heads=16, num_query_group=1, query_num_list=[576], connector_depth=3,
             image_token_len=576, connector_only=False, num_of_vision_sampler_layers=num,
             start_of_vision_sampler_layers=start, stride_of_vision_sampler_layers=stride)
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def released_model(size: str) -> ml_collections.ConfigDict:
    """config.model of a released Cambrian-1 size: '3b', '8b', '13b' or '34b'."""
    r = RELEASED[size]
    return ml_collections.ConfigDict(dict(
        towers=list(RELEASED_TOWERS),
        tower_token_lens=list(RELEASED_TOKEN_LENS),
        tower_overrides={},
        select_layer=-2,
        connector=connector(r["num"], r["start"], r["stride"]),
        decoder=ml_collections.ConfigDict(dict(DECODERS[size], rope_scaling=None)),
        image_position=r["image_position"],
        max_len=2048,
        dtype="bfloat16",
        remat="full",
    ))


def parse_arg(arg: str | None, **defaults):
    """big_vision-style `--config configs/x.py:key=value,flag` switches, typed from the defaults."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config switch {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() in ("", "1", "true", "yes")
        else:
            out[key] = kind(value)
    return ml_collections.ConfigDict(out)
