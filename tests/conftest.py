"""Test settings: float32 everywhere, CPU only, exact matmuls."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Random init compiles ~4x faster with rbg keys than with threefry on CPU; tests never depend on
# the particular random numbers, only on both sides of a comparison using the same weights.
jax.config.update("jax_default_prng_impl", "unsafe_rbg")

import cambrian_jax  # noqa: E402,F401  (sets the flax flags the package needs)

import pytest  # noqa: E402


@pytest.fixture
def cli_error(capsys):
    """`code, line = cli_error(main, argv)`: run an argparse entry point that must fail on bad input,
    and check what a person sees: one line on stderr, no traceback. Returns the exit code and the line."""

    def call(main, argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
        return info.value.code, lines[0]

    return call


# The trainer's smallest real run, shared by every test that needs a finished workdir: the micro
# config (one tower, trained in stage 2), 2 + 2 steps, through the command line (~1 min).
MICRO_RUN = "configs/cambrian_tiny.py:micro,steps1=2,steps2=2,batch=8,unfreeze_towers=2"


@pytest.fixture(scope="session")
def micro_workdir(tmp_path_factory):
    """(workdir, config spec) of a finished MICRO_RUN; tests must not write into it."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    wd = tmp_path_factory.mktemp("micro_run") / "run"
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "cambrian_jax.train", "--config", MICRO_RUN, "--workdir", str(wd)],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    return wd, MICRO_RUN
