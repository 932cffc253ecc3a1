"""The grain pipeline: batch contract, image block layout, determinism, resume, multi-host sharding."""
import json

import numpy as np
import pytest

from cambrian_jax import layout, preprocess
from cambrian_jax.config import IGNORE_INDEX
from cambrian_jax.data import pipeline as P, prepare as prep, synthetic as S, templates as T
from cambrian_jax.data.testing import tiny_model_config

N_IMAGE, N_TEXT, GB = 40, 8, 8


def _text_samples(n):
    return [{"id": f"text-{i}", "source": "chat", "conversations": [
        {"from": "human", "value": f"Say the number {i}."}, {"from": "gpt", "value": f"The number is {i}."}]}
        for i in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    tok = S.build_tiny_tokenizer(str(base / "tok"), "phi3")
    p = T.image_position("phi3", tok)
    samples = S.generate(N_IMAGE, tasks=S.TASKS)
    samples[3:3] = _text_samples(N_TEXT // 2)
    samples += _text_samples(N_TEXT)[N_TEXT // 2:]
    (base / "img").mkdir()
    with open(base / "data.jsonl", "w") as f:
        for s in samples:
            row = {k: v for k, v in s.items() if k != "meta"}
            if "image" in s:
                row["image"] = f"{s['id']}.png"
                s["image"].save(base / "img" / row["image"])
            f.write(json.dumps(row) + "\n")
    summary = prep.prepare([str(base / "data.jsonl")], str(base / "img"), str(base / "shards"), num_shards=2,
                           workers=0, verbose=False)
    assert summary["written"] == len(samples) and not summary["skipped"]
    cfg = tiny_model_config(p, max_len=128, vocab_size=len(tok))
    return dict(tok=tok, p=p, cfg=cfg, samples=samples, shards=str(base / "shards"), tokdir=str(base / "tok"))


def _data(env, **kw):
    c = P.data_config(paths=[env["shards"]], tokenizer_dir=env["tokdir"], template="phi3", global_batch_size=GB,
                      with_index=True, read_threads=2)
    c.update(kw)
    return c


def _make(env, process_index=0, process_count=1, **kw):
    return P.make_dataset(_data(env, **kw), env["cfg"], None, process_index, process_count)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contract_and_image_block(env):
    cfg, p = env["cfg"], env["p"]
    n, block = cfg.connector.grid, cfg.connector.block_len
    it = _make(env)
    batches = list(it)
    assert len(batches) == (N_IMAGE + N_TEXT) // GB == it.num_batches
    b = batches[0]
    spec = {"input_ids": (np.int32, (GB, 128)), "labels": (np.int32, (GB, 128)), "attention_mask": (np.bool_, (GB, 128)),
            "positions": (np.int32, (GB, 128)), "has_image": (np.bool_, (GB,)), "index": (np.int64, (GB,))}
    for k, t in enumerate(cfg.towers):
        spec[f"pixels_{k}"] = (np.float32, (GB, t.image_size, t.image_size, 3))
        spec[f"tower_mask_{k}"] = (np.bool_, (GB, t.token_len))
    assert {k: (v.dtype.type, v.shape) for k, v in b.items()} == spec

    seen_text = seen_image = 0
    for b in batches:
        for r in range(GB):
            ids, lab, mask = b["input_ids"][r], b["labels"][r], b["attention_mask"][r]
            assert (ids[p:p + block] == 0).all() and (lab[p:p + block] == IGNORE_INDEX).all()
            np.testing.assert_array_equal(b["positions"][r], layout.positions(mask))
            assert mask[:p].all()
            sup = lab != IGNORE_INDEX
            np.testing.assert_array_equal(lab[sup], ids[sup])
            if b["has_image"][r]:
                seen_image += 1
                assert sup.any() and env["tok"].decode(ids[sup], skip_special_tokens=False).endswith("<|end|>")
            else:
                seen_text += 1
                assert not mask[p:p + block].any()
                assert all((b[f"pixels_{k}"][r] == 0).all() and b[f"tower_mask_{k}"][r].all()
                           for k in range(len(cfg.towers)))
                assert env["tok"].decode(ids[sup], skip_special_tokens=False).startswith("The number is")
    assert seen_text == N_TEXT and seen_image == N_IMAGE
    assert it.stats == {"ok": N_IMAGE + N_TEXT}


def test_rows_match_direct_computation(env):
    """One row rebuilt by hand: template encoding, the block mask of its image size, per-tower pixels."""
    cfg, p, tok = env["cfg"], env["p"], env["tok"]
    b = next(_make(env, shuffle=False))
    s = env["samples"][0]
    size = s["image"].size
    enc = T.encode("phi3", tok, s["conversations"], image_position=p)
    ids, mask, lab = layout.expand_image_block(enc.ids, p, cfg.connector.grid, size, enc.labels)
    L = len(ids)
    np.testing.assert_array_equal(b["input_ids"][0][:L], ids)
    np.testing.assert_array_equal(b["labels"][0][:L], lab)
    np.testing.assert_array_equal(b["attention_mask"][0][:L], mask)
    assert not b["attention_mask"][0][L:].any() and (b["labels"][0][L:] == IGNORE_INDEX).all()
    for k, t in enumerate(cfg.towers):
        np.testing.assert_array_equal(b[f"pixels_{k}"][0], preprocess.preprocess(s["image"], t))
        np.testing.assert_array_equal(b[f"tower_mask_{k}"][0], layout.grid_mask(size, t.side))


def test_memory_and_array_record_sources_agree(env):
    mem = P.make_memory_dataset(env["samples"], _data(env), env["cfg"], None, 0, 1)
    for a, b in zip(_take(mem, 2), _take(_make(env), 2)):
        _same(a, b)


def test_row_cache_gives_the_same_batches_and_computes_each_row_once(env):
    plain, cached = _make(env, num_epochs=2), _make(env, num_epochs=2, cache_rows=True)
    for a, b in zip(plain, cached):
        _same(a, b)
    cache = cached._plan.transform
    assert isinstance(cache, P.RowCache) and len(cache.rows) == cached.num_records


def test_determinism(env):
    for a, b in zip(_make(env, seed=3), _make(env, seed=3)):
        _same(a, b)
    first = [next(_make(env, seed=s))["index"].tolist() for s in (3, 4)]
    assert first[0] != first[1]


def test_resume_gives_exactly_the_next_batch(env):
    it = _make(env, num_epochs=2)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 2)
    restored = _make(env, num_epochs=2)
    next(restored)                      # a started iterator is repositioned too
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 2)):
        _same(a, b)
    with pytest.raises(ValueError, match="seed"):
        _make(env, num_epochs=2, seed=9).set_state(state)


