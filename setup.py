"""cambrian_jax: Cambrian-1 in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="cambrian_jax",
    version="0.1.0",
    description="Cambrian-1 (vision towers, Spatial Vision Aggregator, Llama-family decoder) in JAX/Flax NNX",
    packages=find_packages(include=["cambrian_jax", "cambrian_jax.*", "configs"]),  # configs: importable from anywhere
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "array-record==0.8.6",
        "ml-collections==1.1.0",
        "einops==0.8.2",
        "numpy==2.4.6",
        "safetensors==0.8.0",
        "pillow==13.0.0",
        "tensorboardX==2.6.5",
        "tqdm==4.70.1",
        "tokenizers==0.23.3",
        "absl-py==2.5.1",
        "pyarrow==26.0.1",
        "msgpack==1.2.4",
    ],
    extras_require={
        # torch 2.13.0 resolves to the local CPU wheel; an unpinned torch pulls CUDA packages.
        "test": ["pytest==9.2.0", "torch==2.13.0", "transformers==5.23.0"],
        # The TPU runtime, and on a machine without TPUs the TPU compiler the planner uses
        # (cambrian_jax/plan.py --compiler tpu): the libtpu that jax 0.10.2 names.
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
    },
)
