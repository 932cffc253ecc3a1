"""Temperature + top-p sampling (generate.nucleus_logits, sample_tokens) and the blind pass, checked independently.

  the nucleus      nucleus_logits keeps exactly the tokens transformers' TemperatureLogitsWarper then
                   TopPLogitsWarper keep (generation/logits_process.py; the reference samples with
                   HF generate), with the same renormalised probabilities: random ties-free rows, a
                   peaked row, top_p = 1, a vanishing top_p, top_p just below/above a cumulative mass,
                   and cumulative masses that hit top_p exactly (ties of exactly representable probabilities)
  the draws        20000 seeded draws of sample_tokens fit softmax(nucleus) (χ², p > 1e-3) and never
                   leave the nucleus; the same test rejects draws at another temperature and draws
                   from the untruncated softmax (its power)
  row independence a row's draw with its key does not depend on the other rows (sample_tokens), and a
                   row's sampled continuation with its row seed equals that row generated alone
                   (Generator.generate_ids, the micro model), whatever jax_default_prng_impl is (these
                   tests run under conftest's unsafe_rbg, whose batched keys would mix the rows)
  blind pass       evaluation.harness.run_pass(blind=True): the pixels and key masks that reach the
                   towers are those of a uniform grey (128, 128, 128) image of the original image's size
                   (a wide and a tall one); the vision pass's are the real image's

Float32 on CPU.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats     # a dependency of jax

from cambrian_jax import config as config_lib
from cambrian_jax.config import IMAGE_TOKEN_INDEX
from cambrian_jax.generate import Generator, Sampling, nucleus_logits, row_keys, sample_tokens
from configs import cambrian_tiny

try:
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    HAVE_REFERENCE = True
except ImportError:   # the test extra is not installed
    HAVE_REFERENCE = False
needs_reference = pytest.mark.skipif(not HAVE_REFERENCE, reason="needs torch and transformers (the test extra)")

nucleus = jax.jit(nucleus_logits)
sample = jax.jit(sample_tokens)


def hf_warped(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The scores HF generate(do_sample=True, temperature, top_p) samples from (no top-p warper at top_p = 1,
    as generate() adds none then)."""
    scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(logits))
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


def ours(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    # As the decode loop passes them: float32 scalars.
    return np.asarray(nucleus(jnp.asarray(logits), jnp.float32(temperature), jnp.float32(top_p)))


def softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _random_logits(seed: int, rows: int = 6, vocab: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4.0, (rows, 1))).astype(np.float32)
    x[0, 17] += 12.0                                   # a peaked row: one token holds almost all the mass
    assert all(len(np.unique(r)) == vocab for r in x)  # ties-free
    return x


@needs_reference
@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.7, 0.8), (0.2, 0.7), (1.5, 0.5), (1.0, 0.05),
                                                (1.0, 1.0), (0.7, 1.0), (1.0, 1e-6)])
def test_the_nucleus_is_transformers_temperature_then_top_p(temperature, top_p):
    logits = _random_logits(0)
    ref, got = hf_warped(logits, temperature, top_p), ours(logits, temperature, top_p)
    kept_ref, kept = np.isfinite(ref), np.isfinite(got)
    np.testing.assert_array_equal(kept, kept_ref)
    if top_p == 1.0:
        assert kept.all()
    elif top_p <= 0.05:     # below every row's largest probability: the argmax alone
        assert (kept.sum(-1) == 1).all() and (kept.argmax(-1) == logits.argmax(-1)).all()
    else:
        assert (kept.sum(-1) > 1).any() and (kept.sum(-1) < logits.shape[1]).all()
    # Renormalised probabilities: both float32 softmaxes of logits/T that agree to ~1 ulp; 1e-6 absolute is
    # ~10 float32 ulps of the largest probability.
    np.testing.assert_allclose(softmax64(got), torch.tensor(ref).softmax(-1).numpy(), rtol=0, atol=1e-6)