def _rows(batches):
    return [i for b in batches for i in b["index"].tolist()]


def test_two_processes_cover_one_process(env):
    one = list(_make(env))
    parts = [list(_make(env, process_index=k, process_count=2)) for k in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(one)
    for g, b in enumerate(one):
        h0, h1 = parts[0][g], parts[1][g]
        assert h0["input_ids"].shape[0] == GB // 2
        for key in b:
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), b[key], err_msg=key)
    rows = _rows(parts[0]) + _rows(parts[1])
    assert len(rows) == len(set(rows)) == N_IMAGE + N_TEXT


def test_restore_with_another_process_count(env):
    reference = list(_make(env, num_epochs=2))
    one = _make(env, num_epochs=2)
    before = _take(one, 5)
    state = one.get_state()
    hosts = [_make(env, process_index=k, process_count=4, num_epochs=2) for k in range(4)]
    for h in hosts:
        h.set_state(state)
    after = [np.concatenate([b["index"] for b in bs]) for bs in zip(*[list(h) for h in hosts])]
    assert [b["index"].tolist() for b in before] + [a.tolist() for a in after] == \
        [b["index"].tolist() for b in reference]
    # Two epochs: every record exactly twice, in a different order each epoch.
    half = len(reference) // 2
    assert _rows(reference[:half]) != _rows(reference[half:])
    records = [i for b in reference for i in b["index"].tolist()]
    assert sorted(records) == sorted(list(range(N_IMAGE + N_TEXT)) * 2)


