"""Decoder parity with transformers' LlamaForCausalLM / Phi3ForCausalLM (eager attention, fp32, CPU),
the HF converter round trip, the in-LLM aggregation hook against an unrolled loop, the KV cache and
remat. Tolerances: logits vs HF max |Δ| ≤ 1e-5 (|logits| ≤ 3; 2.2e-6 observed); our own equivalent
computations ≤ 1e-5."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from cambrian_jax.config import DecoderConfig
from cambrian_jax.convert.assign import CheckpointMismatch, assign, export, flat_params
from cambrian_jax.convert.hf_llama import decoder_config_from_hf, from_hf, to_hf
from cambrian_jax.decoder import REMAT_ALIASES, REMAT_POLICIES, Decoder, check_agg_layers, rope_inv_freq, rope_tables
from cambrian_jax.layers import Linear

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.1,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA31 = dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=32))
B, T = 2, 16
# fp32 on CPU, |logits| ≤ 3: the four parity tests below measure 1.9e-6 … 2.2e-6 (torch and XLA sum in
# other orders); 1e-5 is ~5× that, and 10x below the error of a wrong RoPE or mask.
HF_TOL = 1e-5


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _decoder(cfg: DecoderConfig, tensors, remat: str = "none") -> Decoder:
    """A decoder holding `tensors`, built abstractly (no random init to compile) and then assigned."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, remat=remat, rngs=nnx.Rngs(0))))
    dec = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))
    assign(dec, tensors, "HF reference")
    return dec


class Loaded:
    """An HF reference model, our decoder loaded from it, and a jitted logits function."""

    def __init__(self, hf_model):
        self.hf = hf_model.eval()
        self.sd = _state_dict(hf_model)
        self.cfg = decoder_config_from_hf(hf_model.config.to_dict())
        self.tensors = from_hf(self.cfg, self.sd)
        self.dec = _decoder(self.cfg, self.tensors)
        graphdef, state = nnx.split(self.dec)

        @jax.jit
        def logits(state, ids, positions, mask):
            dec = nnx.merge(graphdef, state)
            return dec.logits(dec(dec.embed(ids), positions, mask))

        self.logits = lambda ids, positions, mask: np.asarray(logits(state, ids, positions, mask))

    def hf_logits(self, ids, positions, mask):
        with torch.no_grad():
            return self.hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                           position_ids=torch.tensor(positions)).logits.numpy()


def _hf_llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}, attn_implementation="eager"))


@pytest.fixture(scope="module")
def llama():
    return Loaded(_hf_llama())


@pytest.fixture(scope="module")
def llama31():
    return Loaded(_hf_llama(**LLAMA31))


@pytest.fixture(scope="module")
def phi3():
    torch.manual_seed(0)
    cfg = Phi3Config(**TINY, sliding_window=None, attn_implementation="eager")
    return Loaded(Phi3ForCausalLM(cfg))


def _ids(seed=0):
    return np.random.RandomState(seed).randint(3, 128, (B, T))


def _full_mask():
    return np.ones((B, T), bool)


