"""A mid-size Cambrian for throughput and MFU measurements on one accelerator.

A ~1.1B Llama decoder (Llama-3.2-1B's body: 16 layers of 2048, MLP 8192, 32 heads over 8 KV heads;
Phi-3's 32k vocabulary, untied head) behind the four released tower kinds at reduced width —
ViT-B-sized SigLIP, CLIP and DINOv2 and a ConvNeXt-T-sized multi-stage ConvNeXt — at the released
resolutions (384/336/378/1024) and token grids (576, 576, 576, 9216), so the SVA, its windows and the
in-LLM aggregators (after decoder layers 0, 3, …, 15) have the released geometry. The recipe is the
8B's (spec §7.1); the data default to the synthetic set, so the trainer runs it as it is.

  python benchmarks/train_step.py --config configs/cambrian_mid.py                    # an accelerator
  python benchmarks/train_step.py --config configs/cambrian_mid.py:runlocal           # a CPU smoke run
  python -m cambrian_jax.train --config configs/cambrian_mid.py --workdir /tmp/mid

Switches: layers (decoder layers, 16), tower_layers (ViT depth, 12), convnext_depths (e.g. 3+3+9+3),
max_len (2048), batch (global batch, 8), accum, dtype, remat; runlocal (2 decoder layers, 2-layer
ViTs, one block per ConvNeXt stage, max_len 1024, batch 1, float32: the same widths on a laptop);
one_stage, connector_only, unfreeze_towers, towers_lr, workers (configs/common.py stage_options).
"""
import ml_collections

from cambrian_jax.data import pipeline
from configs import common

VIT_B = dict(hidden_size=768, intermediate_size=3072, num_heads=12)

# Released kinds and resolutions, reduced width. Names carry the kind fragments the tower builder
# dispatches on (config.tower_kind); every architecture number is given here.
MID_TOWERS = {
    "siglip/mid-14-384": dict(image_size=384, patch_size=14, **VIT_B),
    "openai/clip-mid-patch14-336": dict(image_size=336, patch_size=14, **VIT_B),
    # 37×37 learned position grid interpolated to 27×27, as dinov2-giant-res378 does (spec §14.7).
    "facebook/dinov2-mid-res378": dict(image_size=378, patch_size=14, pos_grid=37, **VIT_B),
    "clip-convnext-mid-multi-stage": dict(image_size=1024, dims=(96, 192, 384, 768)),
}

DECODER = dict(vocab_size=32064, hidden_size=2048, intermediate_size=8192, num_heads=32, num_kv_heads=8,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, rope_scaling=None)

AGGREGATOR_START, AGGREGATOR_STRIDE = 0, 3     # the 8B's schedule (spec §3.4), cut to the decoder's depth


def mid_model(layers: int, tower_layers: int, convnext_depths: tuple[int, ...], max_len: int, dtype: str,
              remat: str) -> ml_collections.ConfigDict:
    overrides = {name: dict(t) for name, t in MID_TOWERS.items()}
    for name, t in overrides.items():
        if "convnext" in name:
            t["depths"] = tuple(convnext_depths)
        else:
            t["num_layers"] = tower_layers
    num = len(range(AGGREGATOR_START, layers, AGGREGATOR_STRIDE))
    return ml_collections.ConfigDict(dict(
        towers=list(MID_TOWERS),
        tower_token_lens=list(common.RELEASED_TOKEN_LENS),
        tower_overrides=overrides,
        select_layer=-2,
        connector=common.connector(num=num, start=AGGREGATOR_START, stride=AGGREGATOR_STRIDE),
        decoder=ml_collections.ConfigDict(dict(DECODER, num_layers=layers)),
        image_position=14,     # phi3 template + the synthetic tokenizer (data.templates.image_position)
        max_len=max_len,
        dtype=dtype,
        remat=remat,
    ))


def get_config(arg=None):
    arg = common.parse_arg(arg, layers=16, tower_layers=12, convnext_depths="3+3+9+3", max_len=2048, batch=8,
                           accum=1, dtype="bfloat16", remat="full", runlocal=False, workers=0, one_stage=False,
                           connector_only=False, unfreeze_towers="", towers_lr=2e-6)
    if arg.runlocal:
        arg.update(dict(layers=2, tower_layers=2, convnext_depths="1+1+1+1", max_len=1024, batch=1,
                        dtype="float32"))
    depths = tuple(int(d) for d in arg.convnext_depths.split("+"))
    if len(depths) != 4:
        raise ValueError(f"convnext_depths={arg.convnext_depths!r}: give four stage depths, e.g. 3+3+9+3")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = mid_model(arg.layers, arg.tower_layers, depths, arg.max_len, arg.dtype, arg.remat)
    config.data = pipeline.data_config(source="synthetic", template="phi3", worker_count=arg.workers,
                                       max_len=arg.max_len)
    s1, s2 = common.released_stages("mid", arg.batch, 4e-5, arg.accum)     # the 8B's learning rates
    config.stage1, config.stage2 = s1, s2
    config.stages = (1, 2)
    config.init = common.init()          # random weights: the figures do not depend on them
    config.mesh = common.mesh()
    config.sharding_rules = common.SHARDING_RULES
    config.checkpoint = common.checkpoint(save_interval_steps=1000, keep=2)
    config.log_every = 10
    config.compilation_cache_dir = ""
    config.prng_impl = "unsafe_rbg"      # random init compiles faster than with threefry
    config.eval = None
    common.stage_options(config, arg)
    return config