@needs_reference
def test_top_p_at_and_around_a_cumulative_mass():
    """Where the nucleus ends. Just below / above the mass of the k most likely tokens: k / k+1 tokens.
    Exactly on it: the reference removes a token when the mass up to and including it, summed from the
    least likely, is <= 1 - top_p. With four tokens of probability exactly 1/4 (the others exp-underflow to
    0) and top_p 1/2 or 3/4 the sums are exact, and HF keeps the tied tokens that sort last (its
    ascending sort keeps index order among ties): {2, 3} and {1, 2, 3}."""
    logits = _random_logits(1, rows=4, vocab=32)
    probs = softmax64(logits)
    for row in range(len(logits)):
        desc = np.sort(probs[row])[::-1]
        mass = np.cumsum(desc)
        for k in (1, 2, 5, 9):
            # A margin well inside the gap to the next token's mass and far above float32 rounding.
            margin = min(1e-4, desc[k] / 4)
            if margin < 1e-6:      # the peaked row: its tail is too light to place top_p between
                continue
            for top_p, n_kept in ((mass[k - 1] - margin, k), (mass[k - 1] + margin, k + 1)):
                ref = np.isfinite(hf_warped(logits[row:row + 1], 1.0, float(top_p)))
                got = np.isfinite(ours(logits[row:row + 1], 1.0, float(top_p)))
                assert ref.sum() == n_kept, (row, k, top_p)
                np.testing.assert_array_equal(got, ref, err_msg=f"row {row}, k {k}, top_p {top_p}")

    tied = np.full((1, 8), -1e4, np.float32)
    tied[0, :4] = 0.0
    for top_p, expected in ((0.5, [2, 3]), (0.75, [1, 2, 3])):
        ref = np.flatnonzero(np.isfinite(hf_warped(tied, 1.0, top_p)))
        got = np.flatnonzero(np.isfinite(ours(tied, 1.0, top_p)))
        assert ref.tolist() == expected
        assert got.tolist() == expected, f"top_p {top_p}: ours keeps {got.tolist()}, HF {expected}"


# ------------------------------------------------------------------------------------------- draws

N_DRAWS = 20000
CHI2_P = 1e-3     # a correct sampler fails this with probability 1e-3; the seed is fixed, so it never flakes


def _draws(logits_row: np.ndarray, temperature: float, top_p: float, seed: int) -> np.ndarray:
    keys = row_keys(seed, np.arange(N_DRAWS))          # the generator's keys: one per row seed
    batch = jnp.broadcast_to(jnp.asarray(logits_row), (N_DRAWS, logits_row.shape[-1]))
    return np.asarray(sample(batch, keys, jnp.float32(temperature), jnp.float32(top_p)))


def _chi2_p(draws: np.ndarray, probs: np.ndarray, outside: str = "reject") -> float:
    """χ² goodness of fit of the draws to probs. A draw where probs is 0 rejects outright (p = 0), or with
    outside="drop" is left out (the χ² test alone, of the draws that fell where probs > 0)."""
    counts = np.bincount(draws, minlength=len(probs))
    support = probs > 0
    if counts[~support].any() and outside == "reject":
        return 0.0
    kept = counts[support]
    return float(stats.chisquare(kept, kept.sum() * probs[support] / probs[support].sum()).pvalue)


@needs_reference
def test_draws_follow_the_nucleus_distribution_and_the_test_has_power():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(12) * 1.5).astype(np.float32)
    temperature, top_p = 0.7, 0.9
    target = softmax64(hf_warped(logits[None], temperature, top_p))[0]
    assert 3 <= (target > 0).sum() < 12 and (N_DRAWS * target[target > 0]).min() > 50   # χ² approximation holds
    draws = _draws(logits, temperature, top_p, seed=0)
    p = _chi2_p(draws, target)
    print(f"χ² p-value of {N_DRAWS} draws (T={temperature}, top_p={top_p}): {p:.3f}")
    assert p > CHI2_P
    # Power: the test tells a sampler at T=1, and one without the top-p cut, from the right one. At T=1 the
    # χ² statistic alone does too (on the draws that fell inside the nucleus: p ≈ 1e-297); the untruncated
    # softmax differs only outside the nucleus (inside, the cut is a renormalisation), where any draw rejects.
    at_t1, untruncated = _draws(logits, 1.0, top_p, seed=0), _draws(logits, temperature, 1.0, seed=0)
    assert _chi2_p(at_t1, target) < CHI2_P and _chi2_p(at_t1, target, outside="drop") < CHI2_P
    assert np.isin(untruncated, np.flatnonzero(target == 0)).mean() > 0.05
    assert _chi2_p(untruncated, target) < CHI2_P