def _positions(mask):
    """Cambrian's positions: masked tokens do not advance them."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def _ragged_mask():
    """Row 0 all real; row 1 left-padded (2), a masked run in the middle (like padded image cells),
    right-padded (3)."""
    mask = _full_mask()
    mask[1, :2] = False
    mask[1, 7:10] = False
    mask[1, 13:] = False
    return mask


# ------------------------------------------------------------------------------------ parity with HF

def test_logits_match_hf_llama_gqa(llama):
    assert llama.cfg.num_kv_heads < llama.cfg.num_heads
    mask = _full_mask()
    ours = llama.logits(_ids(), _positions(mask), mask)
    ref = llama.hf_logits(_ids(), _positions(mask), mask)
    diff = np.abs(ours - ref).max()
    print(f"llama GQA max|Δlogits| = {diff:.2e} (|logits| max {np.abs(ref).max():.2f})")
    assert diff <= HF_TOL


def test_logits_match_hf_llama31_rope_scaling(llama31):
    inv = rope_inv_freq(llama31.cfg)
    torch_inv = llama31.hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(inv, torch_inv, rtol=1e-6)
    plain = rope_inv_freq(dataclasses.replace(llama31.cfg, rope_scaling=None))
    assert not np.allclose(inv, plain)                   # the scaling is exercised
    mask = _full_mask()
    positions = _positions(mask) + 100                   # far enough for low frequencies to matter
    ours = llama31.logits(_ids(1), positions, mask)
    ref = llama31.hf_logits(_ids(1), positions, mask)
    diff = np.abs(ours - ref).max()
    print(f"llama3.1 rope scaling max|Δlogits| = {diff:.2e}")
    assert diff <= HF_TOL


def test_logits_match_hf_with_padding_and_masked_tokens(llama):
    mask = _ragged_mask()
    positions = _positions(mask)
    ours = llama.logits(_ids(2), positions, mask)
    ref = llama.hf_logits(_ids(2), positions, mask)
    assert np.isfinite(ours).all()                       # fully masked query rows give no NaN
    diff = np.abs(ours - ref)[mask].max()
    print(f"llama padded max|Δlogits| (real positions) = {diff:.2e}")
    assert diff <= HF_TOL


def test_logits_match_hf_phi3_fused_weights(phi3):
    assert any("qkv_proj" in k for k in phi3.sd) and any("gate_up_proj" in k for k in phi3.sd)
    mask = _ragged_mask()
    positions = _positions(mask)
    ours = phi3.logits(_ids(3), positions, mask)
    ref = phi3.hf_logits(_ids(3), positions, mask)
    diff = np.abs(ours - ref)[mask].max()
    print(f"phi3 max|Δlogits| = {diff:.2e}")
    assert diff <= HF_TOL


# -------------------------------------------------------------------------------------- converter

def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


def test_converter_round_trip_llama(llama):
    _assert_same(to_hf(llama.cfg, from_hf(llama.cfg, llama.sd)), llama.sd)
    _assert_same(to_hf(llama.cfg, export(llama.dec)), llama.sd)      # through the module's own paths


def test_converter_round_trip_phi3_fused(phi3):
    _assert_same(to_hf(phi3.cfg, from_hf(phi3.cfg, phi3.sd), fused=True), phi3.sd)


def test_converter_reports_missing_and_extra_layers(llama):
    sd = dict(llama.sd)
    del sd["model.layers.1.mlp.up_proj.weight"], sd["lm_head.weight"]
    with pytest.raises(CheckpointMismatch, match="lacks 2.*up_proj"):
        from_hf(llama.cfg, sd)
    sd = dict(llama.sd, **{"model.layers.4.input_layernorm.weight": np.ones(64, np.float32)})
    with pytest.raises(CheckpointMismatch, match="beyond num_layers"):
        from_hf(llama.cfg, sd)


def test_decoder_config_from_released_config_json():
    cambrian_8b = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
                   "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False}
    cfg = decoder_config_from_hf(cambrian_8b)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_size, cfg.rope_theta, cfg.rope_scaling) == (
        32, 8, 128, 500000.0, None)
    llama31 = dict(cambrian_8b, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    assert dict(decoder_config_from_hf(llama31).rope_scaling)["factor"] == 8.0
    with pytest.raises(ValueError, match="longrope"):
        decoder_config_from_hf(dict(cambrian_8b, rope_scaling={"type": "longrope", "short_factor": [1.0]}))


def test_parameter_layout_and_logical_axes(llama):
    h, nh, kv, d, f, v, n = 64, 4, 2, 16, 96, 128, 4
    expected = {
        "embedding": ((v, h), ("vocab", "embed")),
        "layers/attn_norm/scale": ((n, h), ("layers", "embed")),
        "layers/attn/q/kernel": ((n, h, nh, d), ("layers", "embed", "heads", "head_dim")),
        "layers/attn/k/kernel": ((n, h, kv, d), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/attn/v/kernel": ((n, h, kv, d), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/attn/o/kernel": ((n, nh, d, h), ("layers", "heads", "head_dim", "embed")),
        "layers/mlp_norm/scale": ((n, h), ("layers", "embed")),
        "layers/mlp/gate/kernel": ((n, h, f), ("layers", "embed", "mlp")),
        "layers/mlp/up/kernel": ((n, h, f), ("layers", "embed", "mlp")),
        "layers/mlp/down/kernel": ((n, f, h), ("layers", "mlp", "embed")),
        "final_norm/scale": ((h,), ("embed",)),
        "lm_head/kernel": ((h, v), ("embed", "vocab")),
    }
    got = {k: (tuple(var[...].shape), var.get_metadata()["out_sharding"]) for k, var in flat_params(llama.dec).items()}
    assert got == expected
    assert all(var[...].dtype == jnp.float32 for var in flat_params(llama.dec).values())


# --------------------------------------------------------------------------- in-LLM aggregation hook

SLOT = slice(2, 6)          # "image positions" the toy aggregator updates


class ToyAggregator(nnx.Module):
    def __init__(self, h: int, rngs: nnx.Rngs):
        self.w = Linear(h, h, ("embed", None), use_bias=False, rngs=rngs)


def make_aggregators(n: int, h: int = 64, seed: int = 1) -> ToyAggregator:
    """N toy aggregators stacked on a leading axis, as the model creates its real ones (nnx.vmap)."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return ToyAggregator(h, r)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
    aggs = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))
    assign(aggs, {"w/kernel": np.random.RandomState(seed).normal(0, 0.3, (n, h, h)).astype(np.float32)})
    return aggs


