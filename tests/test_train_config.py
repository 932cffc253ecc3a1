"""Training configs, learning-rate groups, config errors, the FLOP formula and the TPU launcher.

Nothing here compiles a model: the checks run on abstract shapes (nnx.eval_shape) and tiny pytrees.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from cambrian_jax import flops, optim, sharding
from cambrian_jax import config as config_lib
from cambrian_jax.config import ConfigError
from configs import cambrian_3b, cambrian_8b, cambrian_13b, cambrian_34b, cambrian_tiny, common

REPO = Path(__file__).resolve().parents[1]
RELEASED = {"3b": (cambrian_3b, 512, 4e-5), "8b": (cambrian_8b, 512, 4e-5), "13b": (cambrian_13b, 512, 4e-5),
            "34b": (cambrian_34b, 1024, 2e-5)}
DATA = "data1=/data/alignment,data2=/data/cambrian7m"


def trainer(config, tmp_path):
    from cambrian_jax.trainer import Trainer
    t = Trainer(config, tmp_path)
    t.close()
    return t


# ------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("size", sorted(RELEASED))
def test_released_configs_hold_the_two_stage_recipe(size):
    """Spec §7.1, one number at a time."""
    module, batch, lr2 = RELEASED[size]
    c = module.get_config(DATA)
    s1, s2 = c.stage1, c.stage2
    assert tuple(c.stages) == (1, 2)
    assert s1.trainable == [common.CONNECTOR]                        # towers and LLM frozen
    assert [(g["pattern"], g["lr"]) for g in s1.lr_groups] == [(common.PROJECTORS, 1e-3), (common.SAMPLERS, 1e-4)]
    assert s2.trainable == [common.CONNECTOR, common.DECODER]
    assert [g["lr"] for g in s2.lr_groups] == [lr2]
    assert (s1.warmup_ratio, s2.warmup_ratio) == (0.06, 0.03)
    for s in (s1, s2):
        assert s.global_batch_size == batch and s.epochs == 1 and s.num_steps == 0
        assert (s.adam_b1, s.adam_b2, s.adam_eps, s.weight_decay, s.grad_clip) == (0.9, 0.999, 1e-8, 0.0, 1.0)
        assert s.schedule == "cosine"
    assert (s1.save_interval_steps, s2.save_interval_steps) == (1000, 2000)
    assert s1.data.paths == ["/data/alignment"] and s2.data.paths == ["/data/cambrian7m"]
    assert s2.data.group_by_modality and not s1.data.get("group_by_modality", False)
    assert c.model.max_len == 2048 and c.data.max_len == 2048
    assert (c.model.dtype, c.model.remat) == ("bfloat16", "full")
    assert dict(c.mesh) == {"data": 1, "fsdp": -1, "tensor": 1}
    assert c.data.template == common.RELEASED[size]["template"]
    assert c.checkpoint.keep >= 1 and c.checkpoint.async_save


def test_switches_reshape_the_recipe():
    c = cambrian_8b.get_config(DATA + ",one_stage")
    assert tuple(c.stages) == (2,)
    c = cambrian_8b.get_config(DATA + ",connector_only")
    assert c.model.connector.connector_only and config_lib.from_dict(c.model).connector.aggregator_layers == ()
    c = cambrian_8b.get_config(DATA + ",unfreeze_towers=2,towers_lr=1e-5")
    assert common.TOWERS not in c.stage1.trainable and common.TOWERS in c.stage2.trainable
    assert (c.stage2.lr_groups[0]["pattern"], c.stage2.lr_groups[0]["lr"]) == (common.TOWERS, 1e-5)
    c = cambrian_8b.get_config(DATA + ",unfreeze_towers=12")
    assert common.TOWERS in c.stage1.trainable and common.TOWERS in c.stage2.trainable
    # The README's rule for other batch sizes: lr · sqrt(bs / 512).
    c = cambrian_8b.get_config(DATA + ",batch=128,accum=2")
    assert c.stage1.global_batch_size == 128 and c.stage1.accum_steps == 2
    assert c.stage1.lr_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    assert c.stage2.lr_groups[0]["lr"] == pytest.approx(4e-5 * 0.5)
    c = cambrian_8b.get_config(DATA + ",llm=/ckpt/llama3,towers=/ckpt/towers,tokenizer=/ckpt/llama3")
    assert c.init.llm == "/ckpt/llama3" and c.data.tokenizer_dir == "/ckpt/llama3"
    assert set(dict(c.init.towers)) == set(common.RELEASED_TOWERS)
    with pytest.raises(ValueError, match="unknown config switch"):
        cambrian_8b.get_config("bacth=4")


@pytest.mark.parametrize("switches, message", [
    ("bacth=4", "unknown config switch 'bacth'; known: accum, adapter, batch"),
    ("batch=abc", "config switch batch='abc': not an int"),
    ("one_stage=maybe", "config switch one_stage='maybe': give one_stage alone"),
])
def test_switch_mistakes_are_config_errors(switches, message):
    for module in (cambrian_8b, cambrian_tiny):
        if module is cambrian_tiny and "accum" in message:
            message = message.replace("accum, adapter, batch", "batch, connector")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            module.get_config(switches)
    with pytest.raises(ConfigError, match="config switch towers='clip\\+vit'"):
        cambrian_tiny.get_config("towers=clip+vit")


def test_tiny_data_switches_point_the_stages_at_prepared_folders():
    """The tiny config's data1/data2 (';'-separated, as the released configs') and tokenizer switches;
    --config.data.paths=[…] is a list, which config_flags cannot override."""
    c = cambrian_tiny.get_config("data1=/p/align,data2=/p/a; /p/b,one_stage")
    assert c.data.source == "array_record" and c.data.synthetic_tokenizer and not c.data.tokenizer_dir
    assert c.stage1.data.paths == ["/p/align"] and c.stage2.data.paths == ["/p/a", "/p/b"]
    assert tuple(c.stages) == (2,) and c.eval is None and not c.data.cache_rows
    c = cambrian_tiny.get_config("data2=/p/a,tokenizer=/tok")
    assert c.data.tokenizer_dir == "/tok"
    c = cambrian_tiny.get_config("")
    assert c.data.source == "synthetic" and c.eval is not None         # the default is unchanged


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder of one text-only record, and a folder of synthetic tokenizers per template:
    what the released configs' data1/data2 and tokenizer switches need to pass the data checks."""
    import json

    from cambrian_jax.data import prepare, synthetic
    base = tmp_path_factory.mktemp("released_data")
    (base / "d.jsonl").write_text(json.dumps({"id": "t", "conversations": [
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}) + "\n")
    (base / "images").mkdir()
    prepare.prepare([str(base / "d.jsonl")], str(base / "images"), str(base / "out"), workers=0, verbose=False)
    for template in ("llama_3", "chatml_direct"):
        synthetic.build_tiny_tokenizer(str(base / template), template)
    return base


def _released(size, prepared):
    """The released config on real (tiny) prepared data, with a tokenizer of its template; the model's
    image_position follows the stand-in tokenizer (it does not change the parameter tree)."""
    from cambrian_jax.data import templates
    from cambrian_jax.data.tokenizer import load_tokenizer
    template = common.RELEASED[size]["template"]
    c = RELEASED[size][0].get_config(f"data1={prepared}/out,data2={prepared}/out,tokenizer={prepared}/{template}")
    c.model.image_position = templates.image_position(template, load_tokenizer(str(prepared / template)))
    return c


@pytest.mark.parametrize("size", ["8b", "34b"])
def test_released_stages_train_what_the_spec_says(size, tmp_path, prepared):
    """On the real parameter tree: stage 1 = the whole connector (in-LLM aggregators included)."""
    t = trainer(_released(size, prepared), tmp_path)
    p1, p2 = t.plans[1], t.plans[2]
    connector = [p for p in t.param_paths if p.startswith("connector/")]
    assert p1.trainable_paths == connector
    assert any(p.startswith("connector/vision_sampler_layers/") for p in p1.trainable_paths)
    assert sorted(p2.trainable_paths) == sorted(connector + [p for p in t.param_paths if p.startswith("decoder/")])
    assert not [p for p in p1.trainable_paths + p2.trainable_paths if p.startswith("towers/")]
    groups = [(common.PROJECTORS, 1e-3), (common.SAMPLERS, 1e-4)]
    for path in connector:
        name = path.split("/")[1]
        want = 0 if name.startswith(("mm_projector", "image_newline")) else 1
        assert optim.group_of(path, groups) == want, path
    assert set(p1.groups) == {"projectors", "samplers"} and p2.groups == {"all": len(p2.trainable_paths)}


def test_a_connector_without_samplers_leaves_the_optional_group_empty(tmp_path):
    c = cambrian_tiny.get_config("micro")
    c.model.connector.type = "mlp2x_gelu"
    p1 = trainer(c, tmp_path).plans[1]
    assert p1.groups["samplers"] == 0 and p1.groups["projectors"] == len(p1.trainable_paths) > 0


def test_micro_switch_keeps_every_part_small():
    c = cambrian_tiny.get_config("micro")
    cfg = config_lib.from_dict(c.model)
    assert len(cfg.towers) == 1 and cfg.decoder.num_layers == 2 and cfg.connector.aggregator_layers == (0,)


# ------------------------------------------------------------------------------------------ errors

def _micro(**overrides):
    c = cambrian_tiny.get_config("micro,steps1=4,steps2=4,batch=8")
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.mark.parametrize("overrides, field", [
    ({"mesh.fsdp": 2}, "config field mesh"),                                # 1 device here
    ({"stage1.accum_steps": 3}, "config field stage1.global_batch_size"),
    ({"stage2.trainable": ["^connector/", "^decoder/lyers/"]}, "config field stage2.trainable"),
    ({"stage1.lr_groups": [dict(name="towers", pattern="^towers/", lr=1.0), dict(name="rest", pattern=".", lr=1.0)]},
     "config field stage1.lr_groups"),
    ({"data.source": "array_record"}, "config field stage1.data.paths"),
    ({"stages": (3,)}, "config field stages"),
    ({"model.connector.image_token_len": 15}, "config field model.image_token_len"),
])
def test_config_errors_name_the_field_before_anything_compiles(overrides, field, tmp_path):
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *a, **k: compiled.append(event) if "backend_compile" in event else None)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        trainer(_micro(**overrides), tmp_path)
    assert not compiled