def test_group_by_modality(env):
    it = _make(env, group_by_modality=True, num_epochs=2)
    batches = list(it)
    kinds = [set(b["has_image"].tolist()) for b in batches]
    assert sum(k == {True} for k in kinds) == 2 * (N_IMAGE // GB) and sum(k == {False} for k in kinds) == 2
    assert len(batches) == 2 * ((N_IMAGE + N_TEXT) // GB)
    for a, b in zip(batches, _make(env, group_by_modality=True, num_epochs=2)):
        _same(a, b)
    mem = P.make_memory_dataset(env["samples"], _data(env, group_by_modality=True), env["cfg"], None, 0, 1)
    _same(next(mem), batches[0])


def test_truncation_and_errors(env):
    cfg = tiny_model_config(env["p"], max_len=40, vocab_size=len(env["tok"]))
    it = P.make_dataset(_data(env, shuffle=False), cfg, None, 0, 1)
    b = next(it)
    assert b["input_ids"].shape == (GB, 40)
    # Long questions lose their answers to truncation: counted, and those rows carry no labels.
    unsupervised = int((b["labels"] == IGNORE_INDEX).all(axis=1).sum())
    assert unsupervised > 0 and it.stats["no_supervised_tokens"] == unsupervised
    assert it.stats["truncated"] + unsupervised + it.stats["ok"] == GB
    with pytest.raises(T.ImagePositionError, match=f"token {env['p']}"):
        P.make_dataset(_data(env), tiny_model_config(env["p"] + 1), None, 0, 1)
    with pytest.raises(ValueError, match="global_batch_size"):
        P.make_dataset(_data(env, global_batch_size=6), env["cfg"], None, 0, 4)
    with pytest.raises(ValueError, match="max_len"):
        P.make_dataset(_data(env, max_len=env["p"] + 2), env["cfg"], None, 0, 1)


def test_synthetic_source(env):
    c = _data(env, source="synthetic")
    c.synthetic.num_samples = 16
    b = next(P.make_dataset(c, env["cfg"], env["tokdir"], 0, 1))
    assert b["has_image"].all() and b["input_ids"].shape == (GB, 128)


def test_uint8_pixels_normalise_on_device_to_the_same_values(env):
    f32 = next(_make(env, shuffle=False))
    u8 = next(_make(env, shuffle=False, pixel_format="uint8"))
    for k, t in enumerate(env["cfg"].towers):
        assert u8[f"pixels_{k}"].dtype == np.uint8
        img = f32["has_image"]
        np.testing.assert_allclose(np.asarray(preprocess.normalize_device(u8[f"pixels_{k}"][img], t)),
                                   f32[f"pixels_{k}"][img], atol=1e-6)
        text = np.asarray(preprocess.normalize_device(u8[f"pixels_{k}"][~img], t))
        assert np.abs(text).max() < 0.01                  # the mean colour: ≈ 0 after normalisation


def test_in_memory_bad_samples(env):
    good = env["samples"][:GB - 1]
    broken = {"id": "broken", "image": b"not an image", "conversations": good[0]["conversations"]}
    invalid = {"id": "invalid", "conversations": [{"from": "gpt", "value": "no question"}]}
    it = P.make_memory_dataset(good + [broken, invalid], _data(env, shuffle=False), env["cfg"], None, 0, 1)
    assert it.skipped == {"empty_conversations": 1}
    b = next(it)
    assert b["has_image"].tolist() == [s.get("image") is not None for s in good] + [False]
    assert (b["labels"][-1] == IGNORE_INDEX).all() and all(b[f"tower_mask_{k}"][-1].all() for k in range(4))
    assert it.stats["unreadable_image"] == 1


def test_stage_dataset_for_the_trainer(env, tmp_path):
    import ml_collections
    config = ml_collections.ConfigDict(dict(data=P.data_config(source="synthetic", template="phi3")))
    config.data.synthetic.num_samples = 24
    stage = ml_collections.ConfigDict(dict(global_batch_size=4, data=dict(synthetic=dict(tasks=("caption",)))))
    it, n = P.stage_dataset(config, stage, env["cfg"], tmp_path, 0, 1)
    assert n == 24 and it.num_batches > 10**9                      # repeats: the trainer counts the steps
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    b = next(it)
    assert b["input_ids"].shape == (4, 128)
    text = env["tok"].decode(b["labels"][0][b["labels"][0] != IGNORE_INDEX])
    assert text.endswith("background.")                              # stage 1: captions


# ------------------------------------------------------------- the configs' data switches on prepare output

def _tiny(switches):
    from cambrian_jax.config import from_dict
    from configs import cambrian_tiny
    c = cambrian_tiny.get_config(switches)
    return c, from_dict(c.model)


def test_tiny_config_trains_on_prepare_output(env, tmp_path):
    """`configs/cambrian_tiny.py:data1=…,data2=…`: the stage datasets read the prepared folders, tokenised
    with the synthetic byte-level tokenizer built under the workdir (it fits the tiny vocabulary)."""
    c, cfg = _tiny(f"data1={env['shards']},data2={env['shards']};{env['shards']},batch=4")
    assert tuple(c.stages) == (1, 2) and c.eval is None
    for n in (1, 2):
        P.check_stage_data(c, n, cfg)
    it, n = P.stage_dataset(c, c.stage2, cfg, tmp_path, 0, 1)
    assert n == 2 * len(env["samples"])                                 # two folders, ';'-separated
    from cambrian_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    assert len(tok) <= cfg.decoder.vocab_size
    b = next(it)
    assert b["input_ids"].shape == (4, cfg.max_len) and b["input_ids"].max() < cfg.decoder.vocab_size
    texts = {s["conversations"][-1]["value"] for s in env["samples"]}
    for row in range(4):
        labels = b["labels"][row]
        assert tok.decode(labels[labels != IGNORE_INDEX]).strip() in texts
    it1, _ = P.stage_dataset(c, c.stage1, cfg, tmp_path, 0, 1)
    assert next(it1)["input_ids"].shape == (4, cfg.max_len)
    assert it.stats["ok"] == 4


def test_data_switches_refuse_what_cannot_be_trained_on(env, tmp_path):
    from cambrian_jax.config import ConfigError
    from cambrian_jax.data.tokenizer import build_tokenizer
    from configs import cambrian_8b

    c, cfg = _tiny(f"data2={tmp_path}/nope,one_stage")
    with pytest.raises(ConfigError, match=rf"stage2\.data\.paths: {tmp_path}/nope does not exist; .*prepare "
                                          r"\(the config switch data2=…\)"):
        P.check_stage_data(c, 2, cfg)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("{}\n")
    c, cfg = _tiny(f"data2={jsonl},one_stage")
    with pytest.raises(ConfigError, match=r"stage2\.data\.paths: .*mine\.jsonl is a JSON file, not prepared data"):
        P.check_stage_data(c, 2, cfg)
    # An interrupted prepare run.
    import shutil
    half = tmp_path / "half"
    shutil.copytree(env["shards"], half)
    next(half.glob("*.done.json")).unlink()
    c, cfg = _tiny(f"data2={half},one_stage")
    with pytest.raises(ConfigError, match=r"holds 1 of the 2 shards .* re-run python -m cambrian_jax\.data\.prepare"):
        P.check_stage_data(c, 2, cfg)
    # tokenizer=: missing, or more tokens than the tiny vocabulary.
    c, cfg = _tiny(f"data2={env['shards']},one_stage,tokenizer={tmp_path}/no_tok")
    with pytest.raises(ConfigError, match=r"data\.tokenizer_dir: .*no_tok does not exist.*tokenizer=DIR"):
        P.check_stage_data(c, 2, cfg)
    big = build_tokenizer(str(tmp_path / "big"), [" ".join(f"word{i}" for i in range(800))], "phi3")
    assert len(big) > 576
    c, cfg = _tiny(f"data2={env['shards']},one_stage,tokenizer={tmp_path}/big")
    with pytest.raises(ConfigError, match=rf"has {len(big)} tokens, more than model\.decoder\.vocab_size = 576; "
                                          r".*leave tokenizer= out"):
        P.check_stage_data(c, 2, cfg)
    c, cfg = _tiny(f"data2={env['shards']},one_stage,tokenizer={env['tokdir']}")
    P.check_stage_data(c, 2, cfg)                                  # the synthetic tokenizer, given explicitly
    # The released configs' data1/data2 and tokenizer switches, the same way.
    from cambrian_jax.config import from_dict
    c = cambrian_8b.get_config(f"data1={tmp_path}/align,data2={env['shards']}")
    cfg8 = from_dict(c.model)
    with pytest.raises(ConfigError, match=rf"stage1\.data\.paths: {tmp_path}/align does not exist.*data1="):
        P.check_stage_data(c, 1, cfg8)
    with pytest.raises(ConfigError, match=r"data\.tokenizer_dir: no tokenizer given.*tokenizer=DIR"):
        P.check_stage_data(c, 2, cfg8)
    llama = S.build_tiny_tokenizer(str(tmp_path / "llama"), "llama_3")
    c = cambrian_8b.get_config(f"data2={env['shards']},tokenizer={tmp_path}/llama")
    found = T.image_position("llama_3", llama)
    with pytest.raises(ConfigError, match=rf"model\.image_position: .* token {found}, but model\.image_position is "
                                          rf"91; set --config\.model\.image_position={found}"):
        P.check_stage_data(c, 2, cfg8)
    c.model.image_position = found
    P.check_stage_data(c, 2, from_dict(c.model))


# ------------------------------------------------------------- group_by_modality against the reference's grouping

def _reference_grouped(signed_lengths, megabatch, perm):
    """Cambrian's get_modality_length_grouped_indices (cambrian/train/cambrian_trainer.py, from LLaVA):
    lengths > 0 image samples, < 0 text; megabatch = world_size · batch_size (one global batch); its
    torch.randperm calls are `perm(n)`. With the rows of a megabatch on one device,
    split_to_even_chunks(megabatch, lengths, 1) is the megabatch itself."""
    def length_grouped(idx, lens):           # get_length_grouped_indices
        order = perm(len(idx))
        chunks = [order[i:i + megabatch] for i in range(0, len(idx), megabatch)]
        return [idx[i] for c in chunks for i in sorted(c, key=lambda i: lens[i], reverse=True)]

    mm = [i for i, x in enumerate(signed_lengths) if x > 0]
    lang = [i for i, x in enumerate(signed_lengths) if x < 0]
    mm_s = length_grouped(mm, [signed_lengths[i] for i in mm])
    lang_s = length_grouped(lang, [-signed_lengths[i] for i in lang])
    mm_mb = [mm_s[i:i + megabatch] for i in range(0, len(mm_s), megabatch)]
    lang_mb = [lang_s[i:i + megabatch] for i in range(0, len(lang_s), megabatch)]
    additional = mm_mb[-1] + lang_mb[-1]
    mbs = mm_mb[:-1] + lang_mb[:-1]
    mbs = [mbs[i] for i in perm(len(mbs))]
    if additional:
        mbs.append(sorted(additional))
    return [i for m in mbs for i in m]


def _hand_built(n=53, seed=2):
    """Modality and word lengths of n records, lengths with ties; neither modality fills whole global
    batches, and their leftovers (6 + 7) fill one more."""
    rng = np.random.default_rng(seed)
    modality = rng.random(n) < 0.6
    lengths = rng.integers(1, 12, n)
    assert (modality.sum() % GB, (~modality).sum() % GB) == (6, 7)
    return modality, lengths


def test_grouped_order_is_the_references_without_shuffling():
    modality, lengths = _hand_built()
    order = P.GlobalOrder(len(modality), GB, shuffle=False, modality=modality, lengths=lengths)
    ours = [order(i) for i in range(order.epoch_len)]
    signed = [int(x) if m else -int(x) for m, x in zip(modality, lengths)]
    ref = _reference_grouped(signed, GB, lambda n: list(range(n)))
    full = (modality.sum() // GB + (~modality).sum() // GB) * GB
    assert len(ours) == order.epoch_len == len(modality) // GB * GB > full
    assert ours[:full] == ref[:full]                   # every full megabatch, row for row
    # The tail: the two modalities' leftovers, mixed. The reference appends all of them, sorted by
    # index; here only the one global batch they fill, in their megabatch order (an epoch ends on a
    # batch boundary, the last 5 are left out of it).
    assert set(ours[full:]) < set(ref[full:]) and len(ours[full:]) == GB


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_order_has_the_references_properties(seed):
    """Shuffled: each epoch a partition of its records into megabatches of one modality, each sorted by
    length, longest first, in random order; different every epoch."""
    modality, lengths = _hand_built()
    order = P.GlobalOrder(len(modality), GB, seed=seed, modality=modality, lengths=lengths, num_epochs=3)
    n_img, n_txt = int(modality.sum()), int((~modality).sum())
    full = n_img // GB + n_txt // GB
    epochs = []
    for e in range(3):
        rows = np.array([order(e * order.epoch_len + i) for i in range(order.epoch_len)])
        assert len(set(rows.tolist())) == len(rows)                       # no record twice in an epoch
        mbs = rows.reshape(-1, GB)
        kinds = []
        for mb in mbs[:full]:
            assert len(set(modality[mb].tolist())) == 1                   # one modality
            assert (np.diff(lengths[mb]) <= 0).all(), lengths[mb]         # sorted, longest first
            kinds.append(bool(modality[mb[0]]))
        assert kinds.count(True) == n_img // GB and kinds.count(False) == n_txt // GB
        epochs.append((rows.tolist(), kinds))
    assert len({tuple(r) for r, _ in epochs}) == 3                        # reshuffled every epoch
    # The megabatches' order is random too, as the reference's torch.randperm over them: not all image
    # megabatches first.
    assert any(k != sorted(k, reverse=True) for _, k in epochs)


def test_grouped_batches_are_sorted_by_word_length(env):
    """Through the pipeline: each batch's rows (by their record index) in the order of prepare's lengths."""
    from cambrian_jax.data import records

    lengths = np.array([records.word_length(s["conversations"]) for s in env["samples"]])
    for b in _make(env, group_by_modality=True, num_epochs=2):
        assert (np.diff(lengths[b["index"]]) <= 0).all(), lengths[b["index"]]
        assert len(set(b["has_image"].tolist())) == 1


def test_restore_with_another_worker_count(env):
    """The iterator state is one row number: restored from 0 grain workers into 2, and from those 2
    (which prefetch ahead of what they have handed out) back into 0, the batches are those of one
    uninterrupted in-process run. One start of the worker processes (~13 s on 2 busy cores)."""
    reference = list(_make(env, num_epochs=2))
    inline = _make(env, num_epochs=2)
    got = _take(inline, 3)
    workers = _make(env, num_epochs=2, worker_count=2)
    workers.set_state(json.loads(json.dumps(inline.get_state())))
    got += _take(workers, 3)
    state = json.loads(json.dumps(workers.get_state()))
    workers.close()
    again = _make(env, num_epochs=2)
    again.set_state(state)
    got += list(again)
    assert len(got) == len(reference) == 12
    for a, b in zip(got, reference):
        _same(a, b)
