"""Shared pieces of the configs: released towers, connectors and decoders (spec §2.1, §3.7, §5.2, §6.1).

Each configs/cambrian_*.py composes these in a few lines. Field names follow the released
config.json wherever one exists, so a number can be checked against the checkpoint it came from.
"""
from __future__ import annotations

import ml_collections

from cambrian_jax import sharding

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
    """config.model.connector; `type` picks sva (spec §3) or an ablation connector: mlp2x_gelu, concat,
    interleave, resampler (cambrian_jax/connector.py). Non-SVA types have no in-LLM aggregators."""
    c = dict(type="sva", vision_hidden_size=1024, num_heads=16, num_query_group=1, query_num_list=[576],
             connector_depth=3, image_token_len=576, connector_only=False, num_of_vision_sampler_layers=num,
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
        attention="auto",       # Splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere (cambrian_jax/attention.py)
    ))


_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_arg(arg: str | None, **defaults):
    """big_vision-style `--config configs/x.py:key=value,flag` switches, typed from the defaults.
    A switch that is not one of `defaults`, or a value of the wrong type, is a ConfigError naming it."""
    from cambrian_jax.config import ConfigError  # noqa: PLC0415

    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ConfigError(f"unknown config switch {key!r}; known: {', '.join(sorted(defaults))}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"config switch {key}={value!r}: give {key} alone (on), or {key}=1 / {key}=0")
            out[key] = value.lower() in _TRUE
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ConfigError(f"config switch {key}={value!r}: not a{'n' if kind is int else ''} "
                                  f"{kind.__name__} (default {defaults[key]!r})") from None
    return ml_collections.ConfigDict(out)


def prepared_paths(value: str) -> list[str]:
    """The `data1=` / `data2=` switches: prepared ArrayRecord folders (python -m cambrian_jax.data.prepare),
    files or globs, ';'-separated."""
    return [p.strip() for p in (value or "").split(";") if p.strip()]


# Logical axis → mesh axes, in priority order (cambrian_jax/sharding.py DEFAULT_RULES lists and
# explains them). Each config holds its own copy as config.sharding_rules, to change per run.
SHARDING_RULES = list(sharding.DEFAULT_RULES)

# Parameter paths (regular expressions) of the connector groups of spec §7.1.
CONNECTOR = r"^connector/"
PROJECTORS = r"^connector/(mm_projector|image_newline)"          # aux projectors, output projector, newline
SAMPLERS = r"^connector/(vision_sampler|vision_query)"          # SVA, in-LLM aggregators, pos_embed, query
DECODER = r"^decoder/"
TOWERS = r"^towers/"


def stage(*, trainable, lr_groups, warmup_ratio, global_batch_size, epochs=1.0, num_steps=0, accum_steps=1,
          data=None, save_interval_steps=0) -> ml_collections.ConfigDict:
    """One training stage; lr_groups are (name, pattern, peak lr[, optional]), first match wins, last =
    default; an optional group may match nothing (the samplers of a connector that has none).

    num_steps 0 = epochs × records / global_batch_size; save_interval_steps 0 = checkpoint's.
    """
    return ml_collections.ConfigDict(dict(
        trainable=list(trainable),
        lr_groups=[dict(name=g[0], pattern=g[1], lr=g[2], optional=bool(g[3:] and g[3])) for g in lr_groups],
        warmup_ratio=warmup_ratio, schedule="cosine",
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, grad_clip=1.0,
        global_batch_size=global_batch_size, epochs=epochs, num_steps=num_steps, accum_steps=accum_steps,
        save_interval_steps=save_interval_steps,
        data=data if data is not None else ml_collections.ConfigDict(),
    ))


def released_stages(size: str, global_batch_size: int, stage2_lr: float, accum_steps: int = 1):
    """Spec §7.1: stage 1 trains the connector (1e-3 projectors, 1e-4 samplers); stage 2 everything."""
    s1 = stage(trainable=[CONNECTOR],
               lr_groups=[("projectors", PROJECTORS, 1e-3), ("samplers", SAMPLERS, 1e-4, True)],
               warmup_ratio=0.06, global_batch_size=global_batch_size, accum_steps=accum_steps)
    s2 = stage(trainable=[CONNECTOR, DECODER], lr_groups=[("all", r".", stage2_lr)],
               warmup_ratio=0.03, global_batch_size=global_batch_size, accum_steps=accum_steps)
    return s1, s2


def checkpoint(save_interval_steps=1000, keep=3) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(save_interval_steps=save_interval_steps, keep=keep, async_save=True))


def mesh(data=1, fsdp=-1, tensor=1) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


# Hugging Face / open_clip repository names of the released towers: `towers=DIR` expects DIR/<name>.
TOWER_DIRS = {
    "siglip/CLIP-ViT-SO400M-14-384": "ViT-SO400M-14-SigLIP-384",
    "openai/clip-vit-large-patch14-336": "clip-vit-large-patch14-336",
    "facebook/dinov2-giant-res378": "dinov2-giant",
    "clip-convnext-XXL-multi-stage": "CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup",
}


