"""Checkpoints in and out (spec §2.1, §3.3–§3.5, §5, §14).

References are tiny random transformers models (float32, CPU, eager attention) saved with
save_pretrained, and a PyTorch reconstruction of the reference's Cambrian forward written from the
spec (below: the SVA modules with the spec's key names on top of transformers' LlamaForCausalLM and
towers, run in the reference's *unpadded* inference layout). Tolerances: logits ≤ 1e-4 absolute in
float32; tower features ≤ 1e-5 · max(1, max|ref|); round trips bit-identical.

  LLM import         Llama (sharded safetensors + index), Llama-3.1 rope scaling, MHA (Vicuna/Yi
                     style) and Phi-3 (fused qkv_proj / gate_up_proj): logits vs transformers
  tower import       Hugging Face directories (with and without the `vision_model.` prefix) and
                     open_clip/timm files (`visual.trunk.…`: SigLIP ViT, ConvNeXt with eps 1e-5)
  released layout    a tiny Cambrian written with the spec's key names and config fields, loaded with
                     load_pretrained: logits vs the reference reconstruction for square, wide and tall
                     images (320×176 and 176×320 exercise the SVA key masks at these grid sizes, §14.2)
  export             save_pretrained → files, config fields, bit-identical re-import and re-export;
                     the LLM part in transformers.LlamaForCausalLM; the CLI from an orbax workdir
                     (stage 2: released layout, stage 1: the mm_projector adapter)
  readers            weights-only mm_projector.bin (torch and the restricted unpickler), corrupt
                     inputs (truncated file, missing shard, wrong shapes, towers without weights)
  sharded loading    load_initial_weights into arrays sharded over 4 simulated devices
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import cambrian_jax
from cambrian_jax import pretrained
from cambrian_jax.config import IMAGE_TOKEN_INDEX
from cambrian_jax.convert import cambrian_hf, hf_llama
from cambrian_jax.convert.assign import CheckpointMismatch
from cambrian_jax.convert.safetensors_io import CheckpointError, load_torch_weights, open_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
F = torch.nn.functional

LOGIT_TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- helpers

def randomized(model, seed: int, scale: float = 0.2):
    """Every parameter random: norm scales and layer scales around 1, everything else around 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            around_one = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight",
                                        "layernorm.weight", "lambda1", "layer_scale_parameter", ".3.weight"))
            p.copy_(noise + 1.0 if around_one else noise)
    return model.eval()


def save_sharded(tensors, folder, shards: int) -> None:
    """model-0000k-of-0000n.safetensors + model.safetensors.index.json, as save_pretrained writes them."""
    os.makedirs(folder, exist_ok=True)
    keys = list(tensors)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].detach().contiguous() for k in keys[i * per:(i + 1) * per]}
        safetensors_torch.save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def nchw(x: np.ndarray, dtype=torch.float32):
    """NHWC pixels (numpy or jax, read-only or not) as a writable NCHW torch tensor of `dtype`."""
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).to(dtype).contiguous()


def decoder_logits(dec, ids):
    t = ids.shape[1]
    return np.asarray(dec.logits(dec(dec.embed(jnp.asarray(ids)), jnp.arange(t)[None], jnp.ones((1, t), bool))))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_features_close(got, ref, what):
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
    diff = max_diff(got, ref)
    print(f"{what}: max abs diff {diff:.2e} (tol {tol:.2e})")
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------- LLM import

def _llama(**overrides):
    c = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, attn_implementation="eager")
    c.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**c))


LLMS = {
    "llama3-sharded": lambda: _llama(),
    "llama3.1-rope-scaling": lambda: _llama(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0, original_max_position_embeddings=8),
                                            rope_theta=500000.0, max_position_embeddings=64),
    "vicuna-yi-mha": lambda: _llama(num_key_value_heads=4, rope_theta=5000000.0),
    "phi3-fused": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")),
}


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    out = {}
    for i, (name, make) in enumerate(LLMS.items()):
        torch.manual_seed(i)
        model = randomized(make(), seed=10 + i, scale=0.1)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, max_shard_size="20KB")
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("name", list(LLMS))
def test_llm_import_matches_transformers_logits(llm_dirs, name):
    folder, model = llm_dirs[name]
    files = os.listdir(folder)
    if name == "llama3-sharded":
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    if name == "phi3-fused":
        assert any("qkv_proj" in k for k in open_checkpoint(folder))
    dec, cfg = pretrained.load_llm(folder)
    ids = np.random.default_rng(0).integers(0, 96, (1, 40))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    diff = max_diff(decoder_logits(dec, ids), ref)
    print(f"{name}: max |logits - transformers| = {diff:.2e}")
    assert diff <= LOGIT_TOL


def test_streamed_llm_equals_hf_llama_from_hf(llm_dirs):
    """The streaming plan and hf_llama's in-memory converter give identical arrays."""
    folder, model = llm_dirs["phi3-fused"]
    dec, cfg = pretrained.load_llm(folder)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    ref = hf_llama.from_hf(cfg, sd)
    got = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(dec, nnx.Param))}
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # ... and the export direction fuses Phi-3's weights again, bit for bit.
    entries = cambrian_hf.llm_entries(cfg, lambda p: got[p.removeprefix("decoder/")], fused=True)
    assert {k for k, _, _ in entries} == set(sd)
    for key, shape, produce in entries:
        np.testing.assert_array_equal(produce(), sd[key], err_msg=key)
        assert tuple(shape) == sd[key].shape


# -------------------------------------------------------------------------------------- tower import

TOWER_MODELS = {
    # name in the Cambrian config, kind, HF model, token count
    "siglip": ("siglip/tiny-siglip", lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=45, patch_size=7,
        attn_implementation="eager")), 36),
    "clip": ("openai/clip-tiny", lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=42, patch_size=7,
        attn_implementation="eager")), 36),
    "dinov2": ("facebook/dinov2-tiny", lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=42, patch_size=7,
        use_swiglu_ffn=True, attn_implementation="eager")), 36),
    "convnext": ("clip-convnext-tiny-multi-stage", lambda: transformers.ConvNextModel(transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], image_size=64)), 144),
}


