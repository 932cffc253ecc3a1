"""The benchmarks run at their smallest and their figures agree with each other and with their sources.

No time is asserted: the checks are that every figure is finite, that derived figures are what their
definitions make of the measured ones (tokens/s = tokens per step ÷ step time, MFU = FLOPs ÷ time ÷
peak, …), that the FLOPs are cambrian_jax.flops' for the stage, and that the things compared really
are the same (the decoder and LlamaForCausalLM start from one loss; the benchmark's batch has the
pipeline's fields).
"""
from __future__ import annotations

import math
import statistics

import jax
import pytest
from flax import nnx

from benchmarks import attention as attention_bench
from benchmarks import data_throughput, decoder_vs_torch, generate_speed, import_memory
from benchmarks import train_step as step_bench
from cambrian_jax import config as config_lib
from cambrian_jax import flops
from cambrian_jax.data import pipeline, synthetic
from cambrian_jax.model import Cambrian
from configs import cambrian_mid

MICRO = "configs/cambrian_tiny.py:micro"
REL = 1e-12          # derived figures are computed from the same floats: equal up to rounding


@pytest.fixture(scope="module")
def step():
    return step_bench.main(["--config", MICRO, "--steps", "2", "--warmup", "1", "--batch", "2"])


def test_train_step_figures_follow_from_the_measured_step_time(step):
    times = step["step_times"]
    assert len(times) == 2 and all(t > 0 and math.isfinite(t) for t in times)
    t = step["step_time"]
    assert t == statistics.median(times)
    assert step["tokens_per_step"] == 2 * 96                                  # batch × micro's max_len
    assert step["tokens_per_sec"] == pytest.approx(step["tokens_per_step"] / t, rel=REL)
    assert step["samples_per_sec"] == pytest.approx(2 / t, rel=REL)
    assert step["tflops_per_device"] == pytest.approx(step["flops_per_step"] / t / 1e12 / step["devices"], rel=REL)
    assert step["mfu"] == pytest.approx(step["flops_per_step"] / t / (step["peak_flops_per_device"] * step["devices"]),
                                        rel=REL)
    assert step["hfu"] >= step["mfu"] > 0
    assert step["peak_is_placeholder"] and step["peak_flops_per_device"] == flops.PEAK_FLOPS["cpu"]
    assert step["fraction_of_matmul"] == pytest.approx(step["tflops_per_device"] / step["matmul_tflops"], rel=REL)
    assert step["compile_s"] > 0 and step["lower_s"] > 0
    mem = step["memory_gib"]
    assert mem["total"] == pytest.approx(mem["argument"] + mem["output"] + mem["temp"] - mem["alias"], rel=REL)
    assert step["host_peak_rss_gib"] > 0
    assert step["attention"].startswith("xla (model.attention='auto'")            # a CPU: the XLA form
    printed = step_bench.report(MICRO, step)
    assert f"{step['tokens_per_sec']:,.0f} tokens/s" in printed
    assert f"MFU: {100 * step['mfu']:.2f} %" in printed


