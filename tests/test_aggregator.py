"""The Spatial Vision Aggregator and the connector on small hand-built cases (spec §3, §5.5).

CPU, float32. The reference computation of test 3 is an independent numpy transcription of the
pseudo-code of spec §3.3 (loops over cells and heads, explicit softmax); tolerance 1e-5.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cambrian_jax.aggregator import VisionCrossAttentionLayer, window, window_attention, window_mask
from cambrian_jax.config import ConnectorConfig
from cambrian_jax.connector import Connector, aggregate

V, HEADS = 8, 2


def randomize(module, seed=0, scale=0.5):
    """Replace every parameter (LayerNorm γ/β included) by random values, so no weight is trivial."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        var.set_value(jnp.asarray(rng.normal(size=var.shape) * scale, jnp.float32))


def np_params(module):
    return {"/".join(map(str, p)): np.asarray(v[...], np.float64)
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def build(make, seed=0):
    """Construct abstractly (no random-init compile) and fill every parameter with random values."""
    module = nnx.eval_shape(make)
    randomize(module, seed)
    return module


@nnx.jit
def run(module, *args):
    """Call a module under jit (tiny eager calls compile op by op, which is slow on CPU)."""
    return module(*args)


def small_connector(query_num_list=(16,), sides=(4, 8), widths=(6, 10), n=4, depth=2, aggregators=3,
                    hidden=12, dtype=jnp.float32, seed=0):
    cfg = ConnectorConfig(vision_hidden_size=V, num_heads=HEADS, num_query_group=len(query_num_list),
                          query_num_list=tuple(query_num_list), connector_depth=depth, image_token_len=n * n,
                          num_of_vision_sampler_layers=aggregators)
    return build(lambda: Connector(cfg, widths, sides, hidden, dtype=dtype, rngs=nnx.Rngs(0)), seed)


def features(sides=(4, 8), widths=(6, 10), b=2, seed=1):
    keys = jax.random.split(jax.random.key(seed), len(sides))
    return [jax.random.normal(k, (b, s * s, c)) for k, s, c in zip(keys, sides, widths)]


# --- 1. windowing order ---------------------------------------------------------------------------

def test_window_order_keys_row_major_and_query_index():
    b, s, side = 2, 4, 2
    r = s // side
    # token value = (image, row, col) of its tower cell
    cells = np.array([[(bb, row, col) for row in range(s) for col in range(s)] for bb in range(b)], np.float32)
    w = np.asarray(window(jnp.asarray(cells), side))
    assert w.shape == (b * side * side, r * r, 3)
    # image 0, window (0, 1) = query 1: cells (0,2) (0,3) (1,2) (1,3)
    np.testing.assert_array_equal(w[1], [[0, 0, 2], [0, 0, 3], [0, 1, 2], [0, 1, 3]])
    # image 1, window (1, 0) = query 1·4 + 1·2 + 0 = 6: cells (2,0) (2,1) (3,0) (3,1)
    np.testing.assert_array_equal(w[6], [[1, 2, 0], [1, 2, 1], [1, 3, 0], [1, 3, 1]])
    for bb in range(b):
        for i in range(side):
            for j in range(side):
                m = bb * side * side + i * side + j
                for a in range(r):
                    for c in range(r):
                        np.testing.assert_array_equal(w[m, a * r + c], [bb, i * r + a, j * r + c])
    # r = 1: windowing is the identity up to the batch flattening
    np.testing.assert_array_equal(np.asarray(window(jnp.asarray(cells), s)), cells.reshape(b * s * s, 1, 3))


# --- 2. masks -------------------------------------------------------------------------------------

def test_window_masks_partial_and_all_padding():
    grid = np.ones((4, 4), bool)
    grid[0, :] = False            # padded top row: windows (0,0) and (0,1) lose their first window row
    grid[2:, 2:] = False          # window (1,1) is all padding → re-enabled
    wm = np.asarray(window_mask(jnp.asarray(grid.reshape(1, 16)), 2))
    np.testing.assert_array_equal(wm, [[False, False, True, True],
                                       [False, False, True, True],
                                       [True, True, True, True],
                                       [True, True, True, True]])
    assert window_mask(None, 2) is None


def test_masked_key_has_no_influence():
    rng = np.random.default_rng(0)
    m, t, h, d = 3, 5, 2, 4
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(m, h, d), (m, t, h, d), (m, t, h, d)])
    mask = np.ones((m, t), bool)
    mask[1, 2] = False
    k = k.at[1, 2].set(1e3)
    v = v.at[1, 2].set(1e6)
    attend = jax.jit(window_attention, static_argnums=4)
    out = attend(q, k, v, jnp.asarray(mask), 0.5)
    keep = [0, 1, 3, 4]
    ref = attend(q[1:2], k[1:2, keep], v[1:2, keep], None, 0.5)
    np.testing.assert_allclose(out[1], ref[0], rtol=1e-6, atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()

    # the same through a whole layer: a masked ConvNeXt-style key set to 1e6 changes nothing
    layer = build(lambda: VisionCrossAttentionLayer(V, V, [V, V], [1, 2], V, HEADS, rngs=nnx.Rngs(0)))
    x0 = jax.random.normal(jax.random.key(1), (4, 1, V))
    x1 = jax.random.normal(jax.random.key(2), (4, 4, V))
    wm = np.ones((4, 4), bool)
    wm[2, 3] = False
    queries = jax.random.normal(jax.random.key(3), (4, 1, V))
    ctx = jax.random.normal(jax.random.key(4), (1, 1, V))
    masks = [None, jnp.asarray(wm)]
    base = run(layer, queries, ctx, [x0, x1], masks)
    wild = run(layer, queries, ctx, [x0, x1.at[2, 3].set(1e6)], masks)
    np.testing.assert_allclose(wild, base, rtol=0, atol=1e-6)
    unmasked = run(layer, queries, ctx, [x0, x1.at[2, 3].set(1e6)], None)
    assert not np.allclose(unmasked[2], base[2], atol=1e-3)    # the key does matter when visible


# --- 3. the layer against a numpy transcription of spec §3.3 --------------------------------------

def _ln(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def reference_layer(p, q, c, xs, ws, rs, heads):
    """Spec §3.3 pseudo-code, one query at a time; p = numpy params by path; c [Bc, ctx]."""
    m_total = q.shape[0]
    per_ctx = m_total // c.shape[0]
    hdim = p["proj_context/kernel"].shape[1]
    hd = hdim // heads
    out = np.zeros_like(q)
    for m in range(m_total):
        res = q[m, 0]
        h = np.concatenate([q[m, 0], c[m // per_ctx] @ p["proj_context/kernel"]]) @ p["proj_in/kernel"]
        keys, vals, allowed = [], [], []
        for k, (x, w, r) in enumerate(zip(xs, ws, rs)):
            for t in range(r * r):
                xt = x[m, t] + (p[f"pos_embed_{k}"][t] if r > 1 else 0.0)
                pk, pv = f"cross_attn/k_proj_{k}", f"cross_attn/v_proj_{k}"
                keys.append(_ln(xt, p[f"{pk}/0/scale"], p[f"{pk}/0/bias"]) @ p[f"{pk}/1/kernel"])
                vals.append(_ln(xt, p[f"{pv}/0/scale"], p[f"{pv}/0/bias"]) @ p[f"{pv}/1/kernel"])
                allowed.append(True if w is None else bool(w[m, t]))
        qv = _ln(h, p["cross_attn/q_proj/0/scale"], p["cross_attn/q_proj/0/bias"]) @ p["cross_attn/q_proj/1/kernel"]
        att = np.zeros(hdim)
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            logits = [np.dot(qv[sl], kk[sl]) / math.sqrt(hd) if ok else -np.inf for kk, ok in zip(keys, allowed)]
            e = np.exp(np.array(logits) - max(logits))
            probs = e / e.sum()
            att[sl] = sum(pr * vv[sl] for pr, vv in zip(probs, vals))
        h = h + att @ p["cross_attn/o_proj/kernel"]
        h = _ln(h, p["norm/scale"], p["norm/bias"])
        out[m, 0] = _gelu(h @ p["proj_out/linear_1/kernel"]) @ p["proj_out/linear_2/kernel"] + res
    return out


def test_layer_matches_numpy_transcription_of_spec():
    q_dim, kv_dims, rs, b, side = 12, [V, 6], [1, 2], 2, 2
    layer = build(lambda: VisionCrossAttentionLayer(q_dim, V, kv_dims, rs, V, HEADS, q_axis="embed",
                                                    rngs=nnx.Rngs(0)), seed=3)
    p = np_params(layer)
    assert "pos_embed_1" in p and "pos_embed_0" not in p
    rng = np.random.default_rng(7)
    m = b * side * side
    q = rng.normal(size=(m, 1, q_dim))
    c = rng.normal(size=(b, V))
    xs = [rng.normal(size=(m, 1, kv_dims[0])), rng.normal(size=(m, 4, kv_dims[1]))]
    w1 = np.ones((m, 4), bool)
    w1[0, :2] = False
    w1[5, 3] = False
    ws = [None, w1]
    got = run(layer, jnp.asarray(q, jnp.float32), jnp.asarray(c[:, None], jnp.float32),
                [jnp.asarray(x, jnp.float32) for x in xs], [None, jnp.asarray(w1)])
    want = reference_layer(p, q, c, xs, ws, rs, HEADS)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# --- 4. window position embedding -----------------------------------------------------------------

def test_pos_embed_only_for_windows_larger_than_one():
    layer = build(lambda: VisionCrossAttentionLayer(V, V, [V, V], [1, 2], V, HEADS, rngs=nnx.Rngs(0)), seed=1)
    assert not hasattr(layer, "pos_embed_0")
    assert layer.pos_embed_1.shape == (4, V)
    flat = nnx.eval_shape(lambda: VisionCrossAttentionLayer(V, V, [V, V], [1, 1], V, HEADS, rngs=nnx.Rngs(0)))
    assert not any("pos_embed" in str(path) for path, _ in nnx.to_flat_state(nnx.state(flat, nnx.Param)))

    zeros = [jnp.zeros((3, 1, V)), jnp.zeros((3, 4, V))]
    x0, x1 = layer.key_inputs(zeros)
    np.testing.assert_array_equal(x0, 0.0)                              # r = 1: nothing added
    for m in range(3):                                                  # r = 2: the same 4 vectors in every window
        np.testing.assert_array_equal(x1[m], layer.pos_embed_1[...])
    keys, _ = layer.cross_attn.keys_values([x0, x1])                     # [3, 1 + 4, V]
    k1 = np.asarray(keys[0, 1:])
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.allclose(k1[a], k1[b])                         # keys differ per in-window index
    np.testing.assert_allclose(keys[0], keys[2])                         # and are shared by all windows

    # effect on the output: removing pos_embed changes it; an r=1-only layer has nothing to remove
    q = jax.random.normal(jax.random.key(0), (3, 1, V))
    ctx = jax.random.normal(jax.random.key(1), (3, 1, V))
    xs = [jax.random.normal(jax.random.key(2), (3, 1, V)), jax.random.normal(jax.random.key(3), (3, 4, V))]
    with_pos = run(layer, q, ctx, xs)
    layer.pos_embed_1[...] = jnp.zeros((4, V))
    assert not np.allclose(run(layer, q, ctx, xs), with_pos, atol=1e-4)


# --- 5. several query groups ----------------------------------------------------------------------

def test_two_groups_resize_then_concat():
    sides, widths = (4, 8), (6, 10)
    con = small_connector(query_num_list=(4, 16), sides=sides, widths=widths, n=4, hidden=12, depth=1,
                          aggregators=0, seed=2)
    assert con.vision_query.shape == (2, V)
    assert con.vision_sampler_0.layers[0].window_sides == (2, 4)
    assert con.vision_sampler_1.layers[0].window_sides == (1, 2)
    assert con.mm_projector[0].kernel.shape == (2 * V, 12)
    f = features(sides, widths)
    block, _ = run(con, f)
    assert block.shape == (2, 4 * 5, 12)

    @nnx.jit
    def groups(con, f):
        z = con.project(f)
        c = jnp.mean(z[0], axis=1)
        return con.sample(0, z, c, [None, None]), con.sample(1, z, c, [None, None])

    g0, g1 = map(np.asarray, groups(con, f))                             # [2, 2·2, V], [2, 4·4, V]
    assert g0.shape == (2, 4, V) and g1.shape == (2, 16, V)
    assert not np.allclose(g0[:, 0], g0[:, 3])                           # cells differ, so the resize matters
    # torch bilinear 2 → 4, align_corners=False: source coords -0.25 (clamped), 0.25, 0.75, 1.25
    up = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    g0_up = np.einsum("oi,pj,bijc->bopc", up, up, g0.reshape(2, 2, 2, V)).reshape(2, 16, V)
    x = np.concatenate([g0_up, g1], axis=-1)                             # the mm_projector input
    pp = np_params(con)
    y = _gelu(x @ pp["mm_projector/0/kernel"] + pp["mm_projector/0/bias"])
    y = y @ pp["mm_projector/2/kernel"] + pp["mm_projector/2/bias"]
    cells = np.asarray(block).reshape(2, 4, 5, 12)[:, :, :4].reshape(2, 16, 12)
    np.testing.assert_allclose(cells, y, rtol=1e-5, atol=1e-5)


# --- 6. image block layout ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_image_block_layout(dtype):
    n, hidden = 4, 12
    con = small_connector(n=n, hidden=hidden, dtype=dtype)
    block, ctx = run(con, features())
    assert block.shape == (2, n * (n + 1), hidden) and block.dtype == dtype
    grid = np.asarray(block.astype(jnp.float32)).reshape(2, n, n + 1, hidden)
    newline = np.asarray(con.image_newline[...].astype(dtype).astype(jnp.float32))
    for b in range(2):
        for row in range(n):
            np.testing.assert_array_equal(grid[b, row, n], newline)
    assert not np.allclose(grid[:, :, :n], newline)
    assert con.image_newline[...].dtype == jnp.float32                  # parameters stay float32
    assert ctx.context.shape == (2, V) and ctx.grid == n
    assert [w.shape for w in ctx.windows] == [(2 * n * n, 1, V), (2 * n * n, 4, V)]


# --- 7. in-LLM aggregation ------------------------------------------------------------------------

def test_aggregate_updates_only_image_cells():
    n, hidden, p, t = 4, 12, 3, 30
    con = small_connector(n=n, hidden=hidden, seed=5)
    masks = [None, jnp.asarray(np.repeat(np.arange(64)[None] >= 8, 2, 0))]   # top row of tower 1 is padding
    _, ctx = run(con, features(), masks)
    hid = jax.random.normal(jax.random.key(9), (2, t, hidden))
    agg = con.vision_sampler_layers.layer_at(1)

    @nnx.jit
    def step(stack, hidden, vision_ctx):      # as the decoder will do it: slice j inside the jitted step
        return aggregate(stack.layer_at(1), hidden, vision_ctx, p, n)

    out = np.asarray(step(con.vision_sampler_layers, hid, ctx))
    h = np.asarray(hid)
    np.testing.assert_array_equal(out[:, :p], h[:, :p])
    np.testing.assert_array_equal(out[:, p + n * (n + 1):], h[:, p + n * (n + 1):])
    blk_out = out[:, p:p + n * (n + 1)].reshape(2, n, n + 1, hidden)
    blk_in = h[:, p:p + n * (n + 1)].reshape(2, n, n + 1, hidden)
    np.testing.assert_array_equal(blk_out[:, :, n], blk_in[:, :, n])    # newline column untouched
    assert not np.isclose(blk_out[:, :, :n], blk_in[:, :, :n]).any()
    direct = run(agg, jnp.asarray(blk_in[:, :, :n].reshape(2 * n * n, 1, hidden)), ctx.context[:, None],
                 ctx.windows, ctx.window_masks)
    np.testing.assert_allclose(blk_out[:, :, :n].reshape(2 * n * n, 1, hidden), direct, rtol=1e-6, atol=1e-6)

    # the unstacked layer is slice 1 of the stack, without the 'aggregators' axis
    stacked = con.vision_sampler_layers.layer.proj_in.kernel
    np.testing.assert_array_equal(agg.proj_in.kernel[...], stacked[...][1])
    assert agg.proj_in.kernel.get_metadata()["out_sharding"] == (None, "vision")
    assert not np.allclose(con.vision_sampler_layers.layer_at(0).proj_in.kernel[...], agg.proj_in.kernel[...])


# --- 8. parameter counts of the released geometry (spec §5.5) -------------------------------------

def _counts(hidden, num_aggregators):
    cfg = ConnectorConfig(num_of_vision_sampler_layers=num_aggregators)
    con = nnx.eval_shape(lambda: Connector(cfg, [1152, 1024, 1536, 5760], [24, 24, 24, 96], hidden,
                                           rngs=nnx.Rngs(0)))
    counts = {}
    for path, var in nnx.to_flat_state(nnx.state(con, nnx.Param)):
        top = str(path[0])
        top = "mm_projector_aux" if top.startswith("mm_projector_aux") else top
        counts[top] = counts.get(top, 0) + math.prod(var.shape)
    return con, counts


def test_param_counts_released_geometry():
    con, c8 = _counts(4096, 10)
    assert c8["mm_projector"] == 20_979_712
    assert c8["mm_projector_aux"] == 13_910_016
    assert c8["vision_sampler_0"] == 47_296_512
    assert c8["vision_sampler_layers"] == 220_569_600
    assert c8["vision_query"] + c8["image_newline"] == 5_120
    assert sum(c8.values()) == 302_760_960
    layer = con.vision_sampler_layers.layer
    assert layer.pos_embed_3.shape == (10, 16, 1024)
    assert all(not hasattr(layer, f"pos_embed_{k}") for k in range(3))
    assert layer.proj_in.kernel.shape == (10, 4096 + 1024, 1024)
    assert layer.proj_in.kernel.get_metadata()["out_sharding"] == ("aggregators", None, "vision")
    assert layer.proj_out.linear_2.kernel.get_metadata()["out_sharding"] == ("aggregators", "vision", "embed")
    assert con.mm_projector_aux_3[0].kernel.get_metadata()["out_sharding"] == ("tower_embed", "vision")
    assert con.image_newline.get_metadata()["out_sharding"] == ("embed",)

    _, c34 = _counts(7168, 9)
    assert c34["vision_sampler_layers"] == 255_135_744
    assert sum(c34.values()) == 375_085_056


# --- initialisation (spec §3.6) -------------------------------------------------------------------

def test_init_follows_torch_defaults():
    layer = VisionCrossAttentionLayer(16, 64, [64, 64], [1, 4], 64, HEADS, rngs=nnx.Rngs(0))
    w = np.asarray(layer.proj_in.kernel[...])                            # fan_in = 16 + 64
    assert w.shape == (80, 64) and np.abs(w).max() <= 1 / math.sqrt(80) and np.abs(w).max() > 0.9 / math.sqrt(80)
    np.testing.assert_array_equal(layer.norm.scale[...], 1.0)
    np.testing.assert_array_equal(layer.cross_attn.k_proj_1[0].bias[...], 0.0)
    assert 0.9 < np.std(np.asarray(layer.pos_embed_1[...])) < 1.1       # unscaled N(0, 1), [16, 64]

    cfg = ConnectorConfig(vision_hidden_size=64, num_heads=HEADS, query_num_list=(4,), connector_depth=1,
                          image_token_len=4, num_of_vision_sampler_layers=2)
    con = Connector(cfg, [8], [2], 256, rngs=nnx.Rngs(0))
    assert 0.7 / 8 < np.std(np.asarray(con.vision_query[...])) < 1.3 / 8      # N(0, 1)/sqrt(V)
    assert 0.8 / 16 < np.std(np.asarray(con.image_newline[...])) < 1.2 / 16   # N(0, 1)/sqrt(H)
    stack = np.asarray(con.vision_sampler_layers.layer.proj_context.kernel[...])
    assert stack.shape == (2, 64, 64) and not np.allclose(stack[0], stack[1])  # each aggregator its own init