def resize_tokens_ref(tokens, side):
    """Cambrian's feature interpolation: bilinear in float32, cast back (ClipVisionTower.interpolate)."""
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g == side:
        return tokens
    grid = F.interpolate(tokens.reshape(b, g, g, c).permute(0, 3, 1, 2).float(), size=(side, side),
                         mode="bilinear", align_corners=False).to(tokens.dtype)
    return grid.permute(0, 2, 3, 1).reshape(b, side * side, c)


def tower_features_ref(kind, model, pixels, side):
    """What the reference takes from each tower, in the model's dtype: CLIP's hidden_states[-2] without
    the class token, SigLIP's and DINOv2's last_hidden_state (DINOv2 without the class token),
    ConvNeXt's four stage maps (cambrian/model/multimodal_encoder/clip_encoder.py, siglip_encoder.py,
    dino_encoder.py, clip_convnext_encoder.py), resized to side×side in float32."""
    dtype = next(model.parameters()).dtype
    x = nchw(pixels, dtype)
    with torch.no_grad():
        if kind == "clip":
            h = model(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        elif kind == "siglip":
            h = model(x).last_hidden_state
        elif kind == "dinov2":
            h = model(x).last_hidden_state[:, 1:]
        else:
            maps = model(x, output_hidden_states=True).hidden_states[1:5]
            grid = torch.cat([F.interpolate(m.float(), size=(side, side), mode="bilinear",
                                            align_corners=False).to(dtype) for m in maps], dim=1)
            return grid.permute(0, 2, 3, 1).reshape(grid.shape[0], side * side, grid.shape[1])
    return resize_tokens_ref(h, side)


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory):
    out = {}
    for i, (kind, (name, make, tokens)) in enumerate(TOWER_MODELS.items()):
        torch.manual_seed(100 + i)
        model = randomized(make(), seed=100 + i)
        folder = str(tmp_path_factory.mktemp(f"tower-{kind}"))
        model.save_pretrained(folder)
        out[kind] = (name, folder, model, tokens)
    return out


def _run_tower(tower, pixels):
    graphdef, state = nnx.split(tower)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(pixels)))


@pytest.mark.parametrize("kind", list(TOWER_MODELS))
def test_hf_tower_directories_match_transformers(tower_dirs, kind, tmp_path):
    name, folder, model, tokens = tower_dirs[kind]
    side = math.isqrt(tokens)
    tower, cfg = pretrained.load_tower(name, folder, tokens)
    px = np.random.default_rng(1).standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ref = tower_features_ref(kind, model, px, side)
    assert_features_close(_run_tower(tower, px), ref, f"{kind} from {os.path.basename(folder)}")
    if kind in ("clip", "siglip"):
        # The Hub's files keep the `vision_model.` prefix (transformers 5.x saves without it).
        hub = tmp_path / "hub"
        shutil.copytree(folder, hub)
        sd = safetensors_torch.load_file(str(hub / "model.safetensors"))
        safetensors_torch.save_file({"vision_model." + k: v for k, v in sd.items()}, str(hub / "model.safetensors"))
        again, _ = pretrained.load_tower(name, hub, tokens)
        np.testing.assert_array_equal(_run_tower(again, px), _run_tower(tower, px))


