"""Image modes (issue 8, Prismatic's comparison): `pad` (the reference), `resize` (squash), `resize_crop`.

Checked here beyond tests/test_data_preprocess.py: resize_crop against Hugging Face's CLIP image
processor, and that the training batches and the generation/evaluation layout both follow the
chosen mode — pixels as `preprocess` makes them, padding masks only under `pad`.
"""
from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image

from cambrian_jax import layout
from cambrian_jax import preprocess as P
from cambrian_jax.config import CLIP_MEAN, CLIP_STD
from cambrian_jax.data import pipeline, synthetic, templates
from cambrian_jax.data.testing import tiny_model_config
from cambrian_jax.generate import layout_rows


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _clip_processor(r):
    """HF CLIPImageProcessor (PIL backend): shortest side → r (bicubic), centre crop r×r, normalise."""
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": r}, crop_size={"height": r, "width": r},
                                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def _ours(img, r):
    return P.normalize(P.resized(img, r, (0, 0, 0), "resize_crop"), CLIP_MEAN, CLIP_STD)


# (W, H, R) where R·long/short has a fractional part below one half, and where it is at least one half.
EXACT = [(320, 176, 42), (176, 320, 42), (101, 50, 56), (333, 250, 28), (64, 64, 56), (300, 200, 30)]
ROUNDED_UP = [(320, 176, 28), (176, 320, 56), (101, 50, 28), (333, 250, 42)]


@pytest.mark.parametrize("w, h, r", EXACT)
def test_resize_crop_equals_clip_image_processor(w, h, r):
    img = _image(w, h)
    ref = _clip_processor(r)(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(_ours(img, r), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("w, h, r", ROUNDED_UP)
def test_resize_crop_equals_clip_image_processor_when_the_long_side_rounds_up(w, h, r):
    img = _image(w, h)
    ref = _clip_processor(r)(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(_ours(img, r), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ batches

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    tok = synthetic.build_tiny_tokenizer(tok_dir, "phi3")
    cfg = tiny_model_config(templates.image_position("phi3", tok), max_len=128, vocab_size=len(tok))
    # The synthetic sizes include wide and tall ones (320×176, 176×320, 256×144), whose padding the
    # 8×8 ConvNeXt grid and the 2×2 LLM grid see.
    samples = synthetic.generate(8, tasks=("count", "depth"))
    return dict(cfg=cfg, tok_dir=tok_dir, samples=samples)


def _batch(env, mode):
    data = pipeline.data_config(tokenizer_dir=env["tok_dir"], template="phi3", global_batch_size=8,
                                shuffle=False, image_mode=mode, with_index=True)
    return next(pipeline.make_memory_dataset(env["samples"], data, env["cfg"]))


@pytest.mark.parametrize("mode", P.MODES)
def test_training_batches_follow_the_image_mode(env, mode):
    cfg, b = env["cfg"], _batch(env, mode)
    p, n = cfg.image_position, cfg.connector.grid
    padded = 0
    for row, index in enumerate(b["index"]):
        img = env["samples"][int(index)]["image"]
        for k, t in enumerate(cfg.towers):
            np.testing.assert_array_equal(b[f"pixels_{k}"][row], P.preprocess(img, t, mode), err_msg=f"{mode} {k}")
            want = layout.grid_mask(img.size, t.side) if mode == "pad" else np.ones(t.token_len, bool)
            np.testing.assert_array_equal(b[f"tower_mask_{k}"][row], want, err_msg=f"{mode} tower {k}")
        block = b["attention_mask"][row, p:p + n * (n + 1)]
        np.testing.assert_array_equal(block, layout.block_mask(img.size, n) if mode == "pad" else True)
        padded += not b[f"tower_mask_{len(cfg.towers) - 1}"][row].all()
    assert (padded > 0) == (mode == "pad")        # the batch does hold images whose padding is masked


def _prompt(cfg):
    return list(range(1, cfg.image_position + 1)) + [-200, 5, 6, 7]


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("size", [(320, 176), (176, 320), (240, 240)])
def test_generation_sees_what_training_saw(env, mode, size):
    """The evaluation's layout (generate.layout_rows) gives the same pixels and masks as the batches."""
    cfg = env["cfg"]
    img = _image(*size)
    tower_masks, block = P.image_masks(size, cfg.towers, cfg.connector.grid, mode)
    rows = layout_rows(cfg, [_prompt(cfg)], [img], mode)
    p = cfg.image_position
    np.testing.assert_array_equal(rows.mask[0, p:p + cfg.connector.block_len], block)
    for k, t in enumerate(cfg.towers):
        np.testing.assert_array_equal(rows.tower_masks[k][0], tower_masks[k], err_msg=f"tower {k}")
        np.testing.assert_array_equal(rows.pixels[k][0], P.preprocess(img, t, mode))


def test_generation_sees_what_training_saw_for_elongated_images(env):
    cfg = env["cfg"]
    size = (400, 60)
    tower_masks, _ = P.image_masks(size, cfg.towers, cfg.connector.grid, "pad")
    rows = layout_rows(cfg, [_prompt(cfg)], [_image(*size)], "pad")
    for k in range(len(cfg.towers)):
        np.testing.assert_array_equal(rows.tower_masks[k][0], tower_masks[k], err_msg=f"tower {k}")
