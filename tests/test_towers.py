"""Vision towers against Hugging Face transformers (spec §2.1, §14.6, §14.7).

References are tiny random transformers models (float32, CPU, eager attention) whose every parameter,
LayerNorm and layer-scale included, is randomised so that a dropped or mis-mapped tensor shows.
Features must match to max|ours - ref| <= 1e-5 * max(1, max|ref|):

  CLIPVisionModel    hidden_states[select_layer][:, 1:]
  SiglipVisionModel  last_hidden_state (image size not a multiple of the patch: VALID conv)
  Dinov2Model        last_hidden_state[:, 1:] at the native resolution (MLP and SwiGLU); at another
                     resolution, with the 4.37 position interpolation patched in (5.x differs)
  ConvNextModel      hidden_states[1:5] resized with F.interpolate(bilinear) and concatenated
Token-grid resizing is checked against torch F.interpolate(bilinear, align_corners=False).
"""
import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cambrian_jax.config import tower_config
from cambrian_jax.convert.assign import CheckpointMismatch
from cambrian_jax.convert.hf_towers import from_hf, hf_tower_config
from cambrian_jax.towers import build_tower, load_tower
from cambrian_jax.towers.vit import dinov2_positions

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

BATCH = 2


# ---------------------------------------------------------------------------------------------- helpers

def randomized(model, seed: int):
    """Every parameter random: norm scales and layer scales around 1, everything else around 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            around_one = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight",
                                        "layernorm.weight", "lambda1", "layer_scale_parameter"))
            p.copy_(noise + 1.0 if around_one else noise)
    return model.eval()


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def pixels(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, size, size, 3)).astype(np.float32)


def nchw(x: np.ndarray):
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def ours(cfg, sd):
    """Our tower loaded from the HF state dict, as a jitted function of NHWC pixels."""
    graphdef, state = nnx.split(load_tower(cfg, from_hf(cfg, sd), source=cfg.name))
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: np.asarray(run(state, jnp.asarray(x)))


def resize_ref(tokens, side: int):
    """torch's bilinear token resize, as the reference applies it: [B, n², C] → [B, side², C]."""
    b, n, c = tokens.shape
    g = math.isqrt(n)
    grid = tokens.reshape(b, g, g, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(b, side * side, c)


def assert_close(got: np.ndarray, ref, what: str) -> float:
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    diff = float(np.max(np.abs(got - ref)))
    tol = 1e-5 * max(1.0, float(np.max(np.abs(ref))))
    print(f"{what}: max abs diff {diff:.2e} (tol {tol:.2e})")
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"
    return diff


# ---------------------------------------------------------------------------------------------- CLIP

@pytest.fixture(scope="module")
def clip():
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=28, patch_size=7,
                                           attn_implementation="eager")
    model = randomized(transformers.CLIPVisionModel(config), seed=1)
    x = pixels(28, seed=2)
    with torch.no_grad():
        hidden = model(nchw(x), output_hidden_states=True).hidden_states
    return config, state_dict(model), x, hidden


@pytest.mark.parametrize("select_layer", [-2, -1, -4])
def test_clip_matches_hidden_states_select_layer(clip, select_layer):
    config, sd, x, hidden = clip
    cfg = hf_tower_config("clip", config, "openai/clip-tiny", token_len=16)
    cfg = dataclasses.replace(cfg, select_layer=select_layer)
    assert_close(ours(cfg, sd)(x), hidden[select_layer][:, 1:], f"CLIP hidden_states[{select_layer}]")


def test_clip_converter_accepts_hub_prefix_and_ignores_post_layernorm(clip):
    config, sd, _, _ = clip
    cfg = hf_tower_config("clip", config, "openai/clip-tiny", token_len=16)
    plain = from_hf(cfg, sd)
    hub = from_hf(cfg, {"vision_model." + k: v for k, v in sd.items()})
    assert plain.keys() == hub.keys() and all(np.array_equal(plain[k], hub[k]) for k in plain)
    assert not any("post" in k for k in plain)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_converter_reads_the_vision_half_of_a_full_image_text_checkpoint(clip, siglip, kind):
    """The Hub files (openai/clip-vit-large-patch14-336, google/siglip-*) are CLIPModel/SiglipModel."""
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    vision_config = (clip if kind == "clip" else siglip)[0]
    if kind == "clip":
        full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision_config.to_dict(),
                                                              projection_dim=16))
    else:
        full = transformers.SiglipModel(transformers.SiglipConfig(text_config=text,
                                                                  vision_config=vision_config.to_dict()))
    cfg = hf_tower_config(kind, full.config, f"{kind}-tiny", token_len=16)
    assert (cfg.hidden_size, cfg.num_layers) == (vision_config.hidden_size, vision_config.num_hidden_layers)
    got = from_hf(cfg, state_dict(full))
    assert not [k for k in got if k.startswith("hf:")]
    assert got.keys() == from_hf(cfg, (clip if kind == "clip" else siglip)[1]).keys()


