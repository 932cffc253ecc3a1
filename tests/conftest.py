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
