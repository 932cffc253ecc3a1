"""cambrian_jax: Cambrian-1 in JAX/Flax NNX."""
import flax

# Parameters carry logical axis names as metadata only; the trainer places them on the mesh with
# explicit shardings (jax.jit out_shardings), so variables are never sharded eagerly at creation.
flax.config.update("flax_always_shard_variable", False)