def toy_aggregate(features):
    """hidden[:, 2:6] += W_j (hidden[:, 2:6] + features): closes over (traced) 'vision features'."""
    def aggregate(agg, h):
        return h.at[:, SLOT].add(agg.w(h[:, SLOT] + features))
    return aggregate


def unrolled_reference(dec, aggs, agg_layers, x, positions, mask, features):
    """The right answer by a python loop over layers (no scans)."""
    graphdef, layers = nnx.split(dec.layers)
    agg_def, agg_state = nnx.split(aggs)
    cos, sin = rope_tables(rope_inv_freq(dec.cfg), positions, jnp.float32)
    h = x
    for i in range(dec.cfg.num_layers):
        h, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], layers))(h, cos, sin, mask)
        if i in agg_layers:
            j = agg_layers.index(i)
            h = toy_aggregate(features)(nnx.merge(agg_def, jax.tree.map(lambda a: a[j], agg_state)), h)
    return dec.final_norm(h)


@pytest.fixture(scope="module")
def dec4(llama):
    dec = llama.dec                                      # 4 layers
    x = jax.random.normal(jax.random.key(0), (B, 8, 64))
    features = jax.random.normal(jax.random.key(1), (B, 4, 64))
    mask = np.ones((B, 8), bool)
    mask[1, 6:] = False
    positions, mask = jnp.asarray(_positions(mask)), jnp.asarray(mask)
    plain = np.asarray(jax.jit(lambda x: dec(x, positions, mask))(x))
    return dec, x, positions, mask, features, plain


@pytest.mark.parametrize("agg_layers", [
    (0, 3),                    # start 0, stride 3, nothing after the last aggregator
    (0, 2),                    # start 0, stride 2, trailing layer 3
    (1, 2),                    # start > 0, stride 1, trailing layer 3
    (2,),                      # a single aggregator, trailing layer 3
    (0, 1, 2, 3),              # stride 1: after every layer
])
def test_aggregation_hook_matches_unrolled_loop(dec4, agg_layers):
    dec, x, positions, mask, features, plain = dec4
    aggs = make_aggregators(len(agg_layers))

    @jax.jit
    def run(x, features):
        return dec(x, positions, mask, aggregators=aggs, aggregate=toy_aggregate(features), agg_layers=agg_layers)

    ours = np.asarray(run(x, features))
    ref = np.asarray(unrolled_reference(dec, aggs, agg_layers, x, positions, mask, features))
    assert np.abs(ours - plain).max() > 1e-2             # the aggregators do change the result
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_prefill_with_cache_runs_the_aggregators(dec4):
    """Generation's prefill: the same hook with a KV cache (longer than the prompt) gives the same
    hidden states, and fills the cache and its mask."""
    dec, x, positions, mask, features, _ = dec4
    agg_layers, aggs = (1, 2), make_aggregators(2)
    h, cache = jax.jit(lambda x: dec(x, positions, mask, aggregators=aggs, aggregate=toy_aggregate(features),
                                     agg_layers=agg_layers, cache=dec.init_cache(B, 10)))(x)
    ref = unrolled_reference(dec, aggs, agg_layers, x, positions, mask, features)
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref), atol=1e-5, rtol=0)
    assert cache.k.shape == (4, B, 10, 2, 16) and int(cache.index) == 8
    assert np.array_equal(np.asarray(cache.mask), np.pad(np.asarray(mask), ((0, 0), (0, 2))))


def test_agg_layers_validation():
    assert check_agg_layers((0, 3, 6), 7) == (0, 3)
    for bad, num in [((0, 2, 3), 7), ((0, 7), 7), ((3, 1), 7), ((-1, 0), 7)]:
        with pytest.raises(ValueError, match="agg_layers"):
            check_agg_layers(bad, num)
    with pytest.raises(ValueError, match="3 stacked aggregators for 2"):
        check_agg_layers((0, 3), 7, 3)


# ------------------------------------------------------------------------------------------ KV cache

def test_incremental_decoding_matches_full_forward(llama):
    """Prefill a right-padded prompt of 8, then 8 single tokens; each step's logits equal the full
    forward's at that position (the cache is longer than needed: unused slots must stay masked)."""
    dec, prompt = llama.dec, 8
    ids = _ids(4)
    mask = _full_mask()
    mask[1, 5:prompt] = False                            # row 1: prompt of 5 + 3 pads
    positions = _positions(mask)
    full = llama.logits(ids, positions, mask)
    graphdef, state = nnx.split(dec)

    @jax.jit
    def step(state, cache, ids, positions, mask):
        d = nnx.merge(graphdef, state)
        h, cache = d(d.embed(ids), positions, mask, cache=cache)
        return d.logits(h), cache

    cache = dec.init_cache(B, T + 4, jnp.float32)
    logits, cache = step(state, cache, ids[:, :prompt], positions[:, :prompt], mask[:, :prompt])
    diffs = [np.abs(np.asarray(logits) - full[:, :prompt])[mask[:, :prompt]].max()]
    for s in range(prompt, T):
        logits, cache = step(state, cache, ids[:, s:s + 1], positions[:, s:s + 1], mask[:, s:s + 1])
        diffs.append(np.abs(np.asarray(logits)[:, 0] - full[:, s]).max())
    assert int(cache.index) == T
    print(f"KV cache max|Δlogits| = {max(diffs):.2e}")
    assert max(diffs) <= 1e-5