def test_stage_two_alone_needs_a_finished_stage_one(tmp_path):
    from cambrian_jax.trainer import StageNotFinished

    t = trainer(_micro(), tmp_path)
    with pytest.raises(StageNotFinished, match=r"stage 2 starts from stage 1's final parameters, but stage 1 "
                                               r"has not finished .* one_stage"):
        t.run_stage(2)


TOWER_MESH_SCRIPT = """
import json, sys
from cambrian_jax.trainer import Trainer
from configs import cambrian_tiny, common
out = {}
for name, mesh, trainable in (("frozen", dict(fsdp=2, tensor=2), [common.CONNECTOR, common.DECODER, "^towers/0/"]),
                              ("tensor1", dict(fsdp=4, tensor=1), None)):
    c = cambrian_tiny.get_config(sys.argv[1])
    c.mesh.update(mesh)
    if trainable:
        c.stage2.trainable = trainable
    t = Trainer(c, f"{sys.argv[2]}/{name}")
    t.close()
    out[name] = dict(mesh=dict(t.mesh.shape), towers=sorted({p.split("/")[1] for p in t.plans[2].trainable_paths
                                                            if p.startswith("towers/")}))
print("RESULT", json.dumps(out))
"""


def test_trained_convnext_with_tensor_parallelism_is_refused(tmp_path):
    """On a real 4-device mesh (data=1 × fsdp=2 × tensor=2): the trainer refuses a trainable ConvNeXt
    tower before writing or compiling anything (CLI exit 2, one line), and accepts the same mesh with
    ConvNeXt frozen (the CLIP tower still trained) and a trained ConvNeXt with tensor=1."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    switches = "towers=clip+convnext,steps1=1,steps2=1,batch=8"      # stage 2 trains both towers
    p = subprocess.run([sys.executable, "-m", "cambrian_jax.train", f"--config=configs/cambrian_tiny.py:{switches}",
                        "--config.mesh.fsdp=2", "--config.mesh.tensor=2", f"--workdir={tmp_path / 'refused'}"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == ("error: config field stage2.trainable: ConvNeXt tower(s) 1 are trainable on a mesh "
                                "with tensor=2, where XLA computes their depthwise-convolution gradients 2x too "
                                "large; freeze them in this stage or use mesh.tensor=1"), p.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    p = subprocess.run([sys.executable, "-c", TOWER_MESH_SCRIPT, switches, str(tmp_path)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "RESULT" in p.stdout, p.stderr[-3000:]
    got = json.loads(p.stdout.split("RESULT", 1)[1])
    assert got == {"frozen": {"mesh": {"data": 1, "fsdp": 2, "tensor": 2}, "towers": ["0"]},
                   "tensor1": {"mesh": {"data": 1, "fsdp": 4, "tensor": 1}, "towers": ["0", "1"]}}


def test_batch_errors_say_what_would_work():
    class Mesh:
        shape = {"data": 2, "fsdp": 4, "tensor": 1}
    sharding.check_batch(16, 2, Mesh, 1, "stage1.global_batch_size")
    with pytest.raises(ConfigError, match=r"stage1\.global_batch_size: 12 rows .* multiple of 8"):
        sharding.check_batch(12, 1, Mesh, 1, "stage1.global_batch_size")
    with pytest.raises(ConfigError, match="over 3 hosts"):
        sharding.check_batch(16, 1, Mesh, 3, "stage1.global_batch_size")
    with pytest.raises(ConfigError, match="mesh"):
        sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)


def test_cli_reports_a_config_error_and_exits_2(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "cambrian_jax.train", "--config=configs/cambrian_tiny.py:micro",
                        "--config.mesh.fsdp=3", f"--workdir={tmp_path}"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error: config field mesh") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------ optimizer

def _toy_params():
    k = jax.random.split(jax.random.key(0), 4)
    return {"connector": {"mm_projector": {"0": {"kernel": jax.random.normal(k[0], (3, 4)),
                                                 "bias": jax.random.normal(k[1], (4,))}},
                          "image_newline": jax.random.normal(k[2], (4,)),
                          "vision_sampler_layers": {"layer": {
                              "norm": {"scale": jnp.ones((2, 4))},
                              "proj_in": {"kernel": jax.random.normal(k[3], (2, 4, 4))}}}}}


def _stage(**kw):
    s = common.stage(trainable=[common.CONNECTOR], lr_groups=[("projectors", common.PROJECTORS, 1e-3),
                                                              ("samplers", common.SAMPLERS, 1e-4)],
                     warmup_ratio=0.25, global_batch_size=8)
    s.update(kw)
    return s


def hf_cosine(step, peak, total, ratio):
    """transformers.get_cosine_schedule_with_warmup, as HF Trainer sets it up."""
    warm = math.ceil(total * ratio)
    if step < warm:
        return peak * step / max(1, warm)
    progress = (step - warm) / max(1, total - warm)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def test_schedule_is_hf_cosine_with_warmup():
    for total, ratio in ((100, 0.06), (10, 0.03), (7, 0.0)):
        s = optim.schedule(2e-3, total, ratio)
        for t in range(total + 1):
            assert float(s(t)) == pytest.approx(hf_cosine(t, 2e-3, total, ratio), rel=1e-5, abs=1e-12), (total, t)


def test_each_group_moves_at_its_own_learning_rate():
    """Constant gradients: Adam's update is lr_t · sign(g) per element, so |Δ| reads out each group's lr."""
    params = _toy_params()
    total = 8
    tx, schedules = optim.make_optimizer(_stage(), params, total)
    assert set(schedules) == {"projectors", "samplers"}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(total):
        updates, state = update(grads, state, params)
        for path, u in jax.tree_util.tree_leaves_with_path(updates):
            name = optim.path_str(path)
            group = "projectors" if "mm_projector" in name or "image_newline" in name else "samplers"
            want = hf_cosine(t, 1e-3 if group == "projectors" else 1e-4, total, 0.25)
            np.testing.assert_allclose(np.abs(np.asarray(u)), want, rtol=1e-4, atol=1e-12, err_msg=f"{name} t={t}")


def test_weight_decay_skips_biases_and_norm_scales():
    params = _toy_params()
    tx, _ = optim.make_optimizer(_stage(weight_decay=0.1, warmup_ratio=0.0, lr_groups=[
        dict(name="all", pattern=".", lr=1.0)]), params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = optim.path_str(path)
        p = dict((optim.path_str(q), x) for q, x in jax.tree_util.tree_leaves_with_path(params))[name]
        if name.endswith(("bias", "scale")):
            np.testing.assert_array_equal(u, 0.0, err_msg=name)
        else:
            np.testing.assert_allclose(u, -0.1 * p, rtol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------ FLOPs

def test_one_flop_formula_for_every_stage():
    cfg = config_lib.from_dict(cambrian_8b.get_config(DATA).model)
    towers = sum(flops.tower_forward(t) for t in cfg.towers)
    connector, aggregators = flops.connector_forward(cfg)
    decoder = flops.decoder_forward(cfg, 2048)
    s1 = flops.train_flops_per_sample(cfg, 2048, train_decoder=False)
    s2 = flops.train_flops_per_sample(cfg, 2048, train_decoder=True)
    # A frozen LLM costs 2× its forward except its self-attention (no weights: both operands need grads).
    attention = cfg.decoder.num_layers * flops.decoder_layer_forward(cfg, 2048)["attention"]
    assert s1 == pytest.approx(towers + 3 * (connector + aggregators) + 2 * (decoder - attention) + 3 * attention)
    assert s2 - s1 == pytest.approx(decoder - attention)
    unfrozen = flops.train_flops_per_sample(cfg, 2048, train_decoder=True, train_towers=True)
    assert unfrozen - s2 == pytest.approx(2 * towers)
    # Causal attention counts half the score matrix: 8B decoder ≈ 2·N·T + half of 4·T²·H per layer.
    d = cfg.decoder
    params = d.num_layers * (2 * d.hidden_size * d.num_heads * d.head_size + 2 * d.hidden_size * d.num_kv_heads
                             * d.head_size + 3 * d.hidden_size * d.intermediate_size) + d.hidden_size * d.vocab_size
    attn = d.num_layers * 2 * 2048 * 2048 * d.num_heads * d.head_size
    assert decoder == pytest.approx(2 * 2048 * params + attn)
    assert 7e9 < params < 8.1e9


# ------------------------------------------------------------------------------------------ launcher

def test_launch_tpu_documents_every_option():
    p = subprocess.run(["bash", str(REPO / "launch_tpu.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for option in ("--name", "--zone", "--type", "--version", "--project", "--spot", "--repo", "--branch",
                   "--workdir", "--config", "--stage", "--env", "--setup-only", "--delete", "--dry-run"):
        assert option in p.stdout, option
    assert "v4-512" in p.stdout and "v5p" in p.stdout


def test_launch_tpu_says_when_gcloud_is_missing(tmp_path):
    bash = shutil.which("bash")
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    for tool in ("dirname", "cat", "sed", "printf", "tr", "basename", "mktemp", "git", "date", "grep", "awk"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), tmp_path / tool)
    p = subprocess.run([bash, str(REPO / "launch_tpu.sh"), "--name", "x", "--zone", "us-central2-b", "--type",
                        "v4-8", "--workdir", "gs://b/w", "--", "--config", "configs/cambrian_8b.py"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 127
    assert "gcloud" in p.stderr and "https://cloud.google.com/sdk/docs/install" in p.stderr