def test_converter_reports_missing_and_unknown_tensors(clip):
    config, sd, _, _ = clip
    cfg = hf_tower_config("clip", config, "openai/clip-tiny", token_len=16)
    broken = {k: v for k, v in sd.items() if k != "pre_layrnorm.bias"}
    broken["embeddings.extra_scale"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointMismatch, match=r"(?s)missing: pre_norm/bias.*unexpected: hf:embeddings.extra_scale"):
        load_tower(cfg, from_hf(cfg, broken))
    gap = {k: v for k, v in sd.items() if not k.startswith("encoder.layers.1.mlp.fc1.")}
    with pytest.raises(CheckpointMismatch, match=r"blocks/mlp/fc1/kernel: layers \[1\] absent"):
        from_hf(cfg, gap)


# ---------------------------------------------------------------------------------------------- SigLIP

@pytest.fixture(scope="module")
def siglip():
    # 52 = 7·7 + 3: the VALID patch conv ignores the last 3 rows and columns.
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=52, patch_size=7,
                                             attn_implementation="eager")
    model = randomized(transformers.SiglipVisionModel(config), seed=3)
    x = pixels(52, seed=4)
    with torch.no_grad():
        last = model(nchw(x)).last_hidden_state
    return config, {"vision_model." + k: v for k, v in state_dict(model).items()}, x, last


def test_siglip_matches_last_hidden_state_with_valid_patch_conv(siglip):
    config, sd, x, last = siglip
    cfg = hf_tower_config("siglip", config, "siglip-tiny", token_len=49)
    assert not any(k.startswith("hf:") for k in from_hf(cfg, sd)), "the pooling head must be ignored"
    assert_close(ours(cfg, sd)(x), last, "SigLIP last_hidden_state")


def test_siglip_token_interpolation_7x7_to_6x6(siglip):
    config, sd, x, last = siglip
    cfg = hf_tower_config("siglip", config, "siglip-tiny", token_len=36)
    assert_close(ours(cfg, sd)(x), resize_ref(last, 6), "SigLIP 7x7 → 6x6 bilinear")


# ---------------------------------------------------------------------------------------------- DINOv2

def dinov2_model(swiglu: bool):
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                       image_size=28, patch_size=7, use_swiglu_ffn=swiglu,
                                       attn_implementation="eager")
    return config, randomized(transformers.Dinov2Model(config), seed=5 + swiglu)


@pytest.fixture(scope="module", params=[False, True], ids=["mlp", "swiglu"])
def dinov2(request):
    return dinov2_model(request.param)


def test_dinov2_matches_last_hidden_state_at_native_resolution(dinov2):
    config, model = dinov2
    cfg = hf_tower_config("dinov2", config, "facebook/dinov2-tiny", token_len=16)
    assert (cfg.raw_side, cfg.pos_grid) == (4, 4)
    if config.use_swiglu_ffn:
        assert cfg.intermediate_size == 88   # int(128 * 2/3) = 85, rounded up to a multiple of 8
    x = pixels(28, seed=7)
    with torch.no_grad():
        ref = model(nchw(x)).last_hidden_state[:, 1:]
    assert_close(ours(cfg, state_dict(model))(x), ref, f"DINOv2 ({cfg.intermediate_size=}) last_hidden_state")


