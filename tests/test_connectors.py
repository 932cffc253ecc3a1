"""The connector types of `model.connector.type` (connector.build_connector), CPU, float32.

  mlp2x_gelu   vs torch nn.Sequential(Linear, GELU, Linear) loaded with our exported
               `model.mm_projector.{0,2}` tensors (LLaVA-1.5 / the reference's non-SVA path); 1e-5
  concat       vs a transcription: torch F.interpolate (bilinear, align_corners=False, the reference's
               tower-token resize) of each tower, channel concat and the MLP in numpy float64; 1e-5
  interleave   a hand-built case whose order is visible in the output values, and a transcription
  resampler    vs a numpy float64 transcription of the layers (learned queries, global multi-head
               cross-attention, explicit softmax); 1e-5. Permuting a tower's tokens leaves its
               output unchanged (1e-5) and changes the SVA's (the spatial inductive bias)
  whole model  each type in a tiny Cambrian: finite, text before the image unaffected by it, every
               connector parameter gets a gradient through the LLM loss
  checkpoints  mlp2x_gelu / concat export → import is bit-identical; interleave / resampler refuse
  FLOPs        flops.connector_forward vs XLA's cost_analysis of the connector forward alone
"""
import dataclasses
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cambrian_jax import config as config_lib
from cambrian_jax import flops, optim
from cambrian_jax.config import IMAGE_TOKEN_INDEX, CambrianConfig, ConfigError, ConnectorConfig, DecoderConfig
from cambrian_jax.connector import Connector, build_connector
from cambrian_jax.interleave import InterleaveConnector, interleave
from cambrian_jax.model import Cambrian, static_layout
from cambrian_jax.projector import MLPConnector
from cambrian_jax.resampler import ResamplerConnector
from cambrian_jax.train_step import token_losses
from configs import cambrian_tiny, common

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-5
NON_SVA = ("mlp2x_gelu", "concat", "interleave", "resampler")


# ------------------------------------------------------------------------------------------- helpers

def randomize(module, seed=0, scale=0.5):
    """Every parameter (LayerNorm γ/β included) random, so no weight is trivial."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        var.set_value(jnp.asarray(rng.normal(size=var.shape) * scale, jnp.float32))
    return module


def build(make, seed=0, scale=0.5):
    """Construct abstractly (no random-init compile), then fill every parameter with random values."""
    return randomize(nnx.eval_shape(make), seed, scale)


def np_params(module):
    return {"/".join(map(str, p)): np.asarray(v[...], np.float64)
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@nnx.jit
def run(module, features, masks):
    return module(features, masks)[0]


def features(sides, widths, b=2, seed=1):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(b, s * s, c)), jnp.float32) for s, c in zip(sides, widths)]


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def layer_norm(x, p, prefix, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p[prefix + "scale"] + p[prefix + "bias"]


def linear(x, p, prefix):
    y = x @ p[prefix + "kernel"]
    return y + p[prefix + "bias"] if prefix + "bias" in p else y


def mlp(x, p, prefix):
    return linear(gelu(linear(x, p, prefix + "0/")), p, prefix + "2/")


def torch_resize(tokens, rows, cols):
    """[B, s², C] → [B, rows·cols, C] with the reference's F.interpolate(bilinear, align_corners=False)."""
    b, t, c = tokens.shape
    s = math.isqrt(t)
    x = torch.from_numpy(np.asarray(tokens, np.float64)).reshape(b, s, s, c).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(rows, cols), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(b, rows * cols, c).numpy()


def with_newlines(x, newline, n):
    b, _, h = x.shape
    return np.concatenate([x.reshape(b, n, n, h), np.broadcast_to(newline, (b, n, 1, h))], 2).reshape(b, -1, h)


def assert_close(got, want, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * max(1.0, np.abs(want).max()), err_msg=what)


def tower(k, side, width):
    """A tower config of the given token grid and width (connector tests build no tower)."""
    return config_lib.tower_config(f"openai/clip-test-{k}", side * side, hidden_size=width, intermediate_size=2 * width,
                                   num_layers=1, num_heads=1, image_size=28, patch_size=7)


