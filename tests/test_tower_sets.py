"""Tower sets (issue 8): any subset and order of CLIP, SigLIP, DINOv2 (any size) and ConvNeXt (single- or
multi-stage), with -res / -interp, builds, validates and runs; bad windows and grids fail up front.

Tiny widths throughout (16-wide ViTs, 4-8 channel ConvNeXts, a 2-layer decoder); the LLM image grid
is n = 2 and the SVA queries sit on an L = 2 grid, so every tower grid side must be even.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from cambrian_jax import config as config_lib
from cambrian_jax.config import ConfigError, tower_config
from cambrian_jax.model import Cambrian, static_layout
from cambrian_jax.towers import build_tower
from configs import cambrian_tiny, common

VIT = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
DINO = "facebook/dinov2-tiny-res28"                    # 28 px / patch 7 = 4×4, learned 5×5 position grid
CLIP = "openai/clip-tiny-patch7-28"                    # 4×4
SIGLIP = "siglip/tiny-7-36-interp16"                   # VALID conv: 36 px → 5×5, interpolated to 4×4
CONVNEXT_MULTI = "clip-convnext-tiny-multi-stage"      # 32 px: stage maps 8/4/2/1 → 8×8, to 4×4
CONVNEXT_SINGLE = "clip-convnext-tiny"                 # 64 px: last stage 2×2
OVERRIDES = {
    DINO: dict(patch_size=7, pos_grid=5, **VIT),
    CLIP: dict(image_size=28, patch_size=7, **VIT),
    SIGLIP: dict(image_size=36, patch_size=7, **VIT),
    CONVNEXT_MULTI: dict(image_size=32, depths=(1, 1, 1, 1), dims=(4, 4, 8, 8)),
    CONVNEXT_SINGLE: dict(image_size=64, depths=(1, 1, 1, 1), dims=(4, 4, 8, 8)),
}
TOKENS = {DINO: 16, CLIP: 16, SIGLIP: 0, CONVNEXT_MULTI: 16, CONVNEXT_SINGLE: 4}   # 0: from -interp


def model_dict(towers, **connector):
    """config.model for a tower set: the micro decoder, a one-layer SVA on a 2×2 grid, one aggregator."""
    m = cambrian_tiny.micro_model()
    m.towers = list(towers)
    m.tower_token_lens = [TOKENS[t] for t in towers]
    m.tower_overrides = {t: OVERRIDES[t] for t in towers}
    m.connector = common.connector(num=1, start=0, stride=1, vision_hidden_size=16, num_heads=2,
                                   query_num_list=[4], connector_depth=1, image_token_len=4)
    m.connector.update(connector)
    return m


def _prompt(cfg, seed):
    rng = np.random.default_rng(seed)
    return list(rng.integers(1, cfg.decoder.vocab_size, cfg.image_position)) + [-200] + list(
        rng.integers(1, cfg.decoder.vocab_size, 6))


def _pixels(cfg, batch, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, t.image_size, t.image_size, 3)).astype(np.float32) for t in cfg.towers]


def _forward(graphdef):
    @jax.jit
    def f(state, ids, pixels, masks, attn, pos):
        return nnx.merge(graphdef, state)(ids, pixels, masks, attn, pos)
    return f


def _build(towers):
    """(cfg, graphdef, state, jitted forward) with random numpy weights: no initialisation to compile."""
    cfg = config_lib.from_dict(model_dict(towers))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: np.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), abstract)
    return cfg, graphdef, state, _forward(graphdef)


def _inputs(cfg):
    batch = static_layout(cfg, [_prompt(cfg, 0), _prompt(cfg, 1)], [(320, 176), (176, 320)])  # masks in play
    return batch, _pixels(cfg, 2, 0)


def _logits(built, batch, pixels):
    cfg, _, state, f = built
    return np.asarray(f(state, batch["input_ids"], pixels, batch["tower_masks"], batch["attention_mask"],
                        batch["positions"]))


# ------------------------------------------------------------------------------------------ any set runs

@pytest.fixture(scope="module")
def dinov2_clip_convnext():
    return _build([DINO, CLIP, CONVNEXT_MULTI])


@pytest.fixture(scope="module")
def siglip_convnext_single():
    return _build([SIGLIP, CONVNEXT_SINGLE])


@pytest.mark.parametrize("name", ["dinov2_clip_convnext", "siglip_convnext_single"])
def test_any_tower_set_builds_validates_and_reads_every_tower(name, request):
    built = request.getfixturevalue(name)
    cfg, graphdef, state, _ = built
    assert [t.name for t in cfg.towers] == {"dinov2_clip_convnext": [DINO, CLIP, CONVNEXT_MULTI],
                                            "siglip_convnext_single": [SIGLIP, CONVNEXT_SINGLE]}[name]
    batch, pixels = _inputs(cfg)
    features = jax.eval_shape(lambda s, px: nnx.merge(graphdef, s).encode_images(px), state, pixels)
    assert [f.shape for f in features] == [(2, t.token_len, t.width) for t in cfg.towers]   # the config's order
    base = _logits(built, batch, pixels)
    assert np.isfinite(base).all()
    p, block = cfg.image_position, cfg.connector.block_len
    for k in range(len(cfg.towers)):   # every tower is read: new pixels for tower k alone move the answer
        other = list(pixels)
        other[k] = _pixels(cfg, 2, 10 + k)[k]
        moved = _logits(built, batch, other)
        np.testing.assert_array_equal(moved[:, :p], base[:, :p])       # text before the image never sees it
        assert np.abs(moved[:, p + block:] - base[:, p + block:]).max() > 1e-4, cfg.towers[k].name


def _permute_name(path: str, perm: dict[int, int]) -> str:
    """The parameter path of tower k under the new tower order: towers/k/…, *_aux_k, k_proj_k, pos_embed_k."""
    parts = path.split("/")
    if parts[0] == "towers":
        parts[1] = str(perm[int(parts[1])])
    out = []
    for part in parts:
        m = re.fullmatch(r"(mm_projector_aux|k_proj|v_proj|pos_embed)_(\d+)", part)
        out.append(f"{m.group(1)}_{perm[int(m.group(2))]}" if m else part)
    return "/".join(out)


def test_tower_order_only_renames_parameters(dinov2_clip_convnext):
    """[DINOv2, ConvNeXt, CLIP] with tower 1 and 2's weights swapped computes what [DINOv2, CLIP, ConvNeXt]
    does: the SVA's joint softmax does not depend on the key order; only the first tower is special (its
    mean is the global context)."""
    a_cfg, _, a_state, _ = dinov2_clip_convnext
    b_cfg = config_lib.from_dict(model_dict([DINO, CONVNEXT_MULTI, CLIP]))
    b_def, b_abstract = nnx.split(nnx.eval_shape(lambda: Cambrian(b_cfg, rngs=nnx.Rngs(0))))
    perm = {0: 0, 1: 2, 2: 1}
    renamed = {_permute_name("/".join(map(str, k)), perm): v for k, v in nnx.to_flat_state(a_state)}
    flat_b = nnx.to_flat_state(b_abstract)
    assert sorted(renamed) == sorted("/".join(map(str, k)) for k, _ in flat_b)
    for k, v in flat_b:
        assert renamed["/".join(map(str, k))].shape == v.shape, k
    b_state = nnx.from_flat_state([(k, renamed["/".join(map(str, k))]) for k, _ in flat_b])

    batch_a, px = _inputs(a_cfg)
    batch_b = static_layout(b_cfg, [_prompt(b_cfg, 0), _prompt(b_cfg, 1)], [(320, 176), (176, 320)])
    got_a = _logits(dinov2_clip_convnext, batch_a, px)
    got_b = _logits((b_cfg, b_def, b_state, _forward(b_def)), batch_b, [px[0], px[2], px[1]])
    np.testing.assert_allclose(got_b, got_a, rtol=1e-5, atol=1e-5 * np.abs(got_a).max())


# ------------------------------------------------------------------------------------------ names

DINOV2_SIZES = {   # facebook/dinov2-* config.json on the Hub: hidden, layers, heads, SwiGLU
    "small": (384, 12, 6, False), "base": (768, 12, 12, False), "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}


@pytest.mark.parametrize("size", list(DINOV2_SIZES))
def test_dinov2_at_any_size_matches_transformers(size):
    """Abstract only: our tower's output shape at -res224 and its parameter count against Dinov2Model."""
    hidden, layers, heads, swiglu = DINOV2_SIZES[size]
    t = tower_config(f"facebook/dinov2-{size}-res224", 256)
    assert (t.kind, t.hidden_size, t.num_layers, t.num_heads, t.use_swiglu) == ("dinov2", hidden, layers, heads, swiglu)
    assert (t.image_size, t.pos_grid, t.raw_side, t.side) == (224, 37, 16, 16)  # learned grid stays 518/14
    tower = nnx.eval_shape(lambda: build_tower(t, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(tower)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
    assert out.shape == (1, 256, hidden)
    ours = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(tower, nnx.Param)))
    with torch.device("meta"):
        hf = transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, use_swiglu_ffn=swiglu,
            image_size=518, patch_size=14))
    assert ours == sum(p.numel() for p in hf.parameters()) - hidden      # HF's unused mask_token


