"""A tiny Cambrian for a laptop CPU: the four tower kinds at toy width, the full SVA, a 4-layer decoder.

Every mechanism of the released model is exercised at toy scale: SigLIP's VALID patch conv and its
5×5 → 4×4 token interpolation, CLIP's second-to-last layer, DINOv2's 4.37-style position-embedding
interpolation (-res28 on a 5×5 learned grid), multi-stage ConvNeXt with 2×2 SVA windows and their
position embedding, and in-LLM aggregators after decoder layers 0 and 2.

  python -m cambrian_jax.train --config configs/cambrian_tiny.py --workdir /tmp/tiny

Switches: steps1, steps2, batch, eval_samples, workers, tasks2 (stage 2's task mix, '+'-joined; repeats
weigh), lr2; micro (the trainer tests' one-tower model); towers (any '+'-joined subset and order of
siglip, clip, dino, convnext); connector (sva | mlp2x_gelu | concat | interleave | resampler);
one_stage, connector_only, unfreeze_towers, towers_lr (configs/common.py stage_options).

Your own data instead of the synthetic shapes: data1, data2 = prepared ArrayRecord folders
(`python -m cambrian_jax.data.prepare`, ';'-separated) of stage 1 and stage 2, as the released configs'
switches; with one_stage only data2. The text is tokenised with the synthetic dataset's byte-level
tokenizer (any text; built under WORKDIR/tokenizer), or with tokenizer=DIR, a tokenizer.json of at most
576 tokens (the tiny vocabulary). No held-out synthetic evaluation then; model.max_len (96) truncates
longer samples (--config.model.max_len=512 is the decoder's limit):

  python -m cambrian_jax.train --config configs/cambrian_tiny.py:data2=/data/mine,one_stage --workdir /tmp/mine
"""
import ml_collections

from cambrian_jax.config import ConfigError
from cambrian_jax.data import pipeline
from configs import common

TINY_TOWERS = {
    "siglip/tiny-7-36": dict(image_size=36, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2),
    "openai/clip-tiny-patch7-28": dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                                       num_layers=3, num_heads=2),
    "facebook/dinov2-tiny-res28": dict(patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2,
                                       num_heads=2, pos_grid=5),
    "clip-convnext-tiny-multi-stage": dict(image_size=64, depths=(1, 1, 2, 1), dims=(8, 16, 32, 64)),
}


TINY_TOKEN_LENS = {"siglip/tiny-7-36": 16, "openai/clip-tiny-patch7-28": 16, "facebook/dinov2-tiny-res28": 16,
                   "clip-convnext-tiny-multi-stage": 64}
# The `towers=` switch: short names of the tiny towers, any subset in any order, joined by '+'.
SHORT_NAMES = {"siglip": "siglip/tiny-7-36", "clip": "openai/clip-tiny-patch7-28", "dino": "facebook/dinov2-tiny-res28",
               "convnext": "clip-convnext-tiny-multi-stage"}


def tower_set(model: ml_collections.ConfigDict, spec: str) -> None:
    """`towers=clip+dino`: these tiny towers in this order, with their token counts and sizes."""
    names = []
    for short in spec.split("+"):
        if short not in SHORT_NAMES:
            raise ConfigError(f"config switch towers={spec!r}: {short!r} is not one of {'+'.join(SHORT_NAMES)}")
        names.append(SHORT_NAMES[short])
    if len(set(names)) != len(names):
        raise ConfigError(f"config switch towers={spec!r}: each tower at most once")
    model.towers = names
    model.tower_token_lens = [TINY_TOKEN_LENS[n] for n in names]
    model.tower_overrides = {n: TINY_TOWERS[n] for n in names}


def tiny_model() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        towers=list(TINY_TOWERS),
        tower_token_lens=[TINY_TOKEN_LENS[n] for n in TINY_TOWERS],
        tower_overrides=TINY_TOWERS,
        select_layer=-2,
        connector=common.connector(num=2, start=0, stride=2, vision_hidden_size=32, num_heads=4,
                                   query_num_list=[16], connector_depth=2, image_token_len=16),
        decoder=ml_collections.ConfigDict(dict(
            vocab_size=576, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512, rope_scaling=None)),
        image_position=14,      # phi3 template + the synthetic tokenizer (data.templates.image_position)
        max_len=96,
        dtype="float32",
        remat="none",
    ))


MICRO_TOWER = "openai/clip-tiny-patch7-28"


