"""The Cambrian model: vision towers → Spatial Vision Aggregator → Llama-family decoder (spec §1).

The connector is the one `model.connector.type` names (connector.build_connector): the SVA, or an
ablation connector (mlp2x_gelu, concat, interleave, resampler) filling the same image block.

The forward uses the static layout the reference trains with (spec §3.5, §4): one n×(n+1) image block
at `image_position`, padding cells masked in attention, position ids from the cumulative mask. It is
what `generate()` computes at prefill in the reference: connector plus in-LLM aggregators on the
current image (spec §14.3).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cambrian_jax import layout, preprocess
from cambrian_jax.config import IMAGE_TOKEN_INDEX, CambrianConfig
from cambrian_jax.connector import aggregate, build_connector
from cambrian_jax.decoder import Decoder
from cambrian_jax.towers import build_tower


class Cambrian(nnx.Module):
    def __init__(self, cfg: CambrianConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.towers = nnx.List([build_tower(t, dtype=dtype, rngs=rngs) for t in cfg.towers])
        self.connector = build_connector(cfg, rngs=rngs)
        self.decoder = Decoder(cfg.decoder, dtype=dtype, remat=cfg.remat, attention=cfg.attention, rngs=rngs)

    def encode_images(self, pixels: Sequence[jax.Array]) -> list[jax.Array]:
        """Per-tower features [B, s_k², C_k] from per-tower pixels [B, R_k, R_k, 3]."""
        if len(pixels) != len(self.towers):
            raise ValueError(f"got pixels for {len(pixels)} towers, the model has {len(self.towers)}")
        return [tower(px) for tower, px in zip(self.towers, pixels)]

    def __call__(self, input_ids: jax.Array, pixels: Sequence[jax.Array], tower_masks: Sequence[jax.Array],
                 attention_mask: jax.Array, positions: jax.Array) -> jax.Array:
        """Logits [B, T, vocab] (float32) for a batch in the static layout.

        input_ids [B, T] hold filler ids in the image block; pixels/tower_masks are per tower
        ([B, R_k, R_k, 3] / [B, s_k²] bool); attention_mask [B, T] bool; positions [B, T] int.
        """
        hidden = self.hidden_states(input_ids, pixels, tower_masks, attention_mask, positions)
        return self.decoder.logits(hidden)

    def hidden_states(self, input_ids, pixels, tower_masks, attention_mask, positions) -> jax.Array:
        cfg = self.cfg
        p, block = cfg.image_position, cfg.connector.block_len
        image_block, vision = self.connector(self.encode_images(pixels), list(tower_masks))
        x = self.decoder.embed(input_ids)
        x = jax.lax.dynamic_update_slice_in_dim(x, image_block.astype(x.dtype), p, axis=1)

        def run_aggregator(layer, h):
            return aggregate(layer, h, vision, p, cfg.connector.grid)

        stack = self.connector.vision_sampler_layers
        return self.decoder(x, positions, attention_mask, aggregators=stack.layer if stack else None,
                            aggregate=run_aggregator, agg_layers=cfg.connector.aggregator_layers)


def static_layout(cfg: CambrianConfig, input_ids: Sequence[Sequence[int]],
                  image_sizes: Sequence[tuple[int, int] | None], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Token ids with one −200 sentinel each (or none: text-only) → the model's static-layout inputs.

    Each row's sentinel must sit at cfg.image_position; text-only rows get a fully masked dummy block
    there, so their text logits equal those of the LLM alone. image_sizes are the (W, H) the padding
    masks come from (preprocess.effective_size: the original under 'pad'); the masks are computed as
    training computes them (preprocess.image_masks, aspect ratios clamped per grid). Rows are
    right-padded to a common length.
    """
    n = cfg.connector.grid
    rows, masks = [], []
    for ids, size in zip(input_ids, image_sizes):
        ids = np.asarray(ids, np.int32)
        has_image = bool((ids == IMAGE_TOKEN_INDEX).any())
        real = len(ids)
        if not has_image:
            # Text-only: a masked dummy block at image_position (short prompts padded up to it).
            ids = np.concatenate([ids, np.full(max(0, cfg.image_position - real), pad_id, np.int32)])
            ids = np.insert(ids, cfg.image_position, IMAGE_TOKEN_INDEX)
        out, mask, _ = layout.expand_image_block(ids, cfg.image_position, n,
                                                 preprocess.clamp_aspect(size, n) if has_image else None,
                                                 has_image=has_image)
        if not has_image and real < cfg.image_position:
            mask[real:cfg.image_position] = False
        rows.append(out)
        masks.append(mask)
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    attn = np.zeros((len(rows), length), bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)], attn[i, :len(m)] = r, m
    per_row = [preprocess.image_masks(s, cfg.towers, n)[0] for s in image_sizes]
    tower_masks = [np.stack([row[k] for row in per_row]) for k in range(len(cfg.towers))]
    return dict(input_ids=ids, attention_mask=attn, positions=layout.positions(attn), tower_masks=tower_masks)


def init_model(cfg: CambrianConfig, seed: int = 0) -> Cambrian:
    """A freshly initialised model, created in one compiled program (eager init compiles per shape)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(seed))))
    state = jax.jit(lambda: nnx.state(Cambrian(cfg, rngs=nnx.Rngs(seed))))()
    return nnx.merge(graphdef, state)
