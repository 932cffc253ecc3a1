"""Per-tower preprocessing (spec §2.2) against a direct PIL/numpy computation, and its masks (§3.5)."""
import numpy as np
import pytest
from PIL import Image

from cambrian_jax import layout, preprocess as P
from cambrian_jax.data.testing import released_towers, tiny_model_config


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _direct(img, tower):
    """expand2square by numpy, PIL bicubic resize, /255, (x - mean) / std."""
    a = np.asarray(img)
    h, w, _ = a.shape
    side = max(w, h)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = tower.pad_color
    top, left = ((w - h) // 2, 0) if w > h else (0, (h - w) // 2)
    canvas[top:top + h, left:left + w] = a
    r = tower.image_size
    x = np.asarray(Image.fromarray(canvas).resize((r, r), Image.BICUBIC), np.float32) / np.float32(255)
    return (x - np.float32(tower.image_mean)) / np.float32(tower.image_std)


@pytest.mark.parametrize("size", [(320, 176), (176, 320), (101, 50), (64, 64)])
def test_preprocess_matches_direct_computation(size):
    img = _image(*size)
    towers = released_towers()[:3]   # SigLIP 384 (CLIP pad colour), CLIP 336, DINOv2 378 (ImageNet pad colour)
    assert [t.image_size for t in towers] == [384, 336, 378]
    assert towers[0].pad_color == (122, 116, 104) and towers[2].pad_color == (123, 116, 103)
    for t, px in zip(towers, P.preprocess_towers(img, towers)):
        assert px.dtype == np.float32 and px.shape == (t.image_size, t.image_size, 3)
        np.testing.assert_allclose(px, _direct(img, t), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(px, P.preprocess(img, t))


def test_expand2square_offset_and_colour():
    img = Image.new("RGB", (101, 50), (255, 0, 0))
    sq = np.asarray(P.expand2square(img, (1, 2, 3)))
    assert sq.shape == (101, 101, 3)
    rows = np.flatnonzero((sq == (255, 0, 0)).all(-1).any(1))
    assert rows[0] == (101 - 50) // 2 == 25 and rows[-1] == 74
    assert (sq[0, 0] == (1, 2, 3)).all()


def test_mode_conversions():
    rgb = np.full((8, 8, 3), (200, 100, 50), np.uint8)
    # CMYK and palette convert like PIL; greyscale replicates the channel.
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert P.to_rgb(cmyk).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(P.to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    grey = Image.fromarray(np.full((8, 8), 77, np.uint8), "L")
    assert (np.asarray(P.to_rgb(grey)) == 77).all()
    assert (np.asarray(P.to_rgb(Image.new("1", (4, 4), 1))) == 255).all()
    # Transparency is composited over white, not exposed as the hidden colour.
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, 3] = 255
    rgba[:4, :, 0] = 255
    out = np.asarray(P.to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:4] == (255, 0, 0)).all() and (out[4:] == 255).all()
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[7, 0])
    assert (np.asarray(P.to_rgb(pal))[7, 0] == 255).all()
    # 16-bit greyscale keeps its range (PIL's own conversion would clip everything above 255 to white).
    wide = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert wide.mode == "I;16" and np.asarray(P.to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    wide32 = Image.fromarray(np.array([[0, 32896, 65535]], np.int32))
    assert np.asarray(P.to_rgb(wide32))[0, :, 0].tolist() == [0, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(P.to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_modes_and_their_masks():
    cfg = tiny_model_config(14)
    t = cfg.towers[0]
    img = _image(320, 176)
    squash = P.preprocess(img, t, "resize")
    np.testing.assert_allclose(squash, P.normalize(img.resize((t.image_size,) * 2, Image.BICUBIC),
                                                   t.image_mean, t.image_std), atol=1e-6)
    crop = P.preprocess(img, t, "resize_crop")
    assert crop.shape == (t.image_size, t.image_size, 3)
    for mode in ("resize", "resize_crop"):
        masks, block = P.image_masks((320, 176), cfg.towers, 2, mode)
        assert all(m.all() for m in masks) and block.all()
    masks, block = P.image_masks((320, 176), cfg.towers, 2, "pad")
    for m, tw in zip(masks, cfg.towers):
        np.testing.assert_array_equal(m, layout.grid_mask((320, 176), tw.side))
    assert not masks[3].all()                       # 8×8 ConvNeXt grid: 320×176 pads rows
    np.testing.assert_array_equal(block, layout.block_mask((320, 176), 2))
    with pytest.raises(ValueError):
        P.preprocess(img, t, "crop")


def test_extreme_aspect_keeps_a_band():
    # 400×10 is beyond 8:1 for an 8×8 grid, where the reference's formula leaves nothing.
    with pytest.raises(ValueError):
        layout.grid_mask((400, 10), 8)
    m = P.image_masks((400, 10), tiny_model_config(14).towers, 2)[0][3].reshape(8, 8)
    assert m.any() and m.all(axis=1).sum() in (1, 2)