# -------------------------------------------------------------------------------- row independence

def test_a_rows_draw_depends_only_on_its_logits_and_key():
    logits = _random_logits(2, rows=5, vocab=64)
    # The keys of the decode loop: row_keys(seed, row seeds), folded with the step number.
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys(3, [10, 11, 12, 13, 14]), 2)
    t, top_p = jnp.float32(1.3), jnp.float32(0.95)
    base = np.asarray(sample(jnp.asarray(logits), keys, t, top_p))
    rng = np.random.default_rng(4)
    for row in range(5):
        perm = rng.permutation(5)
        where = int(np.flatnonzero(perm == row)[0])
        other = rng.standard_normal(logits.shape).astype(np.float32) * 3     # replace every other row
        other[where] = logits[row]
        other_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys(3, [20, 21, 22, 23, 24]), 2)
        other_keys = other_keys.at[where].set(keys[row])
        for x, k in ((logits[perm], keys[perm]), (other, keys[perm]), (other, other_keys)):
            assert int(np.asarray(sample(jnp.asarray(x), k, t, top_p))[where]) == base[row]
        alone = sample(jnp.asarray(logits[row:row + 1]), keys[row:row + 1], t, top_p)
        assert int(np.asarray(alone)[0]) == base[row]
    # Not vacuous: the same row with other keys draws other tokens.
    many = np.asarray(sample(jnp.broadcast_to(jnp.asarray(logits[1]), (64, 64)), row_keys(9, np.arange(64)),
                             t, top_p))
    assert len(set(many.tolist())) > 5


GREY = (128, 128, 128)   # the blind pass's image: uniform mid-grey (evaluation.harness.blank_like)


@pytest.fixture(scope="module")
def micro_generator(tmp_path_factory):
    """The micro model (configs/cambrian_tiny.py:micro: one tower, SVA, an in-LLM aggregator, 2 decoder
    layers) with random weights, the synthetic dataset's phi3 tokenizer (image_position 14), no stop ids."""
    from cambrian_jax.data import synthetic
    from cambrian_jax.data.tokenizer import load_tokenizer
    from cambrian_jax.model import init_model

    folder = str(tmp_path_factory.mktemp("tokenizer"))
    synthetic.build_tiny_tokenizer(folder, "phi3")
    cfg = config_lib.from_dict(cambrian_tiny.get_config("micro").model)
    return Generator(init_model(cfg, 0), load_tokenizer(folder), "phi3", cfg=cfg, stop_ids=(), prompt_multiple=64)


def _noise(size, seed):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


WIDE, TALL = (44, 20), (18, 40)
STEPS = 6      # the API tests and the blind pass share the compiled (batch 2, prompt 64, cache 128) programs


@pytest.mark.slow
def test_a_rows_sampled_continuation_is_its_own(micro_generator):
    gen = micro_generator
    cfg = gen.cfg
    rng = np.random.default_rng(6)
    vocab = cfg.decoder.vocab_size

    def prompt(after):
        return [int(i) for i in rng.integers(1, vocab, cfg.image_position)] + [IMAGE_TOKEN_INDEX] + \
               [int(i) for i in rng.integers(1, vocab, after)]

    ids = [prompt(5), prompt(9)]
    images = [_noise(WIDE, 0), _noise(TALL, 1)]
    hot = Sampling(max_new_tokens=STEPS, temperature=1.5, top_p=0.98, seed=11)
    seeds = [101, 202]
    together = gen.generate_ids(ids, images, hot, row_seeds=seeds).tokens
    for i in range(2):
        alone = gen.generate_ids([ids[i]], [images[i]], hot, row_seeds=[seeds[i]]).tokens[0]
        assert alone == together[i], f"row {i}: {alone} alone, {together[i]} in the batch"
    # Not vacuous: sampling, not greedy, and the row seed matters.
    assert together != gen.generate_ids(ids, images, Sampling(max_new_tokens=STEPS)).tokens
    assert gen.generate_ids(ids[::-1], images[::-1], hot, row_seeds=seeds[::-1]).tokens == together[::-1]
    assert gen.generate_ids(ids, images, hot, row_seeds=[999, 202]).tokens[0] != together[0]