def test_dinov2_converter_accepts_hub_names(dinov2):
    """The Hub checkpoints keep 4.x names: attention.attention.query …, fused SwiGLU weights_in."""
    config, model = dinov2
    cfg = hf_tower_config("dinov2", config, "facebook/dinov2-tiny", token_len=16)
    sd = state_dict(model)
    renames = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
               "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
               "mlp.down_proj": "mlp.weights_out"}
    hub = {}
    for k, v in sd.items():
        for new, old in renames.items():
            k = k.replace(new, old)
        if ".mlp.gate_proj." in k:
            up = sd[k.replace("gate_proj", "up_proj")]
            hub[k.replace("gate_proj", "weights_in")] = np.concatenate([v, up], axis=0)
        elif ".mlp.up_proj." not in k:
            hub["dinov2." + k] = v
    assert any("weights_in" in k for k in hub) == config.use_swiglu_ffn
    new, old = from_hf(cfg, sd), from_hf(cfg, hub)
    assert new.keys() == old.keys() and all(np.array_equal(new[k], old[k]) for k in new)


def interpolate_pos_encoding_437(self, embeddings, height, width):
    """transformers 4.37 Dinov2Embeddings.interpolate_pos_encoding, which the released model ran."""
    num_patches = embeddings.shape[1] - 1
    num_positions = self.position_embeddings.shape[1] - 1
    if num_patches == num_positions and height == width:
        return self.position_embeddings
    class_pos_embed = self.position_embeddings[:, 0]
    patch_pos_embed = self.position_embeddings[:, 1:]
    dim = embeddings.shape[-1]
    height, width = height // self.config.patch_size + 0.1, width // self.config.patch_size + 0.1
    side = math.sqrt(num_positions)
    patch_pos_embed = patch_pos_embed.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    patch_pos_embed = F.interpolate(patch_pos_embed.to(torch.float32),
                                    scale_factor=(float(height / side), float(width / side)),
                                    mode="bicubic", align_corners=False)
    assert (int(height), int(width)) == tuple(patch_pos_embed.shape[-2:])
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def test_dinov2_off_native_resolution_matches_transformers_437():
    """42 px = 6×6 patches from a 4×4 position grid, then 6×6 → 4×4 tokens (as 27 → 24 at 378 px)."""
    config, model = dinov2_model(swiglu=True)
    model.embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding_437, model.embeddings)
    cfg = hf_tower_config("dinov2", config, "facebook/dinov2-tiny-res42", token_len=16)
    assert (cfg.image_size, cfg.raw_side, cfg.pos_grid) == (42, 6, 4)
    x = pixels(42, seed=8)
    with torch.no_grad():
        ref = resize_ref(model(nchw(x)).last_hidden_state[:, 1:], 4)
    assert_close(ours(cfg, state_dict(model))(x), ref, "DINOv2 at 6x6 patches (4.37 interpolation)")


@pytest.mark.parametrize("grid,side", [(37, 27), (4, 6), (5, 3)])
def test_dinov2_position_interpolation_is_the_437_formula(grid, side):
    """bicubic with scale_factor=(side+0.1)/grid — not size=(side, side) as transformers 5.x does."""
    width = 8
    table = np.random.default_rng(grid).standard_normal((grid * grid + 1, width)).astype(np.float32)
    got = np.asarray(dinov2_positions(jnp.asarray(table), grid, side))

    t = torch.from_numpy(table)
    scale = (side + 0.1) / grid
    grid_t = t[1:].reshape(1, grid, grid, width).permute(0, 3, 1, 2)
    grid_t = F.interpolate(grid_t, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    ref = torch.cat([t[:1], grid_t.permute(0, 2, 3, 1).reshape(side * side, width)])
    assert_close(got, ref, f"DINOv2 position grid {grid} → {side}")
    by_size = F.interpolate(t[1:].reshape(1, grid, grid, width).permute(0, 3, 1, 2), size=(side, side),
                            mode="bicubic", align_corners=False)
    assert not np.allclose(got[1:], by_size.permute(0, 2, 3, 1).reshape(-1, width).numpy(), atol=1e-4), \
        "the 4.37 and 5.x interpolations should differ here"


# ---------------------------------------------------------------------------------------------- ConvNeXt

@pytest.fixture(scope="module")
def convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], image_size=64)
    model = randomized(transformers.ConvNextModel(config), seed=9)
    x = pixels(64, seed=10)
    with torch.no_grad():
        hidden = model(nchw(x), output_hidden_states=True).hidden_states
    assert len(hidden) == 5, "embeddings + four stage maps"
    return config, state_dict(model), x, hidden


