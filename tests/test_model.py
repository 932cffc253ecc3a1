"""The whole tiny Cambrian: forward is finite and deterministic, and the layout behaves as spec §3.5/§4 says."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cambrian_jax import config as config_lib
from cambrian_jax import layout
from cambrian_jax.config import IMAGE_TOKEN_INDEX, ConfigError
from cambrian_jax.model import Cambrian, init_model, static_layout
from configs import cambrian_8b, cambrian_34b, cambrian_tiny


@pytest.fixture(scope="module")
def cfg():
    return config_lib.from_dict(cambrian_tiny.get_config().model)


@pytest.fixture(scope="module")
def model(cfg):
    return init_model(cfg, 0)


@pytest.fixture(scope="module")
def forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, input_ids, pixels, tower_masks, attention_mask, positions):
        return nnx.merge(graphdef, state)(input_ids, pixels, tower_masks, attention_mask, positions)

    return lambda batch, pixels: f(state, batch["input_ids"], pixels, batch["tower_masks"],
                                   batch["attention_mask"], batch["positions"])


def _pixels(cfg, batch, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, t.image_size, t.image_size, 3)).astype(np.float32) for t in cfg.towers]


def _prompt(cfg, rng, after=10):
    before = rng.integers(1, cfg.decoder.vocab_size, cfg.image_position)
    rest = rng.integers(1, cfg.decoder.vocab_size, after)
    return np.concatenate([before, [IMAGE_TOKEN_INDEX], rest])


def test_forward_finite_deterministic_and_causal_around_the_image(cfg, forward):
    rng = np.random.default_rng(0)
    ids = [_prompt(cfg, rng), _prompt(cfg, rng)]
    batch = static_layout(cfg, ids, [(320, 176), (176, 320)])
    a = np.asarray(forward(batch, _pixels(cfg, 2, 1)))
    again = np.asarray(forward(batch, _pixels(cfg, 2, 1)))
    b = np.asarray(forward(batch, _pixels(cfg, 2, 2)))
    p, block = cfg.image_position, cfg.connector.block_len
    assert a.shape == (2, len(ids[0]) - 1 + block, cfg.decoder.vocab_size)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, again)
    # Text before the image cannot see it; text after it must.
    np.testing.assert_array_equal(a[:, :p], b[:, :p])
    assert np.abs(a[:, p + block:] - b[:, p + block:]).max() > 1e-4


def test_text_only_rows_equal_the_llm_alone(cfg, model, forward):
    rng = np.random.default_rng(1)
    text = rng.integers(1, cfg.decoder.vocab_size, cfg.image_position + 7)
    batch = static_layout(cfg, [text], [None])
    got = np.asarray(forward(batch, _pixels(cfg, 1, 3)))
    keep = batch["attention_mask"][0]
    dec = model.decoder
    t = len(text)
    ref = dec.logits(dec(dec.embed(jnp.asarray(text)[None]), jnp.arange(t)[None], jnp.ones((1, t), bool)))
    np.testing.assert_allclose(got[0, keep], np.asarray(ref[0]), atol=1e-5, rtol=1e-5)


def test_positions_skip_masked_block_cells(cfg):
    n, p = cfg.connector.grid, cfg.image_position
    rng = np.random.default_rng(2)
    batch = static_layout(cfg, [_prompt(cfg, rng, after=3)], [(256, 144)])
    block = layout.block_mask((256, 144), n)
    assert not block.all()  # 256×144 on a 4-grid pads whole rows
    np.testing.assert_array_equal(batch["attention_mask"][0, p:p + n * (n + 1)], block)
    first_after = p + n * (n + 1)
    assert batch["positions"][0, first_after] == p + block.sum()


def test_padding_formula_float_order_and_kept_band():
    # int(H * (S / W)), not int(H*S/W): 176×110 at S=24 keeps 14 rows, not 15 (spec §3.5).
    assert layout.padding((176, 110), 24) == ("rows", 5)
    # 320×176: new = 13, pad = 5, kept band 24 - 2·5 = 14 = new + 1.
    axis, pad = layout.padding((320, 176), 24)
    assert (axis, 24 - 2 * pad) == ("rows", 14)
    assert layout.grid_mask((320, 176), 24).reshape(24, 24).any(axis=1).sum() == 14
    tall = layout.grid_mask((176, 320), 24).reshape(24, 24)
    assert tall.any(axis=0).sum() == 14 and tall.all(axis=0).sum() == 14
    with pytest.raises(ValueError, match="too elongated"):
        layout.padding((2000, 10), 24)


def _tiny_dict():
    return cambrian_tiny.get_config().model


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(tower_token_lens=[16, 16, 16, 36]), "towers[3]"),          # 6 % 4 != 0
    (lambda d: d.connector.update(num_heads=5), "vision_hidden_size"),
    (lambda d: d.decoder.update(num_kv_heads=3), "num_kv_heads"),
    (lambda d: d.update(image_position=90), "image_position"),                      # 90 + 20 > 96
    (lambda d: d.connector.update(num_of_vision_sampler_layers=3), "num_of_vision_sampler_layers"),
    (lambda d: d.connector.update(query_num_list=[16, 4]), "query_num_list"),
])
def test_config_errors_name_the_field(edit, field):
    d = _tiny_dict()
    edit(d)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config_lib.from_dict(d)


@pytest.mark.parametrize("module, connector_params", [(cambrian_8b, 302_760_960), (cambrian_34b, 375_085_056)])
def test_released_geometry_builds_abstractly(module, connector_params):
    cfg = config_lib.from_dict(module.get_config().model)
    cfg = dataclasses.replace(cfg, dtype="float32")
    abstract = nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0)))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract.connector, nnx.Param)))
    assert count == connector_params  # spec §5.5