# ------------------------------------------------------------------------------------ the blind pass

def test_the_blind_pass_gives_the_towers_a_grey_image_of_the_same_size(micro_generator, monkeypatch):
    """Captured where they arrive: the images the harness hands generate_ids, and the pixels and tower
    masks the compiled prefill (towers → connector → decoder) receives. Spies record and call through."""
    from cambrian_jax import generate, preprocess
    from cambrian_jax.evaluation.benchmarks import BenchmarkSpec, Item
    from cambrian_jax.evaluation.harness import run_pass

    gen = micro_generator
    originals = {"wide": _noise(WIDE, 2), "tall": _noise(TALL, 3)}
    items = [Item(id=name, prompt="Which colour is on the left?\n(A) red\n(B) blue", answer="(A)",
                  choices=["red", "blue"], image=im) for name, im in originals.items()]
    spec = BenchmarkSpec("probe", None, STEPS)

    handed, arrived = [], []
    real_generate_ids, real_prefill = gen.generate_ids, generate._prefill
    prefill_signature = inspect.signature(real_prefill)

    def spy_generate_ids(ids_list, images=None, *args, **kwargs):
        handed.append([None if im is None else (im.size, np.asarray(im).copy()) for im in images])
        return real_generate_ids(ids_list, images, *args, **kwargs)

    def spy_prefill(*args, **kwargs):
        bound = prefill_signature.bind(*args, **kwargs).arguments
        arrived.append(([np.asarray(p) for p in bound["pixels"]], [np.asarray(m) for m in bound["tower_masks"]]))
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_ids", spy_generate_ids)
    monkeypatch.setattr(generate, "_prefill", spy_prefill)
    sampling = Sampling(max_new_tokens=STEPS)
    run_pass(gen, items, spec, sampling=sampling, blind=False, batch_size=2)
    run_pass(gen, items, spec, sampling=sampling, blind=True, batch_size=2)
    assert len(handed) == len(arrived) == 2           # one batch per pass
    (vision_images, blind_images), (vision_px, blind_px) = handed, arrived

    grid = gen.cfg.connector.grid
    for row, (name, original) in enumerate(originals.items()):
        size = original.size
        # What the harness hands the generator: the real image, then a uniform grey one of its size.
        assert vision_images[row][0] == size and np.array_equal(vision_images[row][1], np.asarray(original))
        blind_size, blind_array = blind_images[row]
        assert blind_size == size
        assert (blind_array == np.asarray(GREY, np.uint8)).all()
        # What reaches the towers: the preprocessing of exactly those images, with the original size's masks.
        grey = Image.new("RGB", size, GREY)
        want_masks = preprocess.image_masks(size, gen.cfg.towers, grid, gen.image_mode)[0]
        for k, tower in enumerate(gen.cfg.towers):
            real_px = preprocess.preprocess_towers(original, gen.cfg.towers, gen.image_mode)[k]
            grey_px = preprocess.preprocess_towers(grey, gen.cfg.towers, gen.image_mode)[k]
            np.testing.assert_array_equal(vision_px[0][k][row], real_px)
            np.testing.assert_array_equal(blind_px[0][k][row], grey_px)
            assert not np.array_equal(blind_px[0][k][row], real_px)
            # The shape stays: a square grey image, or a grey image of the other orientation, preprocesses
            # differently (the padding band), and the key masks are the original size's, not all-valid.
            for other in ((max(size), max(size)), size[::-1]):
                other_px = preprocess.preprocess_towers(Image.new("RGB", other, GREY), gen.cfg.towers,
                                                        gen.image_mode)[k]
                assert not np.array_equal(blind_px[0][k][row], other_px), (name, other)
            for masks in (vision_px[1], blind_px[1]):
                np.testing.assert_array_equal(masks[k][row], want_masks[k])
            assert not want_masks[k].all()