def micro_model() -> ml_collections.ConfigDict:
    """The smallest model with every part: one tower, a one-layer SVA, one in-LLM aggregator, a
    2-layer decoder. For the trainer's tests (`:micro`): it compiles in seconds rather than minutes."""
    m = tiny_model()
    m.towers = [MICRO_TOWER]
    m.tower_token_lens = [16]
    m.tower_overrides = {MICRO_TOWER: dict(image_size=28, patch_size=7, hidden_size=16, intermediate_size=32,
                                           num_layers=2, num_heads=2)}
    m.connector = common.connector(num=1, start=0, stride=1, vision_hidden_size=16, num_heads=2,
                                   query_num_list=[16], connector_depth=1, image_token_len=16)
    m.decoder.update(dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1))
    m.max_len = 96
    return m


def get_config(arg=None):
    arg = common.parse_arg(arg, steps1=30, steps2=600, batch=32, eval_samples=240, workers=0, micro=False,
                           one_stage=False, connector_only=False, unfreeze_towers="", towers_lr=1e-3,
                           tasks2="depth+relation+relation+count", lr2=2e-3,
                           towers="siglip+clip+dino+convnext", connector="sva", data1="", data2="", tokenizer="")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = micro_model() if arg.micro else tiny_model()
    if not arg.micro:
        tower_set(config.model, arg.towers)
    config.model.connector.type = arg.connector
    config.data = pipeline.data_config(source="synthetic", template="phi3", worker_count=arg.workers)
    config.data.synthetic.num_samples = 4000
    config.data.cache_rows = True     # 4000 rows of ≈80 KiB: each epoch after the first skips preprocessing
    # Stage 1 aligns the connector on captions; stage 2 teaches the questions. The tiny towers are
    # random (no pretrained weights on a laptop), so stage 2 also trains them. Stage 2's mix is 1/4
    # depth, 1/2 relation, 1/4 count: a random LLM first has to learn to read the image tokens at all,
    # which it does within ~50 steps on depth questions but not within 600 on an even mix of three;
    # 1/4 depth is enough for that, and relation then needs the larger share (docs/guide.md, "The main job").
    s1, s2 = common.released_stages("tiny", arg.batch, 2e-3)
    s1.num_steps, s2.num_steps = arg.steps1, arg.steps2
    s1.lr_groups[0]["lr"], s1.lr_groups[1]["lr"] = 3e-3, 1e-3
    s1.data = ml_collections.ConfigDict(dict(synthetic=dict(tasks=("caption",))))
    s2.trainable = [common.CONNECTOR, common.DECODER, common.TOWERS]
    s2.lr_groups = [dict(name="towers", pattern=common.TOWERS, lr=arg.lr2), dict(name="rest", pattern=".", lr=arg.lr2)]
    s2.data = ml_collections.ConfigDict(dict(synthetic=dict(tasks=tuple(arg.tasks2.split("+")))))
    if arg.micro:    # the towers are as random as the rest: stage 2 trains connector + LLM only
        s2.trainable = [common.CONNECTOR, common.DECODER]
        s2.lr_groups = [dict(name="all", pattern=".", lr=2e-3)]
    config.stage1, config.stage2 = s1, s2
    config.stages = (1, 2)
    config.init = common.init()     # nothing to load: every weight is random
    config.mesh = common.mesh()
    config.sharding_rules = common.SHARDING_RULES
    config.checkpoint = common.checkpoint(save_interval_steps=100, keep=2)
    config.log_every = 20
    config.compilation_cache_dir = ""
    config.prng_impl = "unsafe_rbg"   # random init compiles ~4x faster than threefry on CPU
    config.eval = ml_collections.ConfigDict(dict(num_samples=arg.eval_samples, tasks=("count", "relation", "depth")))
    if arg.micro:
        config.eval = None
        config.data.synthetic.num_samples = 256
    if arg.data1 or arg.data2:
        prepared_data(config, arg.data1, arg.data2)
    if arg.tokenizer:
        config.data.tokenizer_dir = arg.tokenizer
    common.stage_options(config, arg)
    return config


def prepared_data(config, data1: str, data2: str) -> None:
    """`data1=`, `data2=`: train on prepare output (ArrayRecord folders, ';'-separated) instead of the
    synthetic shapes, tokenised with the synthetic byte-level tokenizer unless tokenizer= gives one."""
    config.data.source = "array_record"
    config.data.synthetic_tokenizer = True
    config.data.cache_rows = False      # a prepared set may be large: rows are recomputed each epoch
    config.stage1.data = ml_collections.ConfigDict(dict(paths=common.prepared_paths(data1)))
    config.stage2.data = ml_collections.ConfigDict(dict(paths=common.prepared_paths(data2)))
    config.eval = None                  # the held-out evaluation is the synthetic tasks'

