"""Export keeps the towers it trained (export_hf --towers, pretrained.load_pretrained).

  towers out      each tiny tower (configs/cambrian_tiny.py, random weights) written by export goes
                  back into transformers' own class (CLIPVisionModel, SiglipVisionModel, Dinov2Model,
                  ConvNextModel) and gives our tower's features, ≤ 1e-5 · max(1, max|ref|) in float32; the
                  tiny ConvNeXt (open_clip's eps 1e-5, which HF ConvNextModel cannot hold) is written in
                  open_clip's format, read with timm's names into a ConvNextModel set to eps 1e-5; and
                  pretrained.load_tower reads every folder back as the same TowerConfig, bit-identical
  configs         hf_config_for(tower) read by hf_tower_config is the tower again (or a ConfigError
                  that names what HF cannot hold)
  whole model     export(towers='all') → load_pretrained(export) alone: the same config, bit-identical
                  parameters, the same logits on an image + text prompt; a tower left out is listed
                  in the one error; an explicit towers={name: dir} wins over an included folder
  CLI             a real trainer workdir (micro, towers trained in stage 2): --towers auto writes the
                  trained tower, none warns once and writes none, the export answers as the workdir's
                  model; mistakes are one line, exit 2, nothing written
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import cambrian_jax
from cambrian_jax import config as config_lib
from cambrian_jax import export_hf, pretrained, towers, workdir
from cambrian_jax.config import ConfigError
from cambrian_jax.convert.hf_towers import hf_config_for, hf_tower_config
from cambrian_jax.convert.safetensors_io import CheckpointError, open_checkpoint
from cambrian_jax.model import Cambrian
from configs import cambrian_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
F = torch.nn.functional

REPO = Path(__file__).resolve().parents[1]
FEATURE_TOL = 1e-5          # relative to max(1, max|reference|), float32
LOGIT_TOL = 1e-5            # absolute, float32 (the same parameters and program: measured 0)
MICRO_TRAINED = "configs/cambrian_tiny.py:micro,steps1=2,steps2=2,batch=8,unfreeze_towers=2"


def random_model(cfg):
    """The model with every parameter random (norm scales around 1), without random-init compiles."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    filled = []
    for path, v in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        x = rng.standard_normal(v.shape).astype(np.float32) * 0.2
        if name.endswith(("scale", "ls1", "ls2", "gamma")):
            x += 1.0
        filled.append((path, v.replace(jnp.asarray(x, v.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.from_dict(cambrian_tiny.get_config().model)
    model = random_model(cfg)
    return cfg, model, export_hf.flat_params(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    cfg, model, flat = tiny
    out = tmp_path_factory.mktemp("export") / "cambrian-tiny"
    summary = export_hf.export(flat, cfg, out, towers="all")
    return out, summary


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def run_tower(tower, pixels):
    graphdef, state = nnx.split(tower)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(pixels)))


def multi_stage_ref(hidden_states, side):
    grid = torch.cat([F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
                      for m in hidden_states[1:5]], dim=1)
    return grid.permute(0, 2, 3, 1).reshape(grid.shape[0], side * side, grid.shape[1])


def hf_features(kind, model, pixels, side):
    """What Cambrian takes from each transformers tower (spec §2.1), at its own token grid."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        if kind == "clip":
            return model(x, output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
        if kind == "siglip":
            return model(x).last_hidden_state.numpy()
        if kind == "dinov2":
            return model(x).last_hidden_state[:, 1:].numpy()
        return multi_stage_ref(model(x, output_hidden_states=True).hidden_states, side).numpy()


def timm_to_hf_convnext(state):
    """open_clip's ConvNeXt trunk (timm names under visual.trunk.) → HF ConvNextModel names."""
    rules = [(r"stem\.0\.", "embeddings.patch_embeddings."), (r"stem\.1\.", "embeddings.layernorm."),
             (r"stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
             (r"stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
             (r"conv_dw\.", "dwconv."), (r"\.norm\.", ".layernorm."), (r"mlp\.fc1\.", "pwconv1."),
             (r"mlp\.fc2\.", "pwconv2."), (r"\.gamma$", ".layer_scale_parameter")]
    out = {}
    for key, value in state.items():
        name = key.removeprefix("visual.trunk.")
        for a, b in rules:
            name = re.sub(a, b, name)
        out[name] = torch.from_numpy(np.array(value, order="C"))
    return out


def write_tower(folder, tower_cfg, params):
    """A tower folder as export writes it (export_hf.tower_files), for a tower not in the tiny model."""
    fmt, jsons, weights, state = export_hf.tower_files(tower_cfg, params)
    os.makedirs(folder)
    for name, contents in jsons.items():
        Path(folder, name).write_text(json.dumps(contents))
    safetensors_torch.save_file({k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()},
                                os.path.join(folder, weights))
    return fmt


# (kind in the tiny model, how transformers sees it). The comparison towers run at their own token
# grid (token_len = raw grid, no resize); DINOv2 at its learned 5×5 grid (35 px): -res28 interpolates
# as transformers 4.37 did, which 5.x no longer does. The tiny ConvNeXt also as eps 1e-6 (HF format).
CASES = {"siglip": (0, "hf"), "clip": (1, "hf"), "dinov2": (2, "hf"), "convnext-open_clip": (3, "open_clip"),
         "convnext-hf": (3, "hf")}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_tower_runs_in_transformers_as_our_tower(tiny, exported, case, tmp_path):
    cfg, _, flat = tiny
    k, fmt = CASES[case]
    t = cfg.towers[k]
    params = export_hf.tower_params(flat, k)
    if case == "convnext-hf":
        t = dataclasses.replace(t, layer_norm_eps=1e-6)
        folder = str(tmp_path / "convnext-hf")
        assert write_tower(folder, t, params) == "hf"
    else:
        folder = str(exported[0] / exported[1]["towers"][t.name])
    assert (fmt == "open_clip") == ("open_clip_model.safetensors" in os.listdir(folder))

    # pretrained's reader: the same TowerConfig, the same parameters
    back, back_cfg = pretrained.load_tower(t.name, folder, t.token_len, select_layer=t.select_layer)
    assert back_cfg == t
    got = export_hf.flat_params(nnx.state(back, nnx.Param))
    assert got.keys() == params.keys()
    for p in params:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(params[p]), err_msg=p)

    # transformers' own class on the same pixels
    if t.kind == "convnext":
        same = dataclasses.replace(t, token_len=t.raw_side ** 2)
    elif t.kind == "dinov2":
        same = dataclasses.replace(t, image_size=t.pos_grid * t.patch_size, token_len=t.pos_grid ** 2)
    else:
        same = dataclasses.replace(t, token_len=t.raw_side ** 2)
    if fmt == "open_clip":
        hf = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=list(t.dims), depths=list(t.depths),
                                                                    image_size=t.image_size))
        reader = open_checkpoint(os.path.join(folder, "open_clip_model.safetensors"))
        state = timm_to_hf_convnext({key: reader[key] for key in reader})
        state.update({"layernorm.weight": torch.ones(t.dims[-1]), "layernorm.bias": torch.zeros(t.dims[-1])})
        hf.load_state_dict(state, strict=True)
        for m in hf.modules():
            if hasattr(m, "eps"):
                m.eps = 1e-5                      # timm's ConvNeXt, as open_clip_tower_config reads it
    else:
        cls = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel,
               "dinov2": transformers.Dinov2Model, "convnext": transformers.ConvNextModel}[t.kind]
        extra = {} if t.kind == "convnext" else {"attn_implementation": "eager"}
        hf, info = cls.from_pretrained(folder, output_loading_info=True, **extra)
        assert not any(info.get(f) for f in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf = hf.float().eval()
    px = np.random.default_rng(k).standard_normal((2, same.image_size, same.image_size, 3)).astype(np.float32)
    ref = hf_features(t.kind, hf, px, same.side)
    ours = run_tower(towers.load_tower(same, params), px)
    assert ours.shape == ref.shape
    tol = FEATURE_TOL * max(1.0, float(np.abs(ref).max()))
    diff = max_diff(ours, ref)
    print(f"{case}: transformers {type(hf).__name__} vs our tower: max abs diff {diff:.2e} (tol {tol:.2e})")
    assert diff <= tol


def test_hf_config_for_round_trips_every_tiny_tower():
    tiny_towers = list(config_lib.from_dict(cambrian_tiny.get_config().model).towers)
    micro = config_lib.from_dict(cambrian_tiny.get_config("micro").model).towers[0]
    dino = tiny_towers[2]
    convnext = tiny_towers[3]
    holds = [*tiny_towers[:3], micro, dataclasses.replace(convnext, layer_norm_eps=1e-6),
             dataclasses.replace(tiny_towers[1], select_layer=-1),
             dataclasses.replace(dino, use_swiglu=True, intermediate_size=48),        # HF: mlp_ratio 2.25
             dataclasses.replace(dino, name="facebook/dinov2-tiny", image_size=35)]   # no -res: the grid's 35 px
    for t in holds:
        written = json.loads(json.dumps(hf_config_for(t)))       # as config.json holds it
        back = hf_tower_config(t.kind, written, t.name, t.token_len,
                               **({"select_layer": t.select_layer} if t.kind == "clip" else {}))
        assert back == t, (t, back)
    with pytest.raises(ConfigError, match=r"layer_norm_eps would read back as 1e-06, the tower has 1e-05 \(HF "
                                          r"ConvNextModel hard-codes"):
        hf_config_for(convnext)
    with pytest.raises(ConfigError, match=r"image_size would read back as 35, the tower has 28 .*-res<N>"):
        hf_config_for(dataclasses.replace(dino, name="facebook/dinov2-tiny"))


def _image_prompt(cfg, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    ids = ([int(i) for i in rng.integers(1, cfg.decoder.vocab_size, cfg.image_position)] + [-200]
           + [int(i) for i in rng.integers(1, cfg.decoder.vocab_size, 6)])
    return image, np.asarray([ids])


def test_export_with_its_towers_loads_alone_and_answers_as_the_model(tiny, exported):
    cfg, model, flat = tiny
    out, summary = exported
    written = json.loads((out / "config.json").read_text())
    assert written[export_hf.TOWER_DIRS_FIELD] == {t.name: f"towers/{export_hf.tower_dir_name(t.name)}"
                                                   for t in cfg.towers} == summary["towers"]
    assert summary["towers_left_out"] == []
    assert "load_pretrained(\"path/to/this/directory\")" in (out / "README.md").read_text()
    loaded = cambrian_jax.load_pretrained(out)
    assert loaded.config == cfg
    got = loaded.params()
    assert got.keys() == flat.keys()
    for p in flat:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(flat[p]), err_msg=p)
    image, ids = _image_prompt(cfg, seed=3)
    want = pretrained.CambrianForInference(model, cfg)(ids, images=[image]).logits
    have = loaded(ids, images=[image]).logits
    diff = max_diff(have, want)
    print(f"tiny model vs load_pretrained(export): logits max abs diff {diff:.2e} (max |logit| "
          f"{np.abs(want).max():.2f}, tol {LOGIT_TOL})")
    assert have.shape == want.shape and diff <= LOGIT_TOL


def test_towers_left_out_are_listed_and_given_ones_win(tiny, exported, tmp_path):
    cfg, _, flat = tiny
    left_out = cfg.towers[3].name
    part = tmp_path / "cambrian-part"
    summary = export_hf.export(flat, cfg, part, towers=[t.name for t in cfg.towers[:3]])
    assert summary["towers_left_out"] == [left_out]
    card = (part / "README.md").read_text()
    assert "3 of the 4 vision towers are included" in card and f'"{left_out}": "path/to/' in card
    with pytest.raises(CheckpointError) as e:
        cambrian_jax.load_pretrained(part)
    msg = str(e.value)
    print(msg)
    assert msg.count(": not given") == 1 and f"{left_out}: not given; expected an open_clip/timm directory" in msg
    # the left-out tower given: it loads; a given directory wins over the export's own folder
    full_dir = exported[0] / exported[1]["towers"][left_out]
    again = cambrian_jax.load_pretrained(part, towers={left_out: full_dir})
    np.testing.assert_array_equal(np.asarray(again.params()["towers/3/stem/conv/kernel"]),
                                  np.asarray(flat["towers/3/stem/conv/kernel"]))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'nowhere'} is not a directory")):
        cambrian_jax.load_pretrained(exported[0], towers={cfg.towers[0].name: tmp_path / "nowhere"})
    with pytest.raises(ConfigError, match=r"towers to export \['siglip/other'\] are not towers of this model"):
        export_hf.export(flat, cfg, tmp_path / "never", towers=["siglip/other"])
    assert not (tmp_path / "never").exists()


def test_auto_includes_trained_and_random_towers_only():
    fake = {"towers/0/blocks/attn/q/kernel": 0, "connector/x": 0, "decoder/embedding": 0}
    cfg = config_lib.from_dict(cambrian_tiny.get_config("micro").model)
    name = cfg.towers[0].name

    def auto(switches, init_towers=None):
        run = cambrian_tiny.get_config(switches)
        if init_towers:
            run.init.towers = init_towers
        return export_hf.towers_to_include(run, cfg, fake, "auto")

    assert auto("micro") == {name: "not in config.init.towers (random initialisation)"}
    assert auto("micro", {name: "/public/clip"}) == {}
    assert auto("micro,unfreeze_towers=2", {name: "/public/clip"}) == {name: "trained in stage 2"}
    assert auto("micro,unfreeze_towers=1,one_stage", {name: "/public/clip"}) == {}, "stage 1 does not run"
    run = cambrian_tiny.get_config("micro")
    assert export_hf.towers_to_include(run, cfg, fake, "none") == {}
    assert export_hf.towers_to_include(run, cfg, fake, "all") == {name: "--towers all"}


# ------------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def trained_workdir(micro_workdir):
    """A real trainer workdir (conftest: micro, 2 + 2 steps, the tower trained in stage 2)."""
    wd, spec = micro_workdir
    assert spec == MICRO_TRAINED
    return wd


def test_cli_exports_the_trained_tower_and_answers_as_the_workdir(trained_workdir, tmp_path, caplog):
    from cambrian_jax import generate

    wd = trained_workdir
    name = cambrian_tiny.MICRO_TOWER
    caplog.set_level(logging.INFO, logger="cambrian_jax.export_hf")
    auto = export_hf.main(["--workdir", str(wd), "--out", str(tmp_path / "auto")])
    assert auto["towers"] == {name: f"towers/{export_hf.tower_dir_name(name)}"}
    assert any(f"including tower {name}: trained in stage 2" in r.getMessage() for r in caplog.records)
    caplog.clear()
    none = export_hf.main(["--workdir", str(wd), "--out", str(tmp_path / "none"), "--towers", "none"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]
    assert len(warned) == 1 and "--towers none" in warned[0], warned
    assert none["towers"] == {} and not (tmp_path / "none" / "towers").exists()
    assert export_hf.TOWER_DIRS_FIELD not in json.loads((tmp_path / "none" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=re.escape(f"{name}: not given")):
        cambrian_jax.load_pretrained(tmp_path / "none")

    ckpt = generate.load_checkpoint(wd)
    (stage, step) = (ckpt.stage, ckpt.step)
    assert (stage, step) == (2, 2)
    before, _, _ = export_hf.restore_params(wd, ckpt.cfg, stage=1)
    start = export_hf.flat_params(before)["towers/0/patch_embed/kernel"]
    loaded = cambrian_jax.load_pretrained(tmp_path / "auto")
    assert loaded.config.towers == ckpt.cfg.towers
    trained = np.asarray(loaded.params()["towers/0/patch_embed/kernel"])
    assert max_diff(trained, start) > 0, "stage 2 changed the tower: stand-ins would answer otherwise"
    image, ids = _image_prompt(loaded.config, seed=5)
    want = pretrained.CambrianForInference(ckpt.model, ckpt.cfg)(ids, images=[image]).logits
    have = loaded(ids, images=[image]).logits
    vocab = loaded.config.decoder.vocab_size       # the export keeps len(tokenizer) rows (spec §14.4)
    diff = max_diff(have, want[..., :vocab])
    print(f"workdir model vs load_pretrained(export --towers auto): logits max abs diff {diff:.2e}")
    assert diff <= LOGIT_TOL


def test_export_mistakes_are_one_line_exit_2_and_write_nothing(cli_error, trained_workdir, tmp_path):
    out = tmp_path / "X"
    code, line = cli_error(export_hf.main, ["--workdir", "/does/not/exist", "--out", str(out)])
    assert (code, line) == (2, "error: --workdir /does/not/exist does not exist")
    wd = str(trained_workdir)
    mistakes = {
        "--towers bogus": (["--towers", "bogus"], "argument --towers: invalid choice: 'bogus'"),
        "step": (["--step", "99"], "no finished stage checkpoint with a 'params' item at step 99"),
        "tokenizer": (["--tokenizer", str(tmp_path / "tok")], "--tokenizer"),
        "shard size": (["--max-shard-size", "5XB"], "--max-shard-size"),
        "config": (["--config", "configs/cambrian_tiny.py:micro"], "is not the config of the run"),
    }
    for what, (args, expected) in mistakes.items():
        code, line = cli_error(export_hf.main, ["--workdir", wd, "--out", str(out), *args])
        assert code == 2 and line.startswith("error: ") and expected in line, (what, line)
        assert not out.exists(), what
    code, line = cli_error(export_hf.main, ["--workdir", wd, "--out", wd])
    assert code == 2 and "is the run's workdir" in line

    # A run whose stage 1 trained the tower: the stage-1 adapter cannot hold it, so not without --towers none.
    other = tmp_path / "W1"
    shutil.copytree(Path(wd) / "stage1", other / "stage1")
    workdir.check_or_write(other, cambrian_tiny.get_config("micro,steps1=2,steps2=2,batch=8,unfreeze_towers=12"))
    code, line = cli_error(export_hf.main, ["--workdir", str(other), "--out", str(out), "--stage", "1"])
    assert code == 2 and "stage 1 of this run trained the tower(s)" in line and not out.exists()
    summary = export_hf.main(["--workdir", str(other), "--out", str(out), "--stage", "1", "--towers", "none"])
    assert summary["stage"] == 1 and (out / "mm_projector.safetensors").is_file()