def timm_siglip_state(model) -> dict:
    """An HF SiglipVisionModel's weights under the timm ViT names of open_clip's `visual.trunk`."""
    sd = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    out = {"visual.trunk.patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
           "visual.trunk.patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
           "visual.trunk.pos_embed": sd["embeddings.position_embedding.weight"][None],
           "visual.trunk.norm.weight": sd["post_layernorm.weight"], "visual.trunk.norm.bias": sd["post_layernorm.bias"]}
    for i in range(model.config.num_hidden_layers):
        p, q = f"encoder.layers.{i}.", f"visual.trunk.blocks.{i}."
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")):
            out[q + b + ".weight"], out[q + b + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
        for t in ("weight", "bias"):
            out[q + "attn.qkv." + t] = torch.cat([sd[f"{p}self_attn.{n}_proj.{t}"] for n in "qkv"], 0)
    # The MAP pooling head, open_clip's projection and the text tower are present but unused.
    out["visual.trunk.attn_pool.latent"] = torch.randn(1, 1, 32)
    out["visual.trunk.attn_pool.q.weight"] = torch.randn(32, 32)
    out["text.token_embedding.weight"] = torch.randn(10, 32)
    out["logit_scale"] = torch.ones(())
    return out


def timm_convnext_state(model) -> dict:
    """An HF ConvNextModel's weights under the timm ConvNeXt names of open_clip's `visual.trunk`."""
    sd = model.state_dict()
    t = "visual.trunk."
    out = {t + "stem.0.weight": sd["embeddings.patch_embeddings.weight"], t + "stem.0.bias": sd["embeddings.patch_embeddings.bias"],
           t + "stem.1.weight": sd["embeddings.layernorm.weight"], t + "stem.1.bias": sd["embeddings.layernorm.bias"],
           t + "head.norm.weight": sd["layernorm.weight"], t + "head.norm.bias": sd["layernorm.bias"],
           "visual.head.proj.weight": torch.randn(16, 32)}
    for s, depth in enumerate(model.config.depths):
        if s:
            for j in (0, 1):
                for w in ("weight", "bias"):
                    out[f"{t}stages.{s}.downsample.{j}.{w}"] = sd[f"encoder.stages.{s}.downsampling_layer.{j}.{w}"]
        for b in range(depth):
            p, q = f"encoder.stages.{s}.layers.{b}.", f"{t}stages.{s}.blocks.{b}."
            for a, c in (("dwconv", "conv_dw"), ("layernorm", "norm"), ("pwconv1", "mlp.fc1"), ("pwconv2", "mlp.fc2")):
                out[q + c + ".weight"], out[q + c + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
            out[q + "gamma"] = sd[p + "layer_scale_parameter"]
    return out


def test_open_clip_towers_match_timm_architecture(tmp_path):
    """timm's SigLIP ViT (exact GELU, eps 1e-6, fused qkv) and ConvNeXt (eps 1e-5 everywhere),
    reproduced with transformers modules patched to timm's settings."""
    torch.manual_seed(7)
    sig = randomized(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=45, patch_size=7,
        hidden_act="gelu", attn_implementation="eager")), seed=7)
    cnx = randomized(transformers.ConvNextModel(transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], image_size=64)), seed=8)
    for m in cnx.modules():
        if hasattr(m, "eps"):
            m.eps = 1e-5
    cases = [("siglip", "siglip/tiny-siglip", sig, timm_siglip_state(sig), 36,
              {"model_cfg": {"vision_cfg": {"timm_model_name": "vit_tiny_siglip", "heads": 2, "image_size": 45}}}),
             ("convnext", "clip-convnext-tiny-multi-stage-res64", cnx, timm_convnext_state(cnx), 144,
              {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_tiny_test", "image_size": 64}}})]
    for kind, name, model, state, tokens, oc_config in cases:
        folder = tmp_path / kind
        folder.mkdir()
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
        (folder / "open_clip_config.json").write_text(json.dumps(oc_config))
        tower, cfg = pretrained.load_tower(name, folder, tokens)
        assert cfg.layer_norm_eps == (1e-6 if kind == "siglip" else 1e-5)
        if kind == "siglip":
            assert (cfg.hidden_act, cfg.num_heads, cfg.image_size, cfg.raw_side) == ("gelu", 2, 45, 6)
        else:
            assert cfg.dims == (8, 16, 24, 32) and cfg.depths == (1, 2, 1, 1) and cfg.multi_stage
        px = np.random.default_rng(3).standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
        ref = tower_features_ref(kind, model, px, math.isqrt(tokens))
        assert_features_close(_run_tower(tower, px), ref, f"open_clip {kind}")


def test_released_open_clip_tower_names_give_the_reference_architecture():
    """Shapes of the released files (no weights needed): SO400M heads from the timm name, 1024 px
    for ConvNeXt-XXL from the tower name, as the reference."""
    from cambrian_jax.convert.openclip_towers import openclip_tower_config

    shapes = {"visual.trunk.pos_embed": (1, 729, 1152), "visual.trunk.patch_embed.proj.weight": (1152, 3, 14, 14),
              **{f"visual.trunk.blocks.{i}.norm1.weight": (1152,) for i in range(27)},
              "visual.trunk.blocks.0.mlp.fc1.weight": (4304, 1152)}
    cfg = openclip_tower_config("siglip/CLIP-ViT-SO400M-14-384", 576, shapes,
                                {"model_cfg": {"vision_cfg": {"timm_model_name": "vit_so400m_patch14_siglip_384",
                                                              "image_size": 384}}})
    assert (cfg.num_heads, cfg.num_layers, cfg.image_size, cfg.raw_side, cfg.hidden_act) == (16, 27, 384, 27, "gelu")
    dims, depths = (384, 768, 1536, 3072), (3, 4, 30, 3)
    shapes = {"visual.trunk.stem.0.weight": (384, 3, 4, 4),
              **{f"visual.trunk.stages.{s}.downsample.1.weight": (dims[s], dims[s - 1], 2, 2) for s in (1, 2, 3)},
              **{f"visual.trunk.stages.{s}.blocks.{b}.conv_dw.weight": (dims[s], 1, 7, 7)
                 for s in range(4) for b in range(depths[s])}}
    cfg = openclip_tower_config("clip-convnext-XXL-multi-stage", 9216, shapes, {})
    assert (cfg.dims, cfg.depths, cfg.image_size, cfg.width, cfg.layer_norm_eps) == (dims, depths, 1024, 5760, 1e-5)


# ------------------------------------------------------------------- the reference, reconstructed
# From spec §3.1–§3.5 with the spec's module names, so one state dict loads into both.

class Mlp(torch.nn.Module):
    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.linear_1 = torch.nn.Linear(d_in, hidden, bias=False)
        self.linear_2 = torch.nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


def norm_linear(d_in, d_out):
    return torch.nn.Sequential(torch.nn.LayerNorm(d_in), torch.nn.Linear(d_in, d_out, bias=False))


class CrossAttention(torch.nn.Module):
    def __init__(self, hidden, kv_dims, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = norm_linear(hidden, hidden)
        for k, c in enumerate(kv_dims):
            setattr(self, f"k_proj_{k}", norm_linear(c, hidden))
            setattr(self, f"v_proj_{k}", norm_linear(c, hidden))
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.num = len(kv_dims)

    def forward(self, h, windows, masks):
        m, _, d = h.shape
        hd = d // self.heads
        q = self.q_proj(h).reshape(m, 1, self.heads, hd).transpose(1, 2)
        k = torch.cat([getattr(self, f"k_proj_{i}")(x) for i, x in enumerate(windows)], 1)
        v = torch.cat([getattr(self, f"v_proj_{i}")(x) for i, x in enumerate(windows)], 1)
        k = k.reshape(m, -1, self.heads, hd).transpose(1, 2)
        v = v.reshape(m, -1, self.heads, hd).transpose(1, 2)
        mask = torch.cat(masks, 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(m, 1, d))


class CrossAttentionLayer(torch.nn.Module):
    """VisionCrossAttentionLayer (spec §3.1, §3.3)."""

    def __init__(self, q_dim, ctx_dim, kv_dims, sizes, hidden, heads):
        super().__init__()
        self.sizes = sizes
        self.proj_context = torch.nn.Linear(ctx_dim, hidden, bias=False)
        self.proj_in = torch.nn.Linear(q_dim + hidden, hidden, bias=False)
        self.proj_out = Mlp(hidden, hidden, q_dim)
        self.norm = torch.nn.LayerNorm(hidden)
        self.cross_attn = CrossAttention(hidden, kv_dims, heads)
        for k, r in enumerate(sizes):
            if r > 1:
                setattr(self, f"pos_embed_{k}", torch.nn.Parameter(torch.randn(r * r, kv_dims[k])))

    def forward(self, q, ctx, windows, masks):
        h = self.proj_in(torch.cat([q, self.proj_context(ctx)], -1))
        xs = [x + getattr(self, f"pos_embed_{k}") if r > 1 else x for k, (x, r) in enumerate(zip(windows, self.sizes))]
        h = self.norm(h + self.cross_attn(h, xs, masks))
        return q + self.proj_out(h)


class Sampler(torch.nn.Module):
    def __init__(self, q_dim, ctx_dim, kv_dims, sizes, hidden, layers, heads):
        super().__init__()
        self.layers = torch.nn.ModuleList([CrossAttentionLayer(q_dim, ctx_dim, kv_dims, sizes, hidden, heads)
                                           for _ in range(layers)])


def ref_padding(size, side):
    """(axis, pad): spec §3.5, in the reference's floating-point order."""
    w, h = size
    if w / h > 1:
        return "rows", (side - int(h * (side / w))) // 2
    return "cols", (side - int(w * (side / h))) // 2


def ref_band(size, side):
    """(row slice, col slice) of the kept (non-padding) band."""
    axis, pad = ref_padding(size, side)
    band = slice(pad, side - pad)
    return (band, slice(0, side)) if axis == "rows" else (slice(0, side), band)


def ref_mask(size, side):
    m = torch.zeros(side, side, dtype=torch.bool)
    rows, cols = ref_band(size, side)
    m[rows, cols] = True
    return m.reshape(-1)


def windows_of(x, side):
    """[1, s², C] → [side², r², C] (window (i, j) at row i·side + j, keys row-major, spec §3.3)."""
    b, n, c = x.shape
    s = math.isqrt(n)
    r = s // side
    return x.reshape(b, side, r, side, r, c).permute(0, 1, 3, 2, 4, 5).reshape(b * side * side, r * r, c)


def window_masks_of(mask, side):
    w = windows_of(mask[None, :, None].float(), side)[..., 0] > 0.5
    return w | ~w.any(-1, keepdim=True)


class Geometry:
    n = 6                      # LLM image grid
    v = 32                     # SVA width
    heads = 16                 # hard-coded in the reference
    depth = 2
    num_aggregators, start, stride = 2, 0, 2
    hidden = 64
    layers = 4
    image_position = 5


def attach_connector(llm, widths, sides, g=Geometry):
    """The reference's connector modules under llm.model, with the spec's names (§5.4)."""
    m, v, h = llm.model, g.v, g.hidden
    for k, c in enumerate(widths):
        setattr(m, f"mm_projector_aux_{k}", torch.nn.Sequential(torch.nn.Linear(c, v), torch.nn.GELU(),
                                                                torch.nn.Linear(v, v), torch.nn.LayerNorm(v)))
    m.vision_query = torch.nn.Parameter(torch.randn(1, v) / v ** 0.5)
    m.vision_sampler_0 = Sampler(v, v, [v] * len(widths), [s // g.n for s in sides], v, g.depth, g.heads)
    m.mm_projector = torch.nn.Sequential(torch.nn.Linear(v, h), torch.nn.GELU(), torch.nn.Linear(h, h))
    m.image_newline = torch.nn.Parameter(torch.randn(h) / h ** 0.5)
    m.vision_sampler_layers = torch.nn.ModuleList([
        Sampler(h, v, [v] * len(widths), [s // g.n for s in sides], v, 1, g.heads) for _ in range(g.num_aggregators)])


def reference_logits(llm, features, size, ids, g=Geometry):
    """The reference's inference forward (what generate() computes at prefill, spec §14.3): connector,
    unpadded image block ("unpad": crop to the kept band, spec §3.5), in-LLM aggregators on the same
    crop. features: per tower [1, s_k², C_k]; size: the original (W, H); ids with one −200."""
    m, n = llm.model, g.n
    with torch.no_grad():
        z = [getattr(m, f"mm_projector_aux_{k}")(f) for k, f in enumerate(features)]
        ctx = z[0].mean(1)                                               # padding included (spec §10.5)
        masks = [ref_mask(size, math.isqrt(f.shape[1])) for f in features]
        win = [windows_of(x, n) for x in z]
        wmask = [window_masks_of(mk, n) for mk in masks]
        q = m.vision_query[0].expand(n * n, 1, g.v)
        for layer in m.vision_sampler_0.layers:
            q = layer(q, ctx[:, None].expand(n * n, 1, g.v), win, wmask)
        grid = m.mm_projector(q.reshape(1, n * n, g.v)).reshape(n, n, g.hidden)
        rows, cols = ref_band(size, n)
        grid = grid[rows, cols]
        hh, ww = grid.shape[:2]
        block = torch.cat([grid, m.image_newline.expand(hh, 1, g.hidden)], 1).reshape(hh * (ww + 1), g.hidden)
        p = ids.index(IMAGE_TOKEN_INDEX)
        emb = m.embed_tokens
        x = torch.cat([emb(torch.tensor(ids[:p])), block, emb(torch.tensor(ids[p + 1:]))])[None]
        kept = torch.arange(n * n).reshape(n, n)[rows, cols].reshape(-1)
        agg_layers = [g.start + j * g.stride for j in range(g.num_aggregators)]

        def hook(layer_index):
            def run(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                y = hidden[0, p:p + hh * (ww + 1)].reshape(hh, ww + 1, g.hidden)
                queries = y[:, :ww].reshape(hh * ww, 1, g.hidden)
                layer = m.vision_sampler_layers[agg_layers.index(layer_index)].layers[0]
                out = layer(queries, ctx[:, None].expand(hh * ww, 1, g.v), [w[kept] for w in win],
                            [w[kept] for w in wmask])
                new = hidden.clone()
                new[0, p:p + hh * (ww + 1)] = torch.cat([out.reshape(hh, ww, g.hidden), y[:, ww:]], 1).reshape(-1, g.hidden)
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
            return run

        handles = [m.layers[i].register_forward_hook(hook(i)) for i in agg_layers]
        try:
            logits = llm(inputs_embeds=x).logits[0].numpy()
        finally:
            for hd in handles:
                hd.remove()
    return logits


# (pad colour, mean, std) per tower kind, spec §2.2
PREPROCESS = {"siglip": ((122, 116, 104), (0.5,) * 3, (0.5,) * 3),
              "clip": ((122, 116, 104), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
              "dinov2": ((123, 116, 103), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
              "convnext": ((122, 116, 104), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}


def reference_pixels(image, kind, size):
    """expand2square with the tower's padding colour, PIL bicubic resize, normalise (spec §2.2)."""
    pad, mean, std = PREPROCESS[kind]
    w, h = image.size
    if w != h:
        canvas = Image.new("RGB", (max(w, h), max(w, h)), pad)
        canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        image = canvas
    x = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) * np.float32(1 / 255)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))[None]


def make_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")



def released_config(tokenizer, towers, g=Geometry):
    """A config.json as released (spec §5.2): Llama fields (4.x style) and every Cambrian field."""
    return {
        "_name_or_path": "./tiny-llama", "architectures": ["CambrianLlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "connector_depth": g.depth, "connector_only": False, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "hidden_size": g.hidden, "image_aspect_ratio": "pad", "image_position": g.image_position,
        "image_token_len": g.n * g.n, "initializer_range": 0.02, "intermediate_size": 128,
        "max_position_embeddings": 256, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
        "mm_projector_type": "sva", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_sampler_lr": None, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower_aux_list": [t[0] for t in towers], "mm_vision_tower_aux_token_len_list": [t[1] for t in towers],
        "mm_vision_tower_lr": None, "model_type": "cambrian_llama", "num_attention_heads": 4, "num_hidden_layers": g.layers,
        "num_key_value_heads": 2, "num_of_vision_sampler_layers": g.num_aggregators, "num_query_group": 1,
        "pretraining_tp": 1, "query_num_list": [g.n * g.n], "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "spmd_debug": None, "spmd_fsdp_sharding": None, "spmd_mesh": None,
        "start_of_vision_sampler_layers": g.start, "stride_of_vision_sampler_layers": g.stride,
        "tie_word_embeddings": False, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "torch_dtype": "float32", "transformers_version": "4.40.1", "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": False, "use_cache": True, "use_mm_proj": True, "vision_hidden_size": g.v,
        "vision_tower_aux_token_len_list": [t[1] for t in towers], "vocab_size": len(tokenizer),
    }


@pytest.fixture(scope="module")
def released(tmp_path_factory, tower_dirs):
    """A tiny Cambrian in the released layout (spec §5.1): sharded safetensors with the spec's key
    names, config.json, generation_config.json, tokenizer files; its towers in HF directories."""
    from cambrian_jax.data.tokenizer import build_tokenizer

    folder = str(tmp_path_factory.mktemp("cambrian-tiny"))
    tok = build_tokenizer(folder, ["a tiny corpus for a tiny model", "what is in the image?"], "llama_3")
    g = Geometry
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=g.hidden, intermediate_size=128, num_hidden_layers=g.layers,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
        attn_implementation="eager"))
    kinds = list(TOWER_MODELS)
    widths = [32, 32, 32, 8 + 16 + 24 + 32]
    sides = [math.isqrt(tower_dirs[k][3]) for k in kinds]
    attach_connector(llm, widths, sides)
    randomized(llm, seed=1, scale=0.1)
    sd = llm.state_dict()
    save_sharded(sd, folder, shards=3)
    towers = [(tower_dirs[k][0], tower_dirs[k][3]) for k in kinds]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(released_config(tok, towers), f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": tok.bos_id, "do_sample": True,
                   "eos_token_id": [tok.eos_id], "transformers_version": "4.40.1"}, f)
    mapping = {tower_dirs[k][0]: tower_dirs[k][1] for k in kinds}
    return dict(folder=folder, llm=llm, tokenizer=tok, mapping=mapping, kinds=kinds, sides=sides)


@pytest.fixture(scope="module")
def loaded(released):
    return cambrian_jax.load_pretrained(released["folder"], towers=released["mapping"], dtype="float32")


def _prompt(vocab, seed, after=9):
    rng = np.random.default_rng(seed)
    return ([int(i) for i in rng.integers(0, vocab, Geometry.image_position)] + [IMAGE_TOKEN_INDEX]
            + [int(i) for i in rng.integers(0, vocab, after)])


def test_released_layout_checkpoint_has_the_spec_key_names(released):
    keys = set(open_checkpoint(released["folder"]))
    for key in ("model.vision_query", "model.image_newline", "model.mm_projector.2.weight",
                "model.mm_projector_aux_3.3.bias", "model.vision_sampler_0.layers.1.cross_attn.k_proj_3.0.weight",
                "model.vision_sampler_0.layers.0.pos_embed_3", "model.vision_sampler_layers.1.layers.0.proj_in.weight",
                "model.vision_sampler_layers.0.layers.0.proj_out.linear_2.weight", "lm_head.weight"):
        assert key in keys, key
    assert not any("pos_embed_0" in k for k in keys), "pos_embed only for towers with window side > 1"


@pytest.mark.parametrize("size", [(256, 256), (320, 176), (176, 320)], ids=["square", "wide", "tall"])
def test_load_pretrained_matches_the_reference_forward(released, loaded, tower_dirs, size):
    g = Geometry
    if size != (256, 256):
        # The SVA key masks change the result only for ConvNeXt windows that straddle the padding edge
        # and survive the crop (spec §14.2); make sure this shape has one at these grid sizes.
        s = released["sides"][3]
        tower = ref_mask(size, s).reshape(s, s)
        rows, cols = ref_band(size, g.n)
        r = s // g.n
        straddle = [(i, j) for i in range(g.n)[rows] for j in range(g.n)[cols]
                    if 0 < tower[i * r:(i + 1) * r, j * r:(j + 1) * r].sum() < r * r]
        assert straddle, f"{size} does not exercise the key masks"
    image = make_image(*size, seed=sum(size))
    ids = _prompt(len(released["tokenizer"]), seed=size[0])
    feats = []
    for kind in released["kinds"]:
        name, folder, model, tokens = tower_dirs[kind]
        cfg = loaded.config.towers[released["kinds"].index(kind)]
        feats.append(tower_features_ref(kind, model, reference_pixels(image, kind, cfg.image_size), math.isqrt(tokens)))
    ref = reference_logits(released["llm"], feats, size, ids)
    got = loaded(np.asarray([ids]), images=[image])
    block = g.n * (g.n + 1)
    assert got.logits.shape == (1, len(ids) - 1 + block, len(released["tokenizer"]))
    mask = got.attention_mask[0]
    p = g.image_position
    assert mask[:p].all() and mask[p + block:].all()
    ours = got.logits[0][mask]
    assert ours.shape == ref.shape, f"kept tokens {ours.shape[0]} vs the reference's unpadded {ref.shape[0]}"
    text = np.r_[0:p, p + block:len(mask)]
    ref_text = np.r_[0:p, p + int(mask[p:p + block].sum()):ref.shape[0]]
    d_text = max_diff(got.logits[0][text], ref[ref_text])
    d_all = max_diff(ours, ref)
    print(f"{size}: text-position logits max diff {d_text:.2e}; all kept positions {d_all:.2e}")
    assert d_text <= LOGIT_TOL and d_all <= LOGIT_TOL
    if size != (256, 256):
        # Without the SVA key masks the same image gives other text logits: the masks are tested.
        from cambrian_jax import preprocess
        from cambrian_jax.model import static_layout

        cfg = loaded.config
        batch = static_layout(cfg, [ids], [size])
        pixels = [jnp.asarray(px[None]) for px in preprocess.preprocess_towers(image, cfg.towers)]
        unmasked = loaded._forward(loaded._state, jnp.asarray(batch["input_ids"]), pixels,
                                   [jnp.ones(m.shape, bool) for m in batch["tower_masks"]],
                                   jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["positions"]))
        d_unmasked = max_diff(np.asarray(unmasked)[0][text], ref[ref_text])
        print(f"{size}: without key masks the text logits differ by {d_unmasked:.2e}")
        assert d_unmasked > 10 * LOGIT_TOL


def test_missing_towers_are_listed_with_their_expected_format(released, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    mapping = dict(released["mapping"])
    del mapping["clip-convnext-tiny-multi-stage"]
    mapping["openai/clip-tiny"] = str(empty)
    with pytest.raises(CheckpointError) as e:
        cambrian_jax.load_pretrained(released["folder"], towers=mapping)
    msg = str(e.value)
    print(msg)
    assert "clip-convnext-tiny-multi-stage: not given; expected an open_clip/timm directory" in msg
    assert f"openai/clip-tiny: tower 'openai/clip-tiny': {empty} has no weights" in msg
    assert "CLIPVisionModel" in msg


def test_config_json_round_trip(loaded, released):
    cfg = loaded.config
    small = dataclasses.replace(cfg, connector=dataclasses.replace(cfg.connector, num_heads=4))
    hf = cambrian_hf.config_to_hf(small)
    assert hf[cambrian_hf.SVA_HEADS_FIELD] == 4, "our extension field, only when the SVA heads are not 16"
    assert cambrian_hf.config_from_hf(hf, cfg.towers) == small
    phi3 = cambrian_hf.config_to_hf(cfg, {"model_type": "phi3", "bos_token_id": 1, "eos_token_id": 32000})
    assert (phi3["architectures"], phi3["model_type"], phi3["eos_token_id"]) == (
        ["CambrianPhi3ForCausalLM"], "cambrian_phi3", 32000)
    base_llm = {k: v for k, v in json.load(open(os.path.join(released["folder"], "config.json"))).items()
                if k not in cambrian_hf.REQUIRED_FIELDS}
    with pytest.raises(cambrian_jax.config.ConfigError, match="is this a Cambrian checkpoint, or a base LLM"):
        cambrian_hf.config_from_hf(base_llm, cfg.towers)


def test_load_initial_weights_for_training(loaded, released):
    """config.init: a released Cambrian directory and the tower directories fill the trainer's state
    exactly as load_pretrained does; a tower configured unlike its weights is refused by field."""
    from cambrian_jax.model import Cambrian

    cfg = loaded.config
    state = nnx.state(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    pretrained.load_initial_weights({"cambrian": released["folder"], "towers": released["mapping"]}, cfg, state)
    want = loaded.params()
    got = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)

    towers = list(cfg.towers)
    towers[3] = dataclasses.replace(towers[3], layer_norm_eps=1e-5)      # as if configured for open_clip weights
    wrong = dataclasses.replace(cfg, towers=tuple(towers))
    with pytest.raises(CheckpointError, match=r"clip-convnext-tiny-multi-stage .*hf format\): layer_norm_eps: "
                                              r"checkpoint format implies 1e-06, model has 1e-05"):
        pretrained.load_initial_weights({"towers": released["mapping"]}, wrong, state)
    with pytest.raises(cambrian_jax.config.ConfigError, match=r"unknown entry \['llm_dir'\]"):
        pretrained.load_initial_weights({"llm_dir": "x"}, cfg, state)
    other = dataclasses.replace(cfg, image_position=7)
    with pytest.raises(cambrian_jax.config.ConfigError, match="image_position: checkpoint 5, model 7"):
        pretrained.load_initial_weights({"cambrian": released["folder"]}, other, state)


# --------------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export"))
    summary = loaded.save_pretrained(out, dtype="float32", max_shard_size="60KB")
    return out, summary


def test_export_writes_the_released_layout(released, exported):
    out, summary = exported
    files = set(os.listdir(out))
    n = len(summary["shards"])
    assert n > 1 and {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)} <= files
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= files
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(summary["shards"])
    assert index["metadata"]["total_size"] == summary["total_size"]
    config = json.load(open(os.path.join(out, "config.json")))
    original = json.load(open(os.path.join(released["folder"], "config.json")))
    assert {k: config.get(k, "<absent>") for k in original} == original, "every released field, same values"
    for field in cambrian_hf.REQUIRED_FIELDS + tuple(cambrian_hf.FIXED_FIELDS):
        assert field in config
    assert config["vocab_size"] == len(released["tokenizer"])
    assert not any(k.startswith(("towers", "model.towers", "vision_tower")) for k in index["weight_map"])


def test_export_then_import_is_bit_identical(released, loaded, exported):
    """export(import(released dir)) has the same tensors as the dir; import(export(params)) the same params."""
    out, _ = exported
    a, b = open_checkpoint(released["folder"]), open_checkpoint(out)
    assert set(a) == set(b)
    for key in a:
        assert a.info(key).dtype == b.info(key).dtype == "F32"
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    again = cambrian_jax.load_pretrained(out, towers=released["mapping"])
    p, q = loaded.params(), again.params()
    assert p.keys() == q.keys()
    for k in p:
        np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(q[k]), err_msg=k)


def test_bfloat16_export_and_reimport(loaded, released, tmp_path):
    loaded.save_pretrained(tmp_path, dtype="bfloat16")
    reader = open_checkpoint(tmp_path)
    assert {reader.info(k).dtype for k in reader} == {"BF16"}
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    again = cambrian_jax.load_pretrained(tmp_path, towers=released["mapping"])
    import ml_dtypes
    p, q = loaded.params(), again.params()
    for k in ("decoder/embedding", "connector/vision_sampler_layers/layer/proj_in/kernel"):
        want = np.asarray(p[k]).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(q[k]), want, err_msg=k)


def test_exported_llm_loads_in_transformers_with_identical_text_logits(loaded, exported):
    out, _ = exported
    llm = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = np.random.default_rng(5).integers(0, llm.config.vocab_size, (1, 30))
    with torch.no_grad():
        ref = llm(torch.from_numpy(ids)).logits.numpy()
    ours = loaded(ids).logits
    diff = max_diff(ours, ref)
    print(f"exported LLM in transformers: max text-logit diff {diff:.2e}")
    assert diff <= 1e-5


def test_export_truncates_the_vocabulary_to_the_tokenizer(loaded, released, tmp_path):
    from cambrian_jax import export_hf
    from cambrian_jax.data.tokenizer import build_tokenizer

    small = build_tokenizer(tmp_path / "tok", ["tiny"], "llama_3", vocab_multiple=0)
    assert len(small) < loaded.config.decoder.vocab_size
    summary = export_hf.export(loaded.params(), loaded.config, tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    reader = open_checkpoint(tmp_path / "out")
    assert summary["vocab_size"] == len(small) == json.load(open(tmp_path / "out" / "config.json"))["vocab_size"]
    assert reader.shape("model.embed_tokens.weight")[0] == reader.shape("lm_head.weight")[0] == len(small)
    np.testing.assert_array_equal(reader["lm_head.weight"], np.asarray(loaded.params()["decoder/lm_head/kernel"]).T[:len(small)])


def _config_file(tmp_path, cfg, tokenizer_dir):
    """A configs/*.py-style file reproducing `cfg` (tower architectures as overrides)."""
    towers = {t.name: {f.name: getattr(t, f.name) for f in dataclasses.fields(t)
                       if f.name not in ("name", "kind", "token_len", "select_layer")} for t in cfg.towers}
    model = dict(towers=[t.name for t in cfg.towers], tower_token_lens=[t.token_len for t in cfg.towers],
                 tower_overrides=towers, select_layer=-2, connector=dataclasses.asdict(cfg.connector),
                 decoder=dataclasses.asdict(cfg.decoder), image_position=cfg.image_position, max_len=cfg.max_len,
                 dtype="float32", remat="none")
    path = tmp_path / "run_config.py"
    path.write_text(textwrap.dedent(f"""
        import json
        import ml_collections

        def get_config(arg=None):
            return ml_collections.ConfigDict(dict(model=json.loads({json.dumps(json.dumps(model))}),
                                                  data=dict(tokenizer_dir={str(tokenizer_dir)!r})))
    """))
    return str(path)


def test_export_cli_from_an_orbax_workdir(loaded, released, exported, tmp_path):
    import orbax.checkpoint as ocp

    from cambrian_jax import export_hf
    from cambrian_jax.model import Cambrian

    params = nnx.state(loaded.model, nnx.Param)
    for stage, step in ((1, 3), (2, 7)):
        mgr = ocp.CheckpointManager((tmp_path / "work" / f"stage{stage}").absolute(),
                                    options=ocp.CheckpointManagerOptions(create=True))
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        mgr.wait_until_finished()
    config = _config_file(tmp_path, loaded.config, released["folder"])
    summary = export_hf.main(["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--config", config,
                              "--max-shard-size", "60KB"])
    assert (summary["stage"], summary["step"]) == (2, 7)
    a, b = open_checkpoint(exported[0]), open_checkpoint(tmp_path / "out")
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    written = json.load(open(tmp_path / "out" / "config.json"))       # no base LLM config: ours only
    assert cambrian_hf.config_from_hf(written, loaded.config.towers) == loaded.config
    assert written["architectures"] == ["CambrianLlamaForCausalLM"] and written["model_type"] == "cambrian_llama"
    assert "vision_sampler_num_heads" not in written, "16 SVA heads, as the reference hard-codes"

    # Stage 1: the adapter, named as the reference's mm_projector.bin, loads back into the connector.
    summary = export_hf.main(["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "adapter"), "--config",
                              config, "--stage", "1"])
    assert (summary["stage"], summary["step"]) == (1, 3)
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"mm_projector.safetensors", "mm_projector.bin", "cambrian_adapter.json"} <= files
    adapter = open_checkpoint(tmp_path / "adapter" / "mm_projector.safetensors")
    assert set(adapter) == set(cambrian_hf.iter_connector_keys(a)), "exactly the connector's released names"
    bin_keys = set(torch.load(tmp_path / "adapter" / "mm_projector.bin", weights_only=True))
    assert bin_keys == set(adapter)
    want = {k: np.asarray(v) for k, v in loaded.params().items() if k.startswith("connector/")}
    for name in ("mm_projector.safetensors", "mm_projector.bin"):
        state = nnx.state(nnx.eval_shape(lambda: Cambrian(loaded.config, rngs=nnx.Rngs(0))), nnx.Param)
        pretrained.load_initial_weights({"adapter": str(tmp_path / "adapter" / name)}, loaded.config, state)
        got = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{name}: {k}")


# --------------------------------------------------------------------------------------------- readers

def test_mm_projector_bin_is_read_weights_only(tmp_path):
    sd = {"model.mm_projector.0.weight": torch.randn(4, 3), "model.image_newline": torch.randn(5).to(torch.bfloat16),
          "model.vision_query": torch.nn.Parameter(torch.randn(1, 3))}
    base = torch.randn(6, 4)
    sd["model.mm_projector.2.weight"] = base[1:5, 1:]             # a strided view sharing storage
    torch.save(sd, tmp_path / "mm_projector.bin")
    for use_torch in (True, False):
        got = load_torch_weights(tmp_path / "mm_projector.bin", use_torch=use_torch)
        assert got.keys() == sd.keys()
        for k, v in sd.items():
            want = v.detach().float().numpy()
            np.testing.assert_array_equal(np.asarray(got[k], np.float32), want, err_msg=f"{k} (torch={use_torch})")
        assert str(got["model.image_newline"].dtype) == "bfloat16"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": torch.ones(1), "evil": Evil()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=True)
    for use_torch in (True, False):
        with pytest.raises(CheckpointError, match="refus|weights_only"):
            load_torch_weights(tmp_path / "evil.bin", use_torch=use_torch)


@pytest.fixture()
def llama_copy(llm_dirs, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(llm_dirs["llama3-sharded"][0], folder)
    return folder


def test_truncated_safetensors_file_is_one_clear_error(llama_copy):
    index = json.load(open(llama_copy / "model.safetensors.index.json"))
    shard = llama_copy / sorted(set(index["weight_map"].values()))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated: .* (interrupted copy or download|fetch it again)"):
        pretrained.load_llm(llama_copy)


def test_missing_shard_named_in_the_index_is_one_clear_error(llama_copy):
    index = json.load(open(llama_copy / "model.safetensors.index.json"))
    gone = sorted(set(index["weight_map"].values()))[-1]
    os.remove(llama_copy / gone)
    with pytest.raises(CheckpointError, match=rf"names 1 shard file\(s\) that are not in .*: {gone} \(\d+ tensors\)"):
        pretrained.load_llm(llama_copy)


def test_mismatches_are_reported_together_by_name_with_expected_shape(llm_dirs, tmp_path):
    folder, model = llm_dirs["llama3-sharded"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)                   # wrong shape
    del sd["model.norm.weight"]                                                      # missing
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)                           # unexpected
    sd["model.layers.2.input_layernorm.weight"] = torch.ones(32, dtype=torch.int32)  # not a float
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), bad)
    safetensors_torch.save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointMismatch) as e:
        pretrained.load_llm(bad)
    msg = str(e.value)
    print(msg)
    assert "1 missing:\n  model.norm.weight (32,)" in msg
    assert "1 unexpected:\n  model.layers.0.mlp.extra.weight (2,)" in msg
    assert "model.layers.1.mlp.up_proj.weight: expected shape (64, 32), got (65, 32)" in msg
    assert "model.layers.2.input_layernorm.weight: dtype I32, expected a float type" in msg


# ----------------------------------------------------------------------------------- sharded loading

SHARDED_SCRIPT = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {root!r})
import jax, numpy as np
from flax import nnx
import cambrian_jax
from cambrian_jax import config as config_lib, pretrained, sharding
from cambrian_jax.model import Cambrian
from configs import common

towers = {{"siglip/t": dict(image_size=14, patch_size=7, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2),
          "clip-convnext-t-multi-stage": dict(image_size=32, depths=(1, 1, 1, 1), dims=(4, 8, 8, 8))}}
dec = json.load(open(os.path.join({llm!r}, "config.json")))
model = dict(towers=list(towers), tower_token_lens=[4, 16], tower_overrides=towers, select_layer=-2,
             connector=dict(vision_hidden_size=16, num_heads=4, query_num_list=[4], connector_depth=1,
                            image_token_len=4, num_of_vision_sampler_layers=1, start_of_vision_sampler_layers=0,
                            stride_of_vision_sampler_layers=1),
             decoder=dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                          num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048),
             image_position=2, max_len=64)
cfg = config_lib.from_dict(model)
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
abstract = nnx.state(nnx.eval_shape(lambda: Cambrian(cfg, rngs=nnx.Rngs(0))), nnx.Param)
shardings = sharding.state_shardings(abstract, common.SHARDING_RULES, mesh)
target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
requested = {{"/".join(map(str, p)): v.get_value().sharding for p, v in nnx.to_flat_state(target)}}
pretrained.load_initial_weights(dict(llm={llm!r}), cfg, target)
plain, _ = pretrained.load_llm({llm!r})
want = {{"decoder/" + "/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}}
sharded = 0
for p, v in nnx.to_flat_state(target):
    key = "/".join(map(str, p))
    if not key.startswith("decoder/"):
        continue
    arr = v.get_value()
    assert arr.sharding == requested[key], (key, arr.sharding, requested[key])
    sharded += len(arr.sharding.device_set) == 4 and not arr.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(arr), want[key], err_msg=key)
print("OK", sharded)
"""


def test_load_initial_weights_fills_sharded_arrays(llm_dirs, tmp_path):
    folder, _ = llm_dirs["llama3-sharded"]
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT.format(root=ROOT, llm=folder))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    print(run.stdout[-2000:], run.stderr[-3000:])
    assert run.returncode == 0 and "OK" in run.stdout
    assert int(run.stdout.split("OK")[1].split()[0]) >= 5, "most decoder parameters should be split over devices"


MESH_LOAD_SCRIPT = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {root!r})
import jax, numpy as np
import cambrian_jax
from cambrian_jax import sharding
from cambrian_jax.config import IMAGE_TOKEN_INDEX
from PIL import Image
mapping = json.loads({mapping!r})
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
plain = cambrian_jax.load_pretrained({folder!r}, towers=mapping)
meshed = cambrian_jax.load_pretrained({folder!r}, towers=mapping, mesh=mesh)
split = sum(1 for v in meshed.params().values() if not v.sharding.is_fully_replicated)
p = plain.config.image_position
ids = np.asarray([list(range(3, 3 + p)) + [IMAGE_TOKEN_INDEX, 5, 6, 7]])
image = Image.new("RGB", (320, 176), (200, 30, 30))
a = np.asarray(plain(ids, images=[image]).logits)
b = np.asarray(meshed(ids, images=[image]).logits)
print("OK", split, float(np.abs(a - b).max()))
"""


def test_load_pretrained_onto_a_mesh_reads_shards_and_matches(released, tmp_path):
    """Each host reads only its devices' shards (multi-host loading); the logits are unchanged."""
    script = tmp_path / "mesh_load.py"
    script.write_text(MESH_LOAD_SCRIPT.format(root=ROOT, folder=released["folder"],
                                              mapping=json.dumps(released["mapping"])))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    print(run.stdout[-2000:], run.stderr[-3000:])
    assert run.returncode == 0 and "OK" in run.stdout
    split, diff = run.stdout.split("OK")[1].split()
    assert int(split) >= 5, "most parameters should be split over the devices"
    assert float(diff) <= 1e-5
