"""The one FLOP formula (cambrian_jax/flops.py) against XLA's own count, and its bookkeeping.

XLA's cost analysis counts a loop body once, so the model here has one layer in every stack (tower,
SVA, decoder, one in-LLM aggregator): each scan's body runs exactly once and XLA's count is the whole
program's. Counts come from the lowered, unoptimised program: once optimised, a one-trip loop is
inlined and XLA may merge a remat's recomputation with the forward it repeats, which a real
multi-layer step never allows.

XLA computes the whole causal score matrix (the mask zeroes half of it), the formula counts the half
that matters: the expected figure adds the other half back. XLA also counts elementwise work (norms,
activations, softmax, the loss, the optimizer) that the formula leaves out, so its count lies at most
2.5 % above; a wrong multiplier (2× where 3×) would be off by more than 10 %.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from cambrian_jax import config as config_lib
from cambrian_jax import decoder, flops, optim
from cambrian_jax.model import Cambrian
from cambrian_jax.train_step import make_step, model_inputs
from configs import cambrian_8b, common

B = 2
ELEMENTWISE = 0.025      # XLA's count may exceed the formula's by this fraction, never fall below it

TOWER = {"siglip/one-layer-14-56": dict(image_size=56, patch_size=14, hidden_size=128, intermediate_size=256,
                                        num_layers=1, num_heads=4)}


def one_layer_model(remat: str = "none") -> config_lib.CambrianConfig:
    return config_lib.from_dict(dict(
        towers=list(TOWER), tower_token_lens=[16], tower_overrides=TOWER, select_layer=-2,
        connector=common.connector(num=1, start=0, stride=1, vision_hidden_size=64, num_heads=4,
                                   query_num_list=[16], connector_depth=1, image_token_len=16),
        decoder=dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
                     num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512,
                     rope_scaling=None),
        image_position=4, max_len=128, dtype="float32", remat=remat))


def batch(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    t = cfg.max_len
    out = dict(input_ids=jax.ShapeDtypeStruct((B, t), jnp.int32), labels=jax.ShapeDtypeStruct((B, t), jnp.int32),
               attention_mask=jax.ShapeDtypeStruct((B, t), jnp.bool_),
               positions=jax.ShapeDtypeStruct((B, t), jnp.int32))
    for k, tower in enumerate(cfg.towers):
        out[f"pixels_{k}"] = jax.ShapeDtypeStruct((B, tower.image_size, tower.image_size, 3), jnp.float32)
        out[f"tower_mask_{k}"] = jax.ShapeDtypeStruct((B, tower.token_len), jnp.bool_)
    return out


def masked_half(cfg) -> float:
    """Per sample: the half of the causal score matrix (scores and weighted values) XLA also computes."""
    return cfg.decoder.num_layers * flops.decoder_layer_forward(cfg, cfg.max_len)["attention"]


def xla_train_flops(cfg, trainable: list[str]) -> tuple[float, list[str]]:
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    train, frozen = nnx.split_state(params, optim.trainable_filter(trainable), ...)
    tx = optax.sgd(0.1)
    state = dict(params=train, opt=jax.eval_shape(tx.init, train), step=jax.ShapeDtypeStruct((), jnp.int32))
    step = make_step(graphdef, tx, cfg.towers, accum_steps=1)
    lowered = jax.jit(step.train).lower(state, frozen, batch(cfg))
    paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(train)]
    return lowered.cost_analysis()["flops"], paths


def check(xla: float, expected: float, what: str) -> None:
    ratio = xla / expected
    assert 1.0 <= ratio <= 1.0 + ELEMENTWISE, f"{what}: XLA {xla:.4e} vs formula {expected:.4e} (ratio {ratio:.4f})"


def test_forward_matches_xla():
    cfg = one_layer_model()
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param)

    def forward(p, b):
        return nnx.merge(graphdef, p)(**model_inputs(b, cfg.towers))

    xla = jax.jit(forward).lower(params, batch(cfg)).cost_analysis()["flops"]
    connector, aggregators = flops.connector_forward(cfg)
    per_sample = (sum(flops.tower_forward(t) for t in cfg.towers) + connector + aggregators
                  + flops.decoder_forward(cfg, cfg.max_len))
    check(xla, B * (per_sample + masked_half(cfg)), "forward")


@pytest.mark.parametrize("stage, trainable", [(1, [common.CONNECTOR]), (2, [common.CONNECTOR, common.DECODER])])
def test_train_step_matches_xla(stage, trainable):
    """Stage 1 crosses the frozen decoder (2× its weights' forward, 3× its attention); stage 2 trains it."""
    cfg = one_layer_model()
    xla, paths = xla_train_flops(cfg, trainable)
    expected = flops.train_flops_per_step(cfg, B, paths) + B * 3 * masked_half(cfg)
    expected += B * flops.recompute_flops_per_sample(cfg, cfg.max_len)     # the aggregator's, always
    check(xla, expected, f"stage {stage}")


@pytest.mark.parametrize("remat", ["full", "qkv_and_outputs"])
def test_remat_recompute_matches_xla(remat):
    cfg = one_layer_model(remat)
    xla, paths = xla_train_flops(cfg, [common.CONNECTOR, common.DECODER])
    recomputes_attention = "attention" in flops.RECOMPUTED[remat]
    expected = (flops.train_flops_per_step(cfg, B, paths) + B * (3 + recomputes_attention) * masked_half(cfg)
                + B * flops.recompute_flops_per_sample(cfg, cfg.max_len))
    check(xla, expected, f"remat {remat}")


def test_one_formula_for_every_stage():
    cfg = config_lib.from_dict(cambrian_8b.get_config("data1=/d1,data2=/d2").model)
    towers = sum(flops.tower_forward(t) for t in cfg.towers)
    connector, aggregators = flops.connector_forward(cfg)
    decoder = flops.decoder_forward(cfg, 2048)
    attention = cfg.decoder.num_layers * flops.decoder_layer_forward(cfg, 2048)["attention"]
    s1 = flops.train_flops_per_sample(cfg, 2048, train_decoder=False)
    s2 = flops.train_flops_per_sample(cfg, 2048, train_decoder=True)
    assert s1 == pytest.approx(towers + 3 * (connector + aggregators) + 2 * (decoder - attention) + 3 * attention)
    assert s2 - s1 == pytest.approx(decoder - attention)
    assert flops.train_flops_per_sample(cfg, 2048, train_decoder=True, train_towers=True) - s2 == pytest.approx(
        2 * towers)
    # The step's count follows the trainable paths.
    assert flops.train_flops_per_step(cfg, 512, ["connector/x", "decoder/y"]) == pytest.approx(512 * s2)
    # Causal attention counts half the score matrix: 8B decoder = 2·N·T + half of 4·T²·H per layer.
    d = cfg.decoder
    n = d.num_layers * (2 * d.hidden_size * d.num_heads * d.head_size + 2 * d.hidden_size * d.num_kv_heads
                        * d.head_size + 3 * d.hidden_size * d.intermediate_size) + d.hidden_size * d.vocab_size
    assert decoder == pytest.approx(2 * 2048 * n + d.num_layers * 2 * 2048 * 2048 * d.num_heads * d.head_size)
    assert 7e9 < n < 8.1e9


def test_recompute_follows_the_policy():
    cfg = one_layer_model()
    parts = flops.decoder_layer_forward(cfg, cfg.max_len)
    aggregators_only = flops.recompute_flops_per_sample(cfg, cfg.max_len)
    assert aggregators_only > 0          # the in-LLM aggregator is checkpointed whatever the policy
    for policy, recomputed in flops.RECOMPUTED.items():
        c = one_layer_model(policy)
        assert flops.recompute_flops_per_sample(c, c.max_len) - aggregators_only == pytest.approx(
            sum(parts[k] for k in recomputed)), policy
    assert set(flops.RECOMPUTED) == set(decoder.REMAT_POLICIES)
    with pytest.raises(ValueError, match="remat policy 'bogus'"):
        flops.recompute_flops_per_sample(dataclasses.replace(cfg, remat="bogus"), cfg.max_len)
