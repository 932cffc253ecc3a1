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


# Logical axis → mesh axes, in priority order (the first whose mesh axes are free and divide wins).
# Parameters are sharded FSDP-style over `fsdp` and Megatron-style over `tensor`; activations'
# batch rows go over data × fsdp (sharding.batch_sharding).
SHARDING_RULES = [
    ("vocab", "tensor"), ("vocab", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision", "fsdp"),
    ("tower_embed", "fsdp"),
    ("tower_mlp", "tensor"),
    ("head_dim", None), ("layers", None), ("aggregators", None), ("tower_layers", None),
]

# Parameter paths (regular expressions) of the connector groups of spec §7.1.
CONNECTOR = r"^connector/"
PROJECTORS = r"^connector/(mm_projector|image_newline)"          # aux projectors, output projector, newline
SAMPLERS = r"^connector/(vision_sampler|vision_query)"          # SVA, in-LLM aggregators, pos_embed, query
DECODER = r"^decoder/"
TOWERS = r"^towers/"


def stage(*, trainable, lr_groups, warmup_ratio, global_batch_size, epochs=1.0, num_steps=0, accum_steps=1,
          data=None) -> ml_collections.ConfigDict:
    """One training stage; lr_groups are (name, pattern, peak lr), first match wins, last = default."""
    return ml_collections.ConfigDict(dict(
        trainable=list(trainable),
        lr_groups=[dict(name=n, pattern=p, lr=lr) for n, p, lr in lr_groups],
        warmup_ratio=warmup_ratio, schedule="cosine",
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, grad_clip=1.0,
        global_batch_size=global_batch_size, epochs=epochs, num_steps=num_steps, accum_steps=accum_steps,
        data=data if data is not None else ml_collections.ConfigDict(),
    ))


def released_stages(size: str, global_batch_size: int, stage2_lr: float, accum_steps: int = 1):
    """Spec §7.1: stage 1 trains the connector (1e-3 projectors, 1e-4 samplers); stage 2 everything."""
    s1 = stage(trainable=[CONNECTOR],
               lr_groups=[("projectors", PROJECTORS, 1e-3), ("samplers", SAMPLERS, 1e-4)],
               warmup_ratio=0.06, global_batch_size=global_batch_size, accum_steps=accum_steps)
    s2 = stage(trainable=[CONNECTOR, DECODER], lr_groups=[("all", r".", stage2_lr)],
               warmup_ratio=0.03, global_batch_size=global_batch_size, accum_steps=accum_steps)
    return s1, s2


def checkpoint(save_interval_steps=1000, keep=3) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(save_interval_steps=save_interval_steps, keep=keep, async_save=True))


def mesh(data=1, fsdp=-1, tensor=1) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