def init(llm="", towers=None, adapter="", cambrian="") -> ml_collections.ConfigDict:
    """config.init: where the initial weights come from (cambrian_jax.pretrained.load_initial_weights)."""
    return ml_collections.ConfigDict(dict(llm=llm, towers=ml_collections.ConfigDict(dict(towers or {})),
                                          adapter=adapter, cambrian=cambrian))


def stage_options(config, arg) -> None:
    """The recipe options shared by every config (switches of `--config configs/x.py:...`).

      one_stage          skip stage 1: stage 2 trains connector + LLM from config.init
      connector_only     no in-LLM aggregators (model.connector.connector_only)
      unfreeze_towers    '1', '2' or '12': the stages that also train the towers, at towers_lr
    """
    if arg.one_stage:
        config.stages = (2,)
    if arg.connector_only:
        config.model.connector.connector_only = True
    for n in str(arg.unfreeze_towers or ""):
        if n not in "12":
            from cambrian_jax.config import ConfigError  # noqa: PLC0415

            raise ConfigError(f"config switch unfreeze_towers={arg.unfreeze_towers!r}: give the stages, e.g. 2 or 12")
        s = config[f"stage{n}"]
        if TOWERS not in s.trainable:
            s.trainable = list(s.trainable) + [TOWERS]
            s.lr_groups = [dict(name="towers", pattern=TOWERS, lr=arg.towers_lr)] + list(s.lr_groups)


def training_config(size: str, arg, *, global_batch: int, stage1_lr: tuple[float, float], stage2_lr: float,
                    warmup: tuple[float, float], save_every: tuple[int, int], mesh_axes: dict,
                    remat: str = "full", dtype: str = "bfloat16", max_len: int = 2048, accum: int = 1):
    """The whole two-stage recipe of a released size (spec §7.1), with launch-time switches:

      data1, data2     prepared ArrayRecord folders of stage 1 (alignment) and stage 2 (instruction)
      tokenizer        folder with the LLM's tokenizer.json
      llm, towers      initial weights: the base LLM directory; a folder holding the four tower
                       directories under their hub names (common.TOWER_DIRS)
      adapter          a stage-1 mm_projector.bin/.safetensors (with one_stage: start stage 2 from it)
      batch, accum     global batch (LRs scale by sqrt(batch / released batch), the README's rule)
                       and gradient-accumulation steps
      steps1, steps2   fixed step counts (0: one epoch of the data)
      data, fsdp, tensor   mesh degrees (-1: the rest of the devices)
      one_stage, connector_only, unfreeze_towers, towers_lr   see stage_options
      remat, dtype     remat policy name (decoder.REMAT_POLICIES) and compute dtype
      workers          grain worker processes per host
    """
    arg = parse_arg(arg, data1="", data2="", tokenizer="", llm="", towers="", adapter="", batch=global_batch,
                    accum=accum, steps1=0, steps2=0, data=int(mesh_axes.get("data", 1)),
                    fsdp=int(mesh_axes.get("fsdp", -1)), tensor=int(mesh_axes.get("tensor", 1)), one_stage=False,
                    connector_only=False, unfreeze_towers="", towers_lr=2e-6, remat=remat, dtype=dtype, workers=4)
    from cambrian_jax.data import pipeline  # noqa: PLC0415  (light: no JAX)

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = released_model(size)
    config.model.max_len = max_len
    config.model.remat = arg.remat
    config.model.dtype = arg.dtype
    config.data = pipeline.data_config(source="array_record", template=RELEASED[size]["template"],
                                       tokenizer_dir=arg.tokenizer, worker_count=arg.workers, max_len=max_len)
    scale = (arg.batch / global_batch) ** 0.5
    s1, s2 = released_stages(size, arg.batch, stage2_lr * scale, arg.accum)
    s1.lr_groups[0]["lr"], s1.lr_groups[1]["lr"] = stage1_lr[0] * scale, stage1_lr[1] * scale
    s1.warmup_ratio, s2.warmup_ratio = warmup
    s1.save_interval_steps, s2.save_interval_steps = save_every
    s1.num_steps, s2.num_steps = arg.steps1, arg.steps2
    s1.data = ml_collections.ConfigDict(dict(paths=prepared_paths(arg.data1)))
    s2.data = ml_collections.ConfigDict(dict(paths=prepared_paths(arg.data2), group_by_modality=True))
    config.stage1, config.stage2 = s1, s2
    config.stages = (1, 2)
    config.init = init(llm=arg.llm, adapter=arg.adapter,
                       towers={n: f"{arg.towers}/{d}" for n, d in TOWER_DIRS.items()} if arg.towers else None)
    config.mesh = mesh(arg.data, arg.fsdp, arg.tensor)
    config.sharding_rules = SHARDING_RULES
    config.checkpoint = checkpoint(save_interval_steps=save_every[0], keep=3)
    config.log_every = 10
    # The cross-entropy 512 positions at a time (train_step.chunked_token_losses): the float32 logits
    # of a 32k–128k vocabulary never exist whole; 0 = all at once.
    config.loss_chunk = 512
    config.compilation_cache_dir = ""   # e.g. WORKDIR/xla_cache: a restart after preemption skips compiling
    config.eval = None
    stage_options(config, arg)
    return config