# ---------------------------------------------------------------------------------------------- remat

def _remat_policies_in(jaxpr) -> list:
    """Policies of every jax.checkpoint inside a (nested) jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            found.append(eqn.params["policy"])
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _remat_policies_in(sub)
    return found


def _loss_fn(llama, remat):
    """(loss(state), state) of a decoder with an aggregator after layer 0."""
    dec = _decoder(llama.cfg, llama.tensors, remat)
    graphdef, state = nnx.split(dec)
    ids = jnp.asarray(_ids(5)[:, :8])
    positions, mask = jnp.asarray(_positions(np.ones((B, 8), bool))), jnp.ones((B, 8), bool)
    aggs = make_aggregators(1)
    features = jax.random.normal(jax.random.key(2), (B, 4, 64))

    def loss(state):
        d = nnx.merge(graphdef, state)
        h = d(d.embed(ids), positions, mask, aggregators=aggs, aggregate=toy_aggregate(features), agg_layers=(0,))
        return jax.nn.logsumexp(d.logits(h), -1).mean()

    return loss, state


@pytest.mark.parametrize("name", ["none", "full", "dots", "qkv_and_outputs"])
def test_remat_policy_is_applied_to_the_layer_body(llama, name):
    loss, state = _loss_fn(llama, name)
    policies = _remat_policies_in(jax.make_jaxpr(loss)(state).jaxpr)
    expected = [REMAT_POLICIES[name]] if name != "none" else []
    # plus the aggregator step, always checkpointed (default policy: save nothing)
    assert sorted(policies, key=id) == sorted(expected + [None], key=id)


def test_every_remat_policy_has_a_recompute_account():
    from cambrian_jax import config as config_lib, flops

    assert set(REMAT_POLICIES) == set(config_lib.REMAT_POLICIES) == set(flops.RECOMPUTED)
    # An alias is MaxText's name for one of ours: the same policy object (so it needs no gradient test).
    assert all(REMAT_POLICIES[alias] is REMAT_POLICIES[ours] for alias, ours in REMAT_ALIASES.items())


@pytest.mark.parametrize("remat", sorted(set(REMAT_POLICIES) - set(REMAT_ALIASES)))
def test_gradients_with_remat_and_aggregators_match_unrolled_loop(llama, remat):
    """Gradients (decoder, aggregators, vision features) through the checkpointed layer scan and the
    checkpointed aggregator step equal those of the plain unrolled loop, for every remat policy
    (the host-offloading ones too: the CPU backend has a host memory space). Two layers keep it cheap."""
    cfg = dataclasses.replace(llama.cfg, num_layers=2)
    tensors = {k: v[:2] if k.startswith("layers/") else v for k, v in llama.tensors.items()}
    graphdef, state = nnx.split(_decoder(cfg, tensors, remat=remat))
    agg_def, agg_state = nnx.split(make_aggregators(2))
    x = jax.random.normal(jax.random.key(0), (B, 8, 64))
    features = jax.random.normal(jax.random.key(1), (B, 4, 64))
    mask = np.ones((B, 8), bool)
    mask[1, 6:] = False
    positions, mask = jnp.asarray(_positions(mask)), jnp.asarray(mask)

    def loss(state, agg_state, features, unrolled):
        dec, aggs = nnx.merge(graphdef, state), nnx.merge(agg_def, agg_state)
        if unrolled:
            h = unrolled_reference(dec, aggs, (0, 1), x, positions, mask, features)
        else:
            h = dec(x, positions, mask, aggregators=aggs, aggregate=toy_aggregate(features), agg_layers=(0, 1))
        return jax.nn.logsumexp(dec.logits(h), -1).mean()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    ours, ref = grad(state, agg_state, features, False), grad(state, agg_state, features, True)
    assert np.abs(np.asarray(ref[1]["w"]["kernel"][...])).max(axis=(1, 2)).min() > 0  # both aggregators train
    assert np.abs(np.asarray(ref[2])).max() > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5, err_msg=str(path))
    with pytest.raises(ValueError, match="remat policy 'bogus'"):
        Decoder(llama.cfg, remat="bogus", rngs=nnx.Rngs(0))
