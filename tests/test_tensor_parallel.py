"""Tensor parallelism, trained: a run on data=1 × fsdp=2 × tensor=2 equals the one-device run.

The model is the trainer tests' micro model (configs/cambrian_tiny.py:micro: a one-layer SVA, one
in-LLM aggregator, a 2-layer decoder) with the three tower kinds that tensor sharding supports,
siglip + clip + dino, all trained in stage 2 (`unfreeze_towers=2`): their MLPs are split over
`tensor` (`tower_mlp`), as are the decoder's heads and MLP and the vocabulary, so every
row-parallel sum and its gradient is exercised. ConvNeXt is refused with tensor > 1
(sharding.check_trained_towers; tests/test_train_config.py checks the refusal on a real mesh).

Every run is its own process (`python tests/test_tensor_parallel.py SPEC`, see `harness`): the CPU
device count is fixed when JAX starts. Stage 1 (3 steps) then stage 2 (3 steps), batch 8.

  reference   1 device
  tensor      4 devices, data=1 × fsdp=2 × tensor=2, the configs' rules (configs/common.py)
  sequence    (slow) the same mesh with sequence parallelism: ("activation_length", "tensor") ahead
              of ("activation_length", None) (docs/guide.md, "Activation sharding")

Both runs start from the same initial parameters (the reference writes them, the others read them):
the comparison is of training, not of random initialisation on another mesh.

Tolerances: the sharded run adds the same float32 numbers in another order (partial sums over the
tensor and fsdp shards, then an all-reduce), so losses and gradient norms agree to rel 1e-5
(measured ≤ 4e-7) and parameters to rel 1e-5 + abs 1e-6 (Adam divides by √v: a parameter moves by
≈ lr·sign(g) whatever |g| is, so the absolute floor covers the ulp-level differences of parameters
near zero; measured ≤ 0.12 of the tolerance).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SWITCHES = "micro,steps1=3,steps2=3,batch=8,unfreeze_towers=2"
TOWERS = "siglip+clip+dino"
TENSOR_MESH = {"data": 1, "fsdp": 2, "tensor": 2}
# Cheap CPU code generation: tests/test_train.py's two flags, and XLA's older loop emitters in one
# codegen module, which on 2 cores compile this model's stage-2 step in about a third of the time.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
LOSS_RTOL = 1e-5
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6


def sequence_parallel(rules) -> list[tuple]:
    """The rules with every token axis split over `tensor` (the heads then stay whole)."""
    out = []
    for name, axes in rules:
        if name == "activation_length":
            out.append((name, "tensor"))
        out.append((name, axes))
    return out


# ------------------------------------------------------------------------------------------ harness

def harness(spec: dict) -> None:
    """One training process. spec: workdir, mesh, cache, sequence (bool: sequence-parallel rules),
    init_to / init_from (an .npz of the initial parameters: written by the reference, read by the
    others, so that every run starts from the same numbers and compiles no random initialisation)."""
    import jax

    from cambrian_jax import optim, sharding
    from cambrian_jax import trainer as T
    from configs import cambrian_tiny

    config = cambrian_tiny.get_config(SWITCHES)
    cambrian_tiny.tower_set(config.model, TOWERS)     # the micro config's one tower → three kinds
    config.model.tower_overrides = {n: dict(o, hidden_size=16, intermediate_size=32)   # ViTs at micro width
                                    if "hidden_size" in o else o for n, o in config.model.tower_overrides.items()}
    config.log_every = 1
    config.mesh.update(spec["mesh"])
    config.compilation_cache_dir = spec["cache"]
    if spec.get("sequence"):
        config.sharding_rules = sequence_parallel(config.sharding_rules)

    def flat(state):
        return {optim.path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_leaves_with_path(state)}

    tr = T.Trainer(config, spec["workdir"])
    try:
        if spec.get("init_to"):
            params = tr.init_params()
            np.savez(spec["init_to"], **flat(params))     # a copy: stage 1 donates these buffers
        else:
            with np.load(spec["init_from"]) as z:
                params = jax.tree_util.tree_map_with_path(lambda p, a: z[optim.path_str(p)], tr.abstract_params)
            params = jax.device_put(params, tr.param_shardings)
        tr.init_params = lambda: params
        assert tr.run()
        arrays = {f"stage{n}/{k}": v for n in tr.stages for k, v in flat(tr._final_params(n)).items()}
        specs = {optim.path_str(p): str(x.sharding.spec)
                 for p, x in jax.tree_util.tree_leaves_with_path(tr.last_state["params"])}
        trainable = tr.plans[2].trainable_paths
        # Where the decoder's residual stream (batch 8 × max_len tokens × width) goes on this mesh.
        residual = str(sharding.logical_spec(("activation_batch", "activation_length", "activation_embed"),
                                             (8, config.model.max_len, config.model.decoder.hidden_size),
                                             tr.rules, tr.mesh))
    finally:
        tr.close()
    out = Path(spec["workdir"])
    np.savez(out / "harness.npz", **arrays)
    (out / "harness.json").write_text(json.dumps(dict(mesh=dict(tr.mesh.shape), specs=specs,
                                                      trainable=trainable, residual=residual)))


def run(spec: dict, devices: int) -> dict:
    """The harness in a fresh process with `devices` CPU devices: its record, metrics and parameters."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    p = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    out = Path(spec["workdir"])
    result = json.loads((out / "harness.json").read_text())
    with np.load(out / "harness.npz") as z:
        result["params"] = {k: z[k] for k in z.files}
    result["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    w = tmp_path_factory.mktemp("one_device")
    r = run(dict(workdir=str(w), mesh={"fsdp": -1}, cache=cache, init_to=str(w / "init.npz")), devices=1)
    return dict(r, init=str(w / "init.npz"))


@pytest.fixture(scope="module")
def tensor(tmp_path_factory, cache, reference):
    w = tmp_path_factory.mktemp("tensor")
    return run(dict(workdir=str(w), mesh=TENSOR_MESH, cache=cache, init_from=reference["init"]), devices=4)


# ------------------------------------------------------------------------------------------ checks

def check_equal(got: dict, ref: dict) -> None:
    """Per-step losses and gradient norms, and both stages' final parameters, of `got` equal `ref`'s.

    The gradient norm checks the whole gradient's size directly; the parameters check each gradient
    through Adam (whose update m̂/√v̂ is insensitive to a gradient's overall scale, hence both).
    Bypassing the ConvNeXt refusal, XLA's depthwise-convolution bug fails the parameter check:
    stage2/towers/3/…/dwconv/kernel is 63× the tolerance off (jax 0.10.2)."""
    steps = lambda r: {(m["stage"], m["step"]): (m["loss"], m["grad_norm"]) for m in r["metrics"]}   # noqa: E731
    want, have = steps(ref), steps(got)
    assert sorted(want) == [(s, k) for s in (1, 2) for k in (1, 2, 3)]
    assert sorted(have) == sorted(want)
    worst = max((float(np.max(np.abs(got["params"][k] - v) / (PARAM_ATOL + PARAM_RTOL * np.abs(v)))), k)
                for k, v in ref["params"].items() if k in got["params"])
    print(f"largest parameter difference: {worst[0]:.3g} of the tolerance, in {worst[1]}; per step, relative "
          f"differences of loss and grad norm:",
          {k: tuple(f"{abs(h - w) / abs(w):.1e}" for h, w in zip(have[k], want[k])) for k in sorted(want)})
    for k in want:
        assert have[k][0] == pytest.approx(want[k][0], rel=LOSS_RTOL), ("loss", k)
        assert have[k][1] == pytest.approx(want[k][1], rel=LOSS_RTOL), ("grad_norm", k)
    assert set(got["params"]) == set(ref["params"])
    for k, v in ref["params"].items():
        np.testing.assert_allclose(got["params"][k], v, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=k)


def check_trained_and_split(run_: dict, ref: dict) -> None:
    """The comparison means something: the towers, the aggregators and the decoder trained in stage 2,
    and on the tensor mesh their weights were split over `tensor`."""
    p = ref["params"]
    moved = lambda prefix: [k for k in p if k.startswith(f"stage2/{prefix}")   # noqa: E731
                            and not np.array_equal(p[k], p["stage1/" + k[len("stage2/"):]])]
    towers = [f"towers/{i}/" for i in range(len(TOWERS.split("+")))]
    for prefix in towers + ["connector/vision_sampler_layers/", "connector/vision_sampler_0/", "decoder/layers/"]:
        assert moved(prefix), prefix
    assert {t.split("/")[1] for t in run_["trainable"] if t.startswith("towers/")} == {t[7:-1] for t in towers}
    split = {k for k, s in run_["specs"].items() if "'tensor'" in s}
    for prefix in towers + ["decoder/layers/", "decoder/lm_head"]:
        assert any(k.startswith(prefix) for k in split), (prefix, sorted(split)[:20])


def test_tensor_parallel_training_equals_one_device(reference, tensor):
    assert reference["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert tensor["mesh"] == TENSOR_MESH
    assert tensor["residual"] == "P(('data', 'fsdp'), None, None)"     # Megatron: whole per shard
    check_trained_and_split(tensor, reference)
    check_equal(tensor, reference)


@pytest.mark.slow
def test_sequence_parallel_training_equals_one_device(tmp_path, cache, reference):
    got = run(dict(workdir=str(tmp_path), mesh=TENSOR_MESH, cache=cache, sequence=True,
                   init_from=reference["init"]), devices=4)
    assert got["residual"] == "P(('data', 'fsdp'), 'tensor', None)"    # tokens split over tensor
    check_trained_and_split(got, reference)
    check_equal(got, reference)


if __name__ == "__main__":
    harness(json.loads(sys.argv[1]))