def convnext_ref(maps, side: int):
    grids = [F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False) for m in maps]
    grid = torch.cat(grids, dim=1)
    return grid.permute(0, 2, 3, 1).reshape(grid.shape[0], side * side, grid.shape[1])


def test_convnext_multi_stage_matches_resized_stage_maps(convnext):
    config, sd, x, hidden = convnext
    cfg = hf_tower_config("convnext", config, "clip-convnext-tiny-multi-stage", token_len=36)
    assert cfg.multi_stage and cfg.width == 8 + 16 + 24 + 32 and cfg.layer_norm_eps == 1e-6
    assert_close(ours(cfg, sd)(x), convnext_ref(hidden[1:5], 6), "ConvNeXt multi-stage (16,8,4,2 → 6)")


def test_convnext_single_stage_matches_last_stage_map(convnext):
    config, sd, x, hidden = convnext
    cfg = hf_tower_config("convnext", config, "clip-convnext-tiny", token_len=9)
    assert not cfg.multi_stage and cfg.width == 32
    assert_close(ours(cfg, sd)(x), convnext_ref(hidden[4:5], 3), "ConvNeXt last stage (2 → 3)")


# ---------------------------------------------------------------------------------------------- released sizes

HUB_CONFIGS = [  # the architecture entries of the Hub config.json files (defaults omitted, as saved)
    ("clip", {"vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "image_size": 336, "patch_size": 14}},
     "openai/clip-vit-large-patch14-336"),
    ("siglip", {"vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                  "num_attention_heads": 16, "image_size": 384, "patch_size": 14}},
     "siglip/CLIP-ViT-SO400M-14-384"),
    ("dinov2", {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "mlp_ratio": 4,
                "use_swiglu_ffn": True, "image_size": 518, "patch_size": 14}, "facebook/dinov2-giant-res378"),
]


@pytest.mark.parametrize("kind,hub_config,name", HUB_CONFIGS, ids=[c[0] for c in HUB_CONFIGS])
def test_hf_tower_config_agrees_with_the_released_names(kind, hub_config, name):
    expected = tower_config(name, 576)
    if kind == "siglip":  # HF-format SigLIP uses tanh GELU; the released open_clip/timm trunk exact GELU
        expected = dataclasses.replace(expected, hidden_act="gelu_tanh")
    assert hf_tower_config(kind, hub_config, name, 576) == expected


RELEASED = [
    # name, token_len, width, HF reference architecture, HF parameters the tower does not use
    ("siglip/CLIP-ViT-SO400M-14-384", 576, 1152,
     lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
         hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
         patch_size=14, vision_use_head=False)), 0),
    ("openai/clip-vit-large-patch14-336", 576, 1024,
     lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
         hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
         patch_size=14)), 2 * 1024),
    ("facebook/dinov2-giant-res378", 576, 1536,
     lambda: transformers.Dinov2Model(transformers.Dinov2Config(
         hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True, image_size=518,
         patch_size=14)), 1536),
    ("clip-convnext-XXL-multi-stage", 9216, 5760,
     lambda: transformers.ConvNextModel(transformers.ConvNextConfig(
         hidden_sizes=[384, 768, 1536, 3072], depths=[3, 4, 30, 3])), 2 * 3072),
]


@pytest.mark.parametrize("name,token_len,width,hf_model,hf_unused", RELEASED, ids=[r[0] for r in RELEASED])
def test_released_towers_shapes_and_parameter_counts(name, token_len, width, hf_model, hf_unused):
    """Abstract only (nnx.eval_shape / jax.eval_shape): nothing the size of a real tower is allocated."""
    cfg = tower_config(name, token_len)
    tower = nnx.eval_shape(lambda: build_tower(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(tower)
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    out = jax.eval_shape(lambda s, p: nnx.merge(graphdef, s)(p), state, x)
    assert (out.shape, out.dtype) == ((1, token_len, width), jnp.bfloat16)

    params = nnx.state(tower, nnx.Param)
    ours_count = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in hf_model().parameters())
    assert ours_count == hf_count - hf_unused
    for path, v in nnx.to_flat_state(params):
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(v.shape), f"{path}: axes {axes} for shape {v.shape}"
        if "blocks" in path:
            assert axes[0] == "tower_layers", f"{path}: stacked layers must lead with 'tower_layers'"