def test_train_step_counts_the_stage_flops_and_parameters(step):
    config = step_bench.load_config(MICRO)
    cfg = config_lib.from_dict(config.model)
    # micro's stage 2 trains the connector and the decoder; the towers are frozen (1 × forward).
    assert step["flops_per_step"] == pytest.approx(
        2 * flops.train_flops_per_sample(cfg, 96, train_decoder=True, train_towers=False), rel=REL)
    params = nnx.state(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    towers = sum(math.prod(a.shape) for a in jax.tree.leaves(params["towers"]))
    assert step["frozen_params"] == towers
    assert step["trainable_params"] + step["frozen_params"] == sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    # A random model's first losses sit near ln(vocab): the step computed the token-mean cross-entropy.
    assert abs(step["loss"] - math.log(cfg.decoder.vocab_size)) < 0.5


def test_benchmark_batch_has_the_pipelines_fields_shapes_and_dtypes(tmp_path):
    config = step_bench.load_config(MICRO)
    cfg = config_lib.from_dict(config.model)
    tok = pipeline.synthetic_tokenizer(str(tmp_path / "tok"), config.data.template)
    data = pipeline.data_config(template=config.data.template, global_batch_size=2, read_threads=1)
    it = pipeline.make_memory_dataset(synthetic.generate(2), data, cfg, tok, 0, 1)
    real = next(it)
    it.close()
    fake = step_bench.contract_batch(cfg, 2, cfg.max_len)
    assert {k: (v.shape, v.dtype) for k, v in fake.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_feeding_ratio_is_pipeline_rate_over_step_rate(step, monkeypatch):
    # The step's figures come from the `step` fixture (one compile per module); the pipeline runs for real.
    monkeypatch.setattr(step_bench, "measure", lambda *args, **kwargs: step)
    out = data_throughput.main(["--num", "1", "--feed", MICRO, "--feed-batch", "2", "--feed-batches", "2"])
    assert out["table"] and all(v > 0 and math.isfinite(v) for v in out["table"].values())
    f = out["feed"]
    assert f["pipeline_before"] > 0 and f["pipeline_after"] > 0
    assert f["pipeline_per_core"] == pytest.approx((f["pipeline_before"] + f["pipeline_after"]) / 2, rel=REL)
    assert f["step_samples_per_sec"] == step["samples_per_sec"]
    assert f["ratio"] == pytest.approx(f["pipeline_per_core"] / f["step_samples_per_sec"], rel=REL)
    assert f["cores_needed"] == math.ceil(f["step_samples_per_sec"] / f["pipeline_per_core"])
    assert f["batch_keys"]["input_ids"] == ((2, 96), "int32")


def test_decoder_vs_torch_same_start_and_ratio_of_medians_per_round():
    r = decoder_vs_torch.main(["--layers", "1", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "128",
                               "--seq", "16", "--batch", "2", "--steps", "2", "--rounds", "3", "--matmul", "64",
                               "--compare-layouts", "--profile", "3"])
    assert r["loss_jax"] == pytest.approx(r["loss_torch"], rel=1e-5)      # same weights, same batch, fp32
    assert r["loss_grouped"] == pytest.approx(r["loss_jax"], rel=1e-6) and r["layout_ratio"] > 0
    assert len(r["profile"]) == 3 and all(s > 0 for _, s in r["profile"])
    assert r["jax_compiles"] == 1
    assert r["ratios"] == [tt / tj for tj, tt in r["rounds"]]
    assert r["ratio"] == statistics.median(r["ratios"]) > 0
    assert r["matmul_ratios"] == [mt / mj for mj, mt in r["matmuls"]]
    assert r["matmul_ratio"] == statistics.median(r["matmul_ratios"]) > 0
    assert r["jax_tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / r["jax_step"], rel=REL)
    assert r["torch_tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / r["torch_step"], rel=REL)


def test_import_memory_ratio_is_peak_above_baseline_over_checkpoint(tmp_path):
    r = import_memory.main(["--gb", "0.0001", "--hidden", "64", "--vocab", "256", "--dir", str(tmp_path / "ckpt")])
    # --gb below one layer: one layer of hidden 64 (MLP 256, 2 heads of 32 → q, o 64², k, v 64×32,
    # 3 MLP matrices, 2 norms), embedding and head 256 × 64, final norm: float32.
    floats = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 256 + 2 * 64 + 2 * 256 * 64 + 64
    assert r["checkpoint_mb"] == pytest.approx(4 * floats / 2**20, rel=1e-9)
    for m in r["modes"].values():
        assert m["peak_mb"] >= m["base_mb"] > 0 and m["seconds"] > 0
        assert m["ratio"] == pytest.approx((m["peak_mb"] - m["base_mb"]) / r["checkpoint_mb"], rel=REL)
    assert not (tmp_path / "ckpt").exists()                              # removed unless --keep


@pytest.mark.slow
def test_generate_speed_tokens_per_second_is_new_tokens_over_decode_time():
    r = generate_speed.main(["--config", MICRO, "--batch", "1", "--text-tokens", "4", "--new-tokens", "4",
                             "--repeats", "1"])
    (row,) = r["rows"]
    assert row["new_tokens"] == 4
    assert row["tokens_per_sec"] == pytest.approx(row["new_tokens"] / row["decode_s"], rel=REL)
    assert row["ms_per_step"] == pytest.approx(1000 * row["decode_s"] / 4, rel=REL)
    assert r["compiled"]["prefill"] >= 1 and r["compiled"]["decode"] >= 1


def _decoder_params(d: dict) -> int:
    h, f, v, nh, kv = d["hidden_size"], d["intermediate_size"], d["vocab_size"], d["num_heads"], d["num_kv_heads"]
    hd = h // nh
    per_layer = h * nh * hd * 2 + 2 * h * kv * hd + 3 * h * f + 2 * h
    return d["num_layers"] * per_layer + 2 * v * h + h


def test_mid_config_is_a_1b_decoder_behind_the_four_tower_kinds():
    config = cambrian_mid.get_config()
    cfg = config_lib.from_dict(config.model)
    params = nnx.state(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    n_decoder = sum(math.prod(a.shape) for a in jax.tree.leaves(params["decoder"]))
    assert n_decoder == _decoder_params(dict(config.model.decoder)) == 1_104_480_256
    assert [t.kind for t in cfg.towers] == ["siglip", "clip", "dinov2", "convnext"]
    assert [t.image_size for t in cfg.towers] == [384, 336, 378, 1024]
    assert [t.side for t in cfg.towers] == [24, 24, 24, 96]                   # the released token grids
    assert cfg.connector.aggregator_layers == (0, 3, 6, 9, 12, 15)
    assert (cfg.dtype, cfg.remat, cfg.max_len, config.stage2.global_batch_size) == ("bfloat16", "full", 2048, 8)


def test_mid_config_runlocal_keeps_the_widths_and_shrinks_the_depth():
    big = config_lib.from_dict(cambrian_mid.get_config().model)
    small = config_lib.from_dict(cambrian_mid.get_config("runlocal").model)
    assert small.decoder.num_layers == 2 and small.connector.aggregator_layers == (0,)
    assert small.decoder.hidden_size == big.decoder.hidden_size and small.decoder.vocab_size == big.decoder.vocab_size
    assert [t.num_layers for t in small.towers[:3]] == [2, 2, 2] and small.towers[3].depths == (1, 1, 1, 1)
    assert [t.hidden_size for t in small.towers[:3]] == [t.hidden_size for t in big.towers[:3]]
    assert (small.dtype, small.max_len) == ("float32", 1024)
    layers = config_lib.from_dict(cambrian_mid.get_config("layers=7").model)
    assert layers.decoder.num_layers == 7 and layers.connector.aggregator_layers == (0, 3, 6)
    with pytest.raises(ValueError, match="convnext_depths"):
        cambrian_mid.get_config("convnext_depths=3+3")


def test_the_attention_benchmark_compares_against_the_reference():
    """Its parity figures are real comparisons: small (fp32 agreement) but not zero (another computation)."""
    figures = attention_bench.main(["--no-tpu"])
    for impl, f in figures["parity"].items():
        assert 0 < f["output"] < 1e-4 and 0 < f["gradients"] < 1e-4, (impl, f)
    assert figures["tpu"] == {}
