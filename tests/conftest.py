"""Test settings: float32 everywhere, CPU only, exact matmuls."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Random init compiles ~4x faster with rbg keys than with threefry on CPU; tests never depend on
# the particular random numbers, only on both sides of a comparison using the same weights.
jax.config.update("jax_default_prng_impl", "unsafe_rbg")

import cambrian_jax  # noqa: E402,F401  (sets the flax flags the package needs)
