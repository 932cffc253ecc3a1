"""cambrian_jax: Cambrian-1 in JAX/Flax NNX."""
import flax

# Parameters carry logical axis names as metadata only; the trainer places them on the mesh with
# explicit shardings (jax.jit out_shardings), so variables are never sharded eagerly at creation.
flax.config.update("flax_always_shard_variable", False)


def __getattr__(name):
    """Lazy top-level API: `cambrian_jax.load_pretrained` imports the model stack on first use."""
    if name == "load_pretrained":
        from cambrian_jax.pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'cambrian_jax' has no attribute {name!r}")
