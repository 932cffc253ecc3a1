"""Cambrian-1 34B (Nous-Hermes-2-Yi-34B):
the released architecture (spec §5.2, §6.1) and its two-stage recipe (spec §7.1).

Stage 1 trains the connector (projectors and newline at 1e-3; SVA, in-LLM aggregators and queries at
1e-4) with towers and LLM frozen; stage 2 trains the LLM and the connector at 2e-5. Both: AdamW
(0.9, 0.999, 1e-8), no weight decay, clip 1.0, cosine to 0 after linear warmup, one epoch, global batch
1024, length 2048. Parameters and optimizer state are FSDP-sharded over every chip.

Documented topology: both stages fit on v4-512 (256 chips, 32 GiB each) with accum=2, two rows per
chip per micro-batch. By the TPU compiler, with Splash attention (model.attention "auto" on TPU) and
the cross-entropy in 512-position chunks, stage 1 takes 16.08 GiB per chip and stage 2 21.72 GiB,
with a predicted 9.6 s per step raw (10.9 s calibrated, 59 % MFU); without accumulation stage 2 takes
27.78 GiB and 11.5 s; the earlier recipe
(accum=4, einsum attention, whole logits) 16.22 GiB and 14.4 s (docs/planning.md: `python -m
cambrian_jax.plan --config configs/cambrian_34b.py --topology v4-512`). accum=2 is the fastest
setting that fits with headroom. On another slice pass accum=… so that the 1024 rows split evenly over
chips × accum.

  python -m cambrian_jax.train --workdir gs://BUCKET/cambrian-34b \
    --config configs/cambrian_34b.py:data1=/data/alignment,data2=/data/cambrian7m,\
tokenizer=/ckpt/llm,llm=/ckpt/llm,towers=/ckpt/towers

Switches (configs/common.py training_config): batch, accum, steps1, steps2, data/fsdp/tensor, one_stage,
connector_only, unfreeze_towers=1|2|12, towers_lr, remat, dtype, workers. Any field: --config.a.b=value.
"""
from configs import common


def get_config(arg=None):
    config = common.training_config(
        "34b", arg,
        global_batch=1024,                          # spec §7.1
        stage1_lr=(1e-3, 1e-4),                     # (projectors + image_newline, vision_sampler* + vision_query)
        stage2_lr=2e-5,                             # spec §7.1
        warmup=(0.06, 0.03),                        # warmup ratio of stage 1, stage 2
        save_every=(1000, 2000),                    # checkpoint interval (steps) of stage 1, stage 2
        mesh_axes=dict(data=1, fsdp=-1, tensor=1),  # -1: the rest of the devices
        remat="full",                               # every decoder layer recomputed in the backward pass
        dtype="bfloat16",                           # compute dtype; parameters and optimizer state stay float32
        accum=2,                                    # the documented topology's accumulation (the accum switch wins)
    )
    return config