def model_config(kind, sides, widths, n, *, v=8, heads=2, depth=2, hidden=12) -> CambrianConfig:
    sva = kind == "sva"
    con = ConnectorConfig(type=kind, vision_hidden_size=v, num_heads=heads, query_num_list=(n * n,),
                          connector_depth=depth, image_token_len=n * n, connector_only=not sva,
                          num_of_vision_sampler_layers=1 if sva else 0, stride_of_vision_sampler_layers=1)
    dec = DecoderConfig(vocab_size=32, hidden_size=hidden, intermediate_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=1)
    return CambrianConfig(towers=tuple(tower(k, s, c) for k, (s, c) in enumerate(zip(sides, widths))),
                          connector=con, decoder=dec, image_position=0, max_len=1024).validate()


# ------------------------------------------------------------------------------------ 1. mlp2x_gelu

def test_mlp2x_gelu_equals_llava_sequential_with_the_exported_names():
    from cambrian_jax.convert import cambrian_hf

    n, c, h = 3, 10, 12
    cfg = model_config("mlp2x_gelu", [n], [c], n, hidden=h)
    con = build(lambda: build_connector(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(con, MLPConnector) and con.vision_sampler_layers is None
    f = features([n], [c])
    got = np.asarray(run(con, f, None))

    # The tensors our exporter writes, under the reference's names, load strictly into LLaVA's projector.
    flat = {"connector/" + k: v for k, v in np_params(con).items()}
    entries = cambrian_hf.connector_entries(flat, lambda p: flat[p])
    assert sorted(k for k, _, _ in entries) == ["model.image_newline", "model.mm_projector.0.bias",
                                                "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                                                "model.mm_projector.2.weight"]
    sd = {k.removeprefix("model.mm_projector."): torch.from_numpy(np.asarray(make(), np.float32))
          for k, _, make in entries if k.startswith("model.mm_projector.")}
    ref = torch.nn.Sequential(torch.nn.Linear(c, h), torch.nn.GELU(), torch.nn.Linear(h, h))
    ref.load_state_dict(sd, strict=True)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.array(f[0]))).numpy()
    block = got.reshape(2, n, n + 1, h)
    assert_close(block[:, :, :n].reshape(2, n * n, h), want, "image cells")
    np.testing.assert_array_equal(block[:, :, n], np.broadcast_to(np.asarray(con.image_newline[...]), (2, n, h)))


# ---------------------------------------------------------------------------------------- 2. concat

def test_concat_interpolates_each_tower_then_concatenates_channels():
    n, h = 4, 12
    sides, widths = (4, 8, 3), (5, 6, 7)          # kept, bilinear down 8→4, bilinear up 3→4
    cfg = model_config("concat", sides, widths, n, hidden=h)
    con = build(lambda: build_connector(cfg, rngs=nnx.Rngs(0)), seed=2)
    f = features(sides, widths, seed=3)
    got = run(con, f, None)
    p = np_params(con)
    x = np.concatenate([torch_resize(t, n, n) for t in f], axis=-1)           # [B, n², ΣC]
    want = with_newlines(mlp(x, p, "mm_projector/"), p["image_newline"], n)
    assert_close(got, want)
    assert p["mm_projector/0/kernel"].shape == (sum(widths), h)


# ------------------------------------------------------------------------------------ 3. interleave

def test_interleave_order_is_a0_b0_a1_b1():
    a = jnp.asarray([[[100.0], [101.0], [102.0], [103.0]]])
    b = jnp.asarray([[[200.0], [201.0], [202.0], [203.0]]])
    np.testing.assert_array_equal(np.asarray(interleave(a, b))[0, :, 0], [100, 200, 101, 201, 102, 202, 103, 203])


def test_interleave_hand_built_pairs_tokens_of_the_same_region():
    """Tower a's token at cell (r, c) is 1000 + r·n + c, tower b's 2000 + …; projectors pass channel 0
    through exactly (GELU(x) = x for x ≥ 10 in float32). Each tower is reduced to n × n/2 (the mean of
    horizontal pairs), so row r of the block reads a(r,0) b(r,0) a(r,1) b(r,1) … newline."""
    n, h = 4, 4
    cfg = model_config("interleave", (n, n), (2, 2), n, hidden=h)
    con = nnx.eval_shape(lambda: build_connector(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(con, InterleaveConnector)
    for k in range(2):
        first, second = getattr(con, f"mm_projector_{k}")[0], getattr(con, f"mm_projector_{k}")[2]
        first.kernel.set_value(jnp.zeros((2, h)).at[0, 0].set(1.0))
        first.bias.set_value(jnp.zeros(h))
        second.kernel.set_value(jnp.eye(h))
        second.bias.set_value(jnp.zeros(h))
    con.image_newline.set_value(jnp.full((h,), -1.0))
    cells = np.arange(n * n, dtype=np.float32)
    f = [jnp.asarray(np.stack([base + cells, np.zeros_like(cells)], -1)[None]) for base in (1000.0, 2000.0)]
    got = np.asarray(run(con, f, None))[0, :, 0].reshape(n, n + 1)
    for r in range(n):
        pairs = [r * n + 2 * j + 0.5 for j in range(n // 2)]               # mean of cells (r, 2j), (r, 2j+1)
        want = [v for m in pairs for v in (1000 + m, 2000 + m)] + [-1.0]
        np.testing.assert_array_equal(got[r], want)


def test_interleave_matches_a_transcription():
    n, h = 4, 12
    sides, widths = (4, 3), (5, 7)
    cfg = model_config("interleave", sides, widths, n, hidden=h)
    con = build(lambda: build_connector(cfg, rngs=nnx.Rngs(0)), seed=4)
    f = features(sides, widths, seed=5)
    p = np_params(con)
    a, b = (mlp(torch_resize(t, n, n // 2), p, f"mm_projector_{k}/") for k, t in enumerate(f))
    mixed = np.stack([a, b], axis=2).reshape(2, n * n, h)
    assert_close(run(con, f, None), with_newlines(mixed, p["image_newline"], n))


# ------------------------------------------------------------------------------------- 4. resampler

def np_resampler(p, feats, masks, n, heads, depth):
    """Spec §3.3's layer with learned per-cell queries reading every token of every tower."""
    feats = [np.asarray(x, np.float64) for x in feats]
    b = feats[0].shape[0]
    z = [layer_norm(mlp(x, p, f"mm_projector_aux_{k}/"), p, f"mm_projector_aux_{k}/3/") for k, x in enumerate(feats)]
    c = z[0].mean(axis=1)                                                              # [B, V]
    mask = np.concatenate([np.ones(x.shape[:2], bool) if m is None else np.asarray(m) for x, m in zip(z, masks)], 1)
    mask[~mask.any(axis=1)] = True
    q = np.broadcast_to(p["vision_query"], (b,) + p["vision_query"].shape).copy()
    v = q.shape[-1]
    hd = v // heads
    for layer in range(depth):
        pre = f"vision_sampler/{layer}/"
        ctx = linear(c, p, pre + "proj_context/")[:, None].repeat(n * n, axis=1)
        h = linear(np.concatenate([q, ctx], -1), p, pre + "proj_in/")
        att = pre + "cross_attn/"
        qq = linear(layer_norm(h, p, att + "q_proj/0/"), p, att + "q_proj/1/")
        kk = np.concatenate([linear(layer_norm(x, p, f"{att}k_proj_{k}/0/"), p, f"{att}k_proj_{k}/1/")
                             for k, x in enumerate(z)], 1)
        vv = np.concatenate([linear(layer_norm(x, p, f"{att}v_proj_{k}/0/"), p, f"{att}v_proj_{k}/1/")
                             for k, x in enumerate(z)], 1)
        out = np.zeros_like(h)
        for i in range(b):
            for hh in range(heads):
                s = slice(hh * hd, (hh + 1) * hd)
                logits = qq[i, :, s] @ kk[i, :, s].T / math.sqrt(hd)
                logits = np.where(mask[i][None], logits, -np.inf)
                w = np.exp(logits - logits.max(-1, keepdims=True))
                out[i, :, s] = (w / w.sum(-1, keepdims=True)) @ vv[i, :, s]
        h = layer_norm(h + linear(out, p, att + "o_proj/"), p, pre + "norm/")
        q = q + linear(gelu(linear(h, p, pre + "proj_out/linear_1/")), p, pre + "proj_out/linear_2/")
    return with_newlines(mlp(q, p, "mm_projector/"), p["image_newline"], n)


RESAMPLER = dict(sides=(2, 4), widths=(5, 7), n=2)


@pytest.fixture(scope="module")
def resampler():
    g = RESAMPLER
    cfg = model_config("resampler", g["sides"], g["widths"], g["n"], v=8, heads=2, depth=2, hidden=8)
    return build(lambda: build_connector(cfg, rngs=nnx.Rngs(0)), seed=6), cfg


def padded_masks(sides, b=2):
    """Image 0 pads the top row of every tower; image 1 has no padding."""
    out = []
    for s in sides:
        m = np.ones((b, s, s), bool)
        m[0, 0] = False
        out.append(jnp.asarray(m.reshape(b, s * s)))
    return out


def test_resampler_matches_a_numpy_transcription(resampler):
    con, cfg = resampler
    assert isinstance(con, ResamplerConnector) and con.vision_query.shape == (4, 8)
    g = RESAMPLER
    f = features(g["sides"], g["widths"], seed=7)
    for masks in (None, padded_masks(g["sides"])):
        got = run(con, f, masks)
        want = np_resampler(np_params(con), f, masks or [None, None], g["n"], 2, 2)
        assert_close(got, want, f"masks={masks is not None}")


def test_resampler_ignores_token_order_where_the_sva_does_not(resampler):
    """Permute each tower's tokens (features and masks alike): the resampler's output is unchanged,
    the SVA's, whose queries read fixed windows of the grid, is not."""
    con, _ = resampler
    g = RESAMPLER
    f = features(g["sides"], g["widths"], seed=8)
    masks = padded_masks(g["sides"])
    rng = np.random.default_rng(9)
    perms = [rng.permutation(s * s) for s in g["sides"]]
    f2 = [x[:, pi] for x, pi in zip(f, perms)]
    masks2 = [m[:, pi] for m, pi in zip(masks, perms)]
    assert_close(run(con, f2, masks2), run(con, f, masks), "resampler, permuted keys")

    sva_cfg = model_config("sva", g["sides"], g["widths"], g["n"], v=8, heads=2, depth=2, hidden=8)
    sva = build(lambda: build_connector(sva_cfg, rngs=nnx.Rngs(0)), seed=6)
    assert isinstance(sva, Connector)
    moved = np.abs(np.asarray(run(sva, f2, masks2)) - np.asarray(run(sva, f, masks))).max()
    assert moved > 1e-2, f"the SVA's output should depend on where tokens are (max change {moved:.1e})"


# ---------------------------------------------------------------------------------- 5. configuration

def _tiny(kind, towers=2):
    """config.model of a tiny Cambrian with `kind` and 1 or 2 towers (the second at 3×3 tokens)."""
    m = cambrian_tiny.micro_model()
    m.connector.type = kind
    if towers == 2:
        m.towers = [cambrian_tiny.MICRO_TOWER, "siglip/tiny-7-36"]
        m.tower_token_lens = [16, 9]
        m.tower_overrides["siglip/tiny-7-36"] = dict(image_size=36, patch_size=7, hidden_size=16,
                                                     intermediate_size=32, num_layers=1, num_heads=2)
    return m


@pytest.mark.parametrize("kind, towers, edit, field", [
    ("mlp2x_gelu", 2, None, "model.towers"),
    ("concat", 1, None, "model.towers"),
    ("interleave", 1, None, "model.towers"),
    ("interleave", 2, lambda m: m.connector.update(image_token_len=9, query_num_list=[9]),
     "model.connector.image_token_len"),
    ("resampler", 2, lambda m: m.connector.update(num_heads=3), "vision_hidden_size"),
    ("resampler", 2, lambda m: m.connector.update(connector_depth=0), "model.connector.connector_depth"),
    ("mlp", 1, None, "model.connector.type"),
])
def test_config_errors_name_the_field(kind, towers, edit, field):
    m = _tiny(kind, towers)
    if edit:
        edit(m)
    with pytest.raises(ConfigError, match=re.escape(field)):
        config_lib.from_dict(m)


def test_non_sva_types_have_no_in_llm_aggregators_and_skip_the_sva_checks():
    for kind in NON_SVA:
        m = _tiny(kind, 1 if kind == "mlp2x_gelu" else 2)
        assert not m.connector.connector_only                # the default of common.connector …
        cfg = config_lib.from_dict(m)                         # … forced: only the SVA re-reads the towers
        assert cfg.connector.connector_only and cfg.connector.aggregator_layers == ()
    # A 3×3 tower grid is no multiple of the 4×4 query grid: an SVA error, not a concat one.
    with pytest.raises(ConfigError, match="query group"):
        config_lib.from_dict(_tiny("sva", 2))
    with pytest.raises(ConfigError, match="model.connector.connector_only"):
        dataclasses.replace(config_lib.from_dict(_tiny("concat")),
                            connector=ConnectorConfig(type="concat", image_token_len=16)).validate()


def test_stage_one_trains_every_connector_parameter_in_a_named_group():
    """common.CONNECTOR covers each connector; every path is a projector (1e-3) or a sampler (1e-4)."""
    for kind in NON_SVA:
        cfg = config_lib.from_dict(_tiny(kind, 1 if kind == "mlp2x_gelu" else 2))
        model = nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0)))
        paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
        connector = [p for p in paths if p.startswith("connector/")]
        assert optim.check_trainable(paths, [common.CONNECTOR], "stage1.trainable") == connector
        groups = {p: ("projectors" if re.search(common.PROJECTORS, p) else
                      "samplers" if re.search(common.SAMPLERS, p) else None) for p in connector}
        assert None not in groups.values(), (kind, [p for p, g in groups.items() if g is None])
        samplers = sorted({p.split("/")[1] for p, g in groups.items() if g == "samplers"})
        assert samplers == (["vision_query", "vision_sampler"] if kind == "resampler" else []), kind


# ------------------------------------------------------------------------------------ 6. whole model

@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, trainable, frozen, inputs, labels):
    def loss(trainable):
        logits = nnx.merge(graphdef, trainable, frozen)(**inputs)
        total, count = token_losses(logits, labels)
        return total / count, logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    return logits, grads


@pytest.mark.parametrize("kind", NON_SVA)
def test_whole_model_forward_and_gradients(kind):
    """Two rows with the same tokens and different images: finite logits, identical before the image,
    different after it; the LLM loss reaches every connector parameter (the stage-1 trainable set)."""
    cfg = config_lib.from_dict(_tiny(kind, 1 if kind == "mlp2x_gelu" else 2))
    model = build(lambda: Cambrian(cfg, rngs=nnx.Rngs(0)), seed=10, scale=0.2)
    graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter([common.CONNECTOR]), ...)
    rng = np.random.default_rng(11)
    ids = list(rng.integers(1, cfg.decoder.vocab_size, cfg.image_position)) + [IMAGE_TOKEN_INDEX] + [5, 6, 7, 8]
    batch = static_layout(cfg, [ids, ids], [(320, 176), (320, 176)])
    pixels = [jnp.asarray(rng.normal(size=(2, t.image_size, t.image_size, 3)), jnp.float32) for t in cfg.towers]
    inputs = dict(input_ids=jnp.asarray(batch["input_ids"]), pixels=pixels,
                  tower_masks=[jnp.asarray(m) for m in batch["tower_masks"]],
                  attention_mask=jnp.asarray(batch["attention_mask"]), positions=jnp.asarray(batch["positions"]))
    labels = np.full(batch["input_ids"].shape, -100, np.int32)
    after = cfg.image_position + cfg.connector.block_len
    labels[:, after:] = batch["input_ids"][:, after:]                   # supervise the text after the image
    logits, grads = _loss_and_grads(graphdef, trainable, frozen, inputs, jnp.asarray(labels))
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    p = cfg.image_position
    np.testing.assert_array_equal(logits[0, :p], logits[1, :p])
    assert np.abs(logits[0, after:] - logits[1, after:]).max() > 1e-4
    norms = {optim.path_str(k): float(jnp.linalg.norm(g)) for k, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert norms and all(k.startswith("connector/") for k in norms)
    assert all(v > 0 for v in norms.values()), [k for k, v in norms.items() if v == 0]


# ------------------------------------------------------------------------------------- 7. checkpoints

def test_mlp2x_gelu_and_concat_export_then_import_bit_identical(tmp_path):
    from cambrian_jax import export_hf, pretrained
    from cambrian_jax.convert import cambrian_hf
    from cambrian_jax.convert.safetensors_io import open_checkpoint

    for kind in ("mlp2x_gelu", "concat"):
        m = _tiny(kind, 1 if kind == "mlp2x_gelu" else 2)
        if kind == "concat":
            m.tower_token_lens = [16, 16]       # the reference concatenates towers at image_token_len tokens
        cfg = config_lib.from_dict(m)
        model = build(lambda: Cambrian(cfg, rngs=nnx.Rngs(0)), seed=12)
        params = {optim.path_str(k): np.asarray(v)
                  for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
        out = tmp_path / kind
        export_hf.export(params, cfg, out)
        hf = json.load(open(out / "config.json"))
        assert hf["mm_projector_type"] == "mlp2x_gelu" and hf["connector_only"] is True
        reader = open_checkpoint(out)
        connector_keys = sorted(k for k in reader if not k.startswith(("model.layers.", "model.embed_tokens",
                                                                         "model.norm", "lm_head")))
        assert connector_keys == ["model.image_newline", "model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                  "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
        width = sum(t.width for t in cfg.towers)
        assert reader.shape("model.mm_projector.0.weight") == (cfg.decoder.hidden_size, width)   # torch [out, in]

        again = cambrian_hf.config_from_hf(hf, cfg.towers)
        assert again == cfg and again.connector.type == kind
        state = nnx.state(nnx.eval_shape(lambda: Cambrian(again, rngs=nnx.Rngs(0))), nnx.Param)
        pretrained.load_cambrian_into(state, reader, again, str(out))
        got = {optim.path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(state)}
        for k, v in params.items():
            if k.startswith(("connector/", "decoder/")):
                np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{kind}: {k}")


def test_types_without_a_reference_layout_refuse_to_export():
    from cambrian_jax.convert import cambrian_hf

    for kind in ("interleave", "resampler"):
        with pytest.raises(ConfigError, match="model.connector.type"):
            cambrian_hf.config_to_hf(config_lib.from_dict(_tiny(kind)))
    with pytest.raises(ConfigError, match=re.escape("model.towers[1]")):     # 3×3 tokens: the reference can't
        cambrian_hf.config_to_hf(config_lib.from_dict(_tiny("concat")))
    with pytest.raises(ConfigError, match="mm_projector_type='linear'"):
        cambrian_hf.config_from_hf({**cambrian_hf.config_to_hf(config_lib.from_dict(_tiny("mlp2x_gelu", 1))),
                                    "mm_projector_type": "linear"}, [])


# ------------------------------------------------------------------------------------------ 8. FLOPs

@pytest.mark.parametrize("kind", ("sva",) + NON_SVA)
def test_connector_flops_match_xla_cost_analysis(kind):
    """flops.connector_forward (matmuls and attention, 2 per multiply-add) against XLA's count for the
    connector alone, compiled (not run) at the released geometry (n = 24, V = 1024, 16 heads, H = 4096,
    towers at 24×24 and 96×96). XLA also counts element-wise work (GELU, LayerNorm, softmax), about
    1 % here: tolerance 2 %."""
    n = 24
    sides, widths = ((24,), (1152,)) if kind == "mlp2x_gelu" else ((24, 96), (1152, 1536))
    cfg = model_config(kind, sides, widths, n, v=1024, heads=16, depth=3, hidden=4096)
    con = nnx.eval_shape(lambda: build_connector(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(con)
    feats = [jax.ShapeDtypeStruct((1, s * s, c), jnp.float32) for s, c in zip(sides, widths)]
    masks = [jax.ShapeDtypeStruct((1, s * s), jnp.bool_) for s in sides]

    def forward(state, feats, masks):
        return nnx.merge(graphdef, state)(feats, masks)[0]

    cost = jax.jit(forward).lower(state, feats, masks).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ours, aggregators = flops.connector_forward(cfg)
    print(f"{kind}: connector_forward {ours:.4e}, XLA {xla:.4e}, ratio {ours / xla:.4f}")
    assert ours == pytest.approx(xla, rel=0.02)
    assert (aggregators > 0) == (kind == "sva")
