"""Activation sharding constraints: `sharding.constrain` in model code, resolved by `rules_context`.

  resolution   activation names → mesh axes by the rules table, hand-built cases on an abstract mesh
  no-op        without a context the traced model holds no sharding op and `constrain` returns its input
  coverage     every name the model pins has a rule (DEFAULT_RULES and the configs' copy)
  on a mesh    4 simulated CPU devices, fsdp=2 × tensor=2 (a subprocess: the device count is fixed at
               import): the whole model's logits equal the single-device ones (1e-5 × max|ref|), the
               lowered program holds one constraint per `constrain` call, and the logits come out
               split as the rules say
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from cambrian_jax import config as config_lib
from cambrian_jax import sharding
from cambrian_jax.model import Cambrian, static_layout
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two towers (a ViT and a multi-stage ConvNeXt), the SVA connector, one in-LLM aggregator, a GQA decoder.
TOWERS = {"siglip/t": dict(image_size=14, patch_size=7, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2),
          "clip-convnext-t-multi-stage": dict(image_size=32, depths=(1, 1, 1, 1), dims=(4, 8, 8, 8))}
MODEL = dict(towers=list(TOWERS), tower_token_lens=[4, 16], tower_overrides=TOWERS, select_layer=-2,
             connector=dict(vision_hidden_size=16, num_heads=4, query_num_list=[4], connector_depth=1,
                            image_token_len=4, num_of_vision_sampler_layers=1, start_of_vision_sampler_layers=0,
                            stride_of_vision_sampler_layers=1),
             decoder=dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048),
             image_position=2, max_len=64)
IDS = [[5, 6, -200, 7, 8, 9], [10, 11, -200, 12, 13, 14]]
SIZES = [(320, 176), (176, 320)]


def _setup(model_dict):
    """(graphdef, abstract state, forward(state, batch, pixels), batch, pixels) for the tiny model."""
    cfg = config_lib.from_dict(model_dict)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))))
    layout = static_layout(cfg, IDS, SIZES)
    batch = {k: layout[k] for k in ("input_ids", "tower_masks", "attention_mask", "positions")}
    rng = np.random.default_rng(0)
    pixels = [rng.standard_normal((len(IDS), t.image_size, t.image_size, 3)).astype(np.float32)
              for t in cfg.towers]

    def forward(state, batch, pixels):
        return nnx.merge(graphdef, state)(batch["input_ids"], pixels, batch["tower_masks"],
                                          batch["attention_mask"], batch["positions"])

    return graphdef, abstract, forward, batch, pixels


# -------------------------------------------------------------------------------------- resolution

def test_activation_names_resolve_by_the_rules_table():
    mesh = AbstractMesh((1, 2, 2), sharding.MESH_AXES)
    rules = sharding.DEFAULT_RULES

    def spec(names, shape):
        return sharding.logical_spec(names, shape, rules, mesh)

    residual = ("activation_batch", "activation_length", "activation_embed")
    # Rows over data × fsdp; the residual stream whole on every tensor shard (Megatron layout).
    assert spec(residual, (4, 7, 32)) == P(("data", "fsdp"), None, None)
    assert spec(("activation_batch", "activation_length", "activation_heads", "activation_head_dim"),
                (4, 7, 8, 16)) == P(("data", "fsdp"), None, "tensor", None)
    assert spec(("activation_batch", "activation_length", "activation_mlp"), (4, 7, 64)) == \
        P(("data", "fsdp"), None, "tensor")
    assert spec(("activation_batch", "activation_length", "activation_vocab"), (4, 7, 96)) == \
        P(("data", "fsdp"), None, "tensor")
    # Dimensions no rule divides stay whole: one row (generation), one kv head, an odd vocabulary.
    assert spec(residual, (1, 7, 32)) == P(None, None, None)
    assert spec(("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"),
                (4, 7, 1, 16)) == P(("data", "fsdp"), None, None, None)
    assert spec(("activation_batch", "activation_length", "activation_vocab"), (4, 7, 97)) == \
        P(("data", "fsdp"), None, None)


def test_configs_copy_the_activation_rules():
    names = {name for name, _ in sharding.DEFAULT_RULES if name.startswith("activation_")}
    assert names == {"activation_batch", "activation_length", "activation_embed", "activation_heads",
                     "activation_kv_heads", "activation_head_dim", "activation_mlp", "activation_vocab"}
    assert [tuple(r) for r in common.SHARDING_RULES] == list(sharding.DEFAULT_RULES)


def test_constrain_checks_one_name_per_axis():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"\('activation_batch',\) do not match an activation of shape \(2, 3\)"):
        sharding.constrain(x, ("activation_batch",))


# ---------------------------------------------------------------------------------- no-op / coverage

@pytest.fixture(scope="module")
def tiny():
    return _setup(MODEL)


def test_without_a_context_constrain_is_the_identity(tiny):
    _, abstract, forward, batch, pixels = tiny
    x = jnp.ones((2, 3, 4))
    assert sharding.constrain(x, ("activation_batch", "activation_length", "activation_embed")) is x
    jaxpr = str(jax.make_jaxpr(forward)(abstract, batch, pixels))
    assert "sharding_constraint" not in jaxpr


def test_every_pinned_activation_has_a_rule(tiny):
    _, abstract, forward, batch, pixels = tiny
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    seen = []
    with sharding.rules_context(sharding.DEFAULT_RULES, mesh) as pin:
        resolve = pin.spec
        pin.spec = lambda names, shape: (seen.append(tuple(names)), resolve(names, shape))[1]
        jaxpr = str(jax.make_jaxpr(forward)(abstract, batch, pixels))
    # One sharding op per call, in every part of the model (towers, aggregator, decoder scan).
    assert jaxpr.count("sharding_constraint[") == len(seen) > 0
    used = {n for names in seen for n in names if n is not None}
    assert used == {"activation_batch", "activation_length", "activation_embed", "activation_heads",
                    "activation_kv_heads", "activation_head_dim", "activation_mlp", "activation_vocab"}
    for rules in (sharding.DEFAULT_RULES, common.SHARDING_RULES):
        assert used <= {name for name, _ in rules}


# -------------------------------------------------------------------------------------- on a mesh

MESH_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {root!r})
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import NamedSharding, PartitionSpec as P
from cambrian_jax import sharding
from configs import common
from tests.test_sharding_activations import _setup

graphdef, abstract, forward, batch, pixels = _setup(json.loads({model!r}))
rng = np.random.default_rng(1)
state = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
plain = np.asarray(jax.jit(forward)(state, batch, pixels))        # one device, nothing pinned

mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
state = jax.device_put(state, sharding.state_shardings(state, common.SHARDING_RULES, mesh))
calls = []
with sharding.rules_context(common.SHARDING_RULES, mesh) as pin:
    resolve = pin.spec
    pin.spec = lambda names, shape: (calls.append(1), resolve(names, shape))[1]
    lowered = jax.jit(forward).lower(state, batch, pixels)
    out = lowered.compile()(state, batch, pixels)
text = lowered.as_text()
ops = [line.split("<@mesh, ", 1)[1].split(">", 1)[0] for line in text.splitlines() if "sdy.sharding_constraint" in line]
print("RESULT", json.dumps(dict(
    diff=float(np.abs(np.asarray(out) - plain).max()), scale=float(np.abs(plain).max()),
    calls=len(calls), ops=len(ops) + text.count("@Sharding"), layouts=sorted(set(ops)),
    logits_split=out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3))))
"""


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory):
    script = tmp_path_factory.mktemp("mesh") / "mesh.py"
    script.write_text(MESH_SCRIPT.format(root=ROOT, model=json.dumps(MODEL)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                         cwd=ROOT)
    print(run.stdout[-2000:], run.stderr[-3000:])
    assert run.returncode == 0 and "RESULT" in run.stdout
    return json.loads(run.stdout.split("RESULT", 1)[1])


def test_pinned_model_on_a_mesh_gives_the_same_logits(on_mesh):
    assert on_mesh["diff"] <= 1e-5 * max(1.0, on_mesh["scale"]), on_mesh


def test_lowered_program_holds_the_constraints(on_mesh):
    assert on_mesh["ops"] == on_mesh["calls"] > 0, on_mesh
    # Residual stream and tower tokens; q/k/v heads; MLP hidden and logits; ConvNeXt maps and their MLP.
    assert set(on_mesh["layouts"]) >= {
        '[{"data", "fsdp"}, {}, {}]',
        '[{"data", "fsdp"}, {}, {"tensor"}, {}]',
        '[{"data", "fsdp"}, {}, {"tensor"}]',
        '[{"data", "fsdp"}, {}, {}, {}]',
        '[{"data", "fsdp"}, {}, {}, {"tensor"}]'}, on_mesh["layouts"]
    assert on_mesh["logits_split"]
