"""The attention implementations of cambrian_jax/attention.py against the XLA reference (fp32, CPU).

  splash   the Pallas Splash kernel in interpret mode: outputs and the gradients of q, k and v equal
           the einsum + softmax reference to 1e-5 relative, with grouped-query heads, masked image
           cells in the middle of a row, right padding, a sequence that is not a multiple of the
           kernel's block (padded inside), several blocks (the causal block skipping), and a fully
           padded row (finite; no loss reads it); under shard_map on a 2-device mesh (rows split)
           the same; and a tiny Cambrian gives the same logits with either
  cudnn    the same comparison on an NVIDIA GPU; skips with a reason elsewhere
  auto     picks splash on TPU, cudnn on GPU, xla on CPU; unknown names are refused naming the field
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cambrian_jax import attention


def _inputs(b=3, t=200, nh=4, kv=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for h in (nh, kv, kv))
    keys = np.ones((b, t), bool)
    keys[0, 40:90] = False          # row 0: an image block's padding cells
    keys[1, 150:] = False           # row 1: right padding
    keys[2, :] = False              # row 2: a fully padded row (no allowed key anywhere)
    return q, k, v, jnp.asarray(keys)


def _answered(keys: jax.Array) -> np.ndarray:
    """[B, T]: query rows with at least one allowed key (causal), where implementations must agree."""
    return np.cumsum(np.asarray(keys), axis=1) > 0


def _compare(impl: str, q, k, v, keys, tol=1e-5):
    ok = _answered(keys)
    cotangent = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32) * ok[..., None, None]

    def run(impl):
        return jax.jit(lambda q, k, v: attention.attend(q, k, v, keys, implementation=impl))

    def loss(impl):
        return jax.jit(lambda q, k, v: jnp.sum(run(impl)(q, k, v) * cotangent))

    ref = run("xla")(q, k, v)
    got = run(impl)(q, k, v)
    assert np.isfinite(np.asarray(got)).all()
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(ref)[ok], atol=tol * scale, rtol=0)
    ref_g = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got_g = jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)
    for name, r, g in zip("qkv", ref_g, got_g):
        assert np.isfinite(np.asarray(g)).all(), name
        rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
        assert rel <= tol, f"d{name}: relative difference {rel:.1e}"
    return got


def test_the_xla_layouts_compute_the_same_attention():
    """XLA's two layouts (heads first on CPU, grouped elsewhere) agree on every row, the fully padded
    one included (uniform weights in both), with their gradients: fp32, 1e-6 relative."""
    q, k, v, keys = _inputs(nh=6, kv=2)
    allowed = attention.causal_allowed(keys, q.shape[1])
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    outs, grads = [], []
    for form in (attention._grouped, attention._heads_first):
        f = jax.jit(lambda q, k, v, form=form: form(q, k, v, allowed))
        outs.append(np.asarray(f(q, k, v)))
        grads.append(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * cotangent), argnums=(0, 1, 2))(q, k, v))
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-6 * np.abs(outs[0]).max())
    for name, r, g in zip("qkv", *grads):
        assert float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) <= 1e-6, name
    assert abs(outs[0][2] - np.asarray(v)[2].mean(axis=0).repeat(3, axis=0)).max() < 1e-5     # uniform weights


def test_splash_equals_the_xla_reference():
    q, k, v, keys = _inputs()                          # 200 positions: two 128-blocks after padding
    _compare("splash", q, k, v, keys)


def test_splash_with_one_kv_head_and_a_short_sequence():
    q, k, v, keys = _inputs(b=3, t=24, nh=4, kv=1, d=8, seed=1)
    _compare("splash", q, k, v, keys)


def test_the_comparison_sees_a_wrong_mask():
    """A kernel that ignored the key mask would fail _compare: its outputs differ on answered rows."""
    q, k, v, keys = _inputs(t=120, seed=2)
    unmasked = attention.attend(q, k, v, jnp.ones_like(keys), implementation="splash")
    ref = attention.attend(q, k, v, keys, implementation="xla")
    ok = _answered(keys)
    assert float(jnp.abs(unmasked - ref).max()) > 1e-2
    assert np.abs(np.asarray(unmasked - ref))[ok].max() > 1e-2


def _on_a_mesh():
    """Splash under shard_map (rows split over fsdp=2, heads over tensor=2) against the reference."""
    from cambrian_jax import sharding

    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    q, k, v, keys = _inputs(b=4, t=40, seed=3)
    keys = keys.at[3, 10:].set(False)
    with sharding.rules_context(sharding.DEFAULT_RULES, mesh):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.attend(q, k, v, keys, implementation="splash"))(q, k, v))
        # The kernel runs per device on its block: 2 of the 4 rows, 2 of the 4 query heads, 1 of the 2 KV heads.
        assert "shard_map" in jaxpr and "f32[2,40,2,16]" in jaxpr and "f32[2,40,1,16]" in jaxpr, jaxpr[:2000]
        _compare("splash", q, k, v, keys)
    print("ok")


def test_splash_under_shard_map_on_a_mesh():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run([sys.executable, __file__], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_equals_the_xla_reference():
    q, k, v, keys = _inputs(t=256, d=64)
    _compare("cudnn", q.astype(jnp.bfloat16).astype(jnp.float32), k, v, keys, tol=2e-2)


def test_auto_and_unknown_names():
    assert [attention.resolve("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "xla"]
    assert attention.resolve("splash", "cpu") == "splash"
    assert attention.resolve("auto") == "xla"                      # these tests run on a CPU
    with pytest.raises(ValueError, match="model.attention.*'flash'.*auto, xla, splash, cudnn"):
        attention.resolve("flash")


def test_a_tiny_cambrian_gives_the_same_logits_with_splash():
    from cambrian_jax import config as config_lib
    from cambrian_jax.config import IMAGE_TOKEN_INDEX
    from cambrian_jax.model import init_model, static_layout
    from configs import cambrian_tiny

    config = cambrian_tiny.get_config("micro")
    cfg = config_lib.from_dict(config.model)
    model = init_model(cfg, 0)
    rng = np.random.default_rng(0)
    v, p = cfg.decoder.vocab_size, cfg.image_position
    ids = [np.concatenate([rng.integers(1, v, p), [IMAGE_TOKEN_INDEX], rng.integers(1, v, n)]) for n in (14, 6)]
    lay = static_layout(cfg, ids, [(44, 20), (18, 40)])      # wide and tall images: masked cells; row 1 padded
    size = cfg.towers[0].image_size
    inputs = dict(input_ids=lay["input_ids"], pixels=[rng.standard_normal((2, size, size, 3)).astype(np.float32)],
                  tower_masks=list(lay["tower_masks"]), attention_mask=lay["attention_mask"],
                  positions=lay["positions"])
    assert not lay["attention_mask"].all() and not lay["tower_masks"][0].all()
    graphdef, state = nnx.split(model)

    def logits(impl):
        m = nnx.merge(graphdef, state)
        m.decoder.attention = impl
        return np.asarray(m(**inputs))

    ref, got = logits("xla"), logits("splash")
    answered = _answered(lay["attention_mask"])
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got[answered], ref[answered], atol=1e-5 * scale, rtol=0)
    with pytest.raises(ValueError, match="model.attention"):
        config_lib.from_dict(dict(config.model, attention="flash"))


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    _on_a_mesh()
