"""Test settings: float32 everywhere, CPU only, exact matmuls."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import cambrian_jax  # noqa: E402,F401  (sets the flax flags the package needs)