@pytest.mark.parametrize("name, token_len, want", [
    # name → (kind, image_size, raw grid side, token side, width)
    ("clip-convnext-XXL", 1024, ("convnext", 1024, 32, 32, 3072)),                      # single stage
    ("clip-convnext-XXL-multi-stage", 9216, ("convnext", 1024, 256, 96, 5760)),
    ("clip-convnext-L-multi-stage-res768", 576, ("convnext", 768, 192, 24, 2880)),      # -res: ConvNeXt honours it
    ("facebook/dinov2-large-res378-interp256", 576, ("dinov2", 378, 27, 16, 1024)),    # -interp wins
    ("openai/clip-vit-large-patch14-336-res224", 576, ("clip", 336, 24, 24, 1024)),     # CLIP ignores -res
    ("siglip/CLIP-ViT-SO400M-14-384-res224", 576, ("siglip", 384, 27, 24, 1152)),        # so does SigLIP
    ("siglip/CLIP-ViT-SO400M-14-384-interp729", 576, ("siglip", 384, 27, 27, 1152)),    # no interpolation
])
def test_tower_names_parse_like_the_reference(name, token_len, want):
    """Spec §2.1 and §14.5: -res<N> sets the input size of DINOv2 and ConvNeXt only; -interp<N> the tokens."""
    t = tower_config(name, token_len)
    assert (t.kind, t.image_size, t.raw_side, t.side, t.width) == want


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("towers, connector, edit, message", [
    ([DINO, CLIP], {}, lambda m: m.update(tower_token_lens=[16, 9]),
     rf"model\.towers\[1\] \({CLIP}\)\.token_len: the tower's grid side 3 is not a multiple of query group 0's"),
    ([CONVNEXT_SINGLE, DINO], dict(query_num_list=[16]), None,
     rf"model\.towers\[0\] \({CONVNEXT_SINGLE}\)\.token_len: the tower's grid side 2 is not a multiple of query"),
    ([CLIP, CONVNEXT_SINGLE], dict(query_num_list=[1], image_token_len=16), None,
     rf"model\.towers\[1\] \({CONVNEXT_SINGLE}\)\.token_len: .* LLM image grid side 4"),
    ([CLIP], {}, lambda m: m.update(towers=["siglip/tiny-7-36-interp15"],
                                    tower_overrides={"siglip/tiny-7-36-interp15": OVERRIDES[SIGLIP]}),
     r"model\.towers\[0\] \(siglip/tiny-7-36-interp15\)\.token_len: 15 is not a square"),
    ([DINO, CLIP], {}, lambda m: m.update(tower_token_lens=[16]), r"model\.tower_token_lens: has 1 entries for 2"),
    ([CLIP], {}, lambda m: m.update(towers=["facebook/mae-base"]), r"tower 'facebook/mae-base': unsupported tower"),
    ([CONVNEXT_MULTI], {}, lambda m: m.tower_overrides[CONVNEXT_MULTI].update(depths=(1, 1, 1)),
     r"model\.towers\[0\] \(clip-convnext-tiny-multi-stage\)\.depths"),
    ([CLIP], {}, lambda m: m.tower_overrides[CLIP].update(image_size=6),
     r"model\.towers\[0\] \(openai/clip-tiny-patch7-28\)\.image_size: 6 is smaller than the patch size 7"),
    ([CLIP], {}, lambda m: m.tower_overrides[CLIP].update(pathc_size=7),
     r"unknown override field\(s\) \['pathc_size'\]"),
])
def test_bad_windows_and_grids_fail_up_front_naming_the_field(towers, connector, edit, message):
    m = model_dict(towers, **connector)
    if edit is not None:
        edit(m)
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict(m)


def test_convnext_smaller_than_its_total_stride_is_a_config_error():
    m = model_dict([CONVNEXT_SINGLE], query_num_list=[1], image_token_len=1)
    m.tower_token_lens = [1]
    m.tower_overrides[CONVNEXT_SINGLE].update(image_size=16)
    with pytest.raises(ConfigError, match=r"towers\[0\].*image_size"):
        config_lib.from_dict(m)


def test_connector_only_allows_grids_the_llm_grid_does_not_divide():
    m = model_dict([CLIP], query_num_list=[16], image_token_len=9, connector_only=True)   # side 4, n = 3
    cfg = config_lib.from_dict(m)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))))
    batch = static_layout(cfg, [_prompt(cfg, 0)], [(64, 64)])
    out = jax.eval_shape(lambda s, px: nnx.merge(graphdef, s)(batch["input_ids"], px, batch["tower_masks"],
                                                               batch["attention_mask"], batch["positions"]),
                         state, _pixels(cfg, 1, 0))                      # traced only: nothing compiles
    assert out.shape == (1, batch["input_ids"].shape[1], cfg.decoder.vocab_size)
