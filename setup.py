"""fedsp: federated self-play fine-tuning of LLMs in JAX/Flax NNX."""

import pathlib

from setuptools import find_packages, setup

# jax and flax move together: flax 0.12 needs jax >= 0.7; jax 0.10.x is the newest that
# installs on Python 3.11. Upper bounds are the next minor release that has not been
# tested here.
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.12",
    "jaxlib>=0.10.0,<0.12",
    "flax>=0.12.0,<0.14",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.8,<0.14",
    "etils[epath]>=1.7",
    "ml-collections>=1.0,<2",
    "numpy>=1.26",
    "transformers>=5.0,<6",
    "tokenizers>=0.21,<1",
    "safetensors>=0.5,<1",
    "gguf>=0.17,<1",
    "drjax>=0.2.1,<0.3",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "absl-py>=2.1",
]

EXTRAS_REQUIRE = {
    "dev": [
        # make lint (run by make test): ruff check + format, mypy on fedsp/
        "ruff>=0.17.6,<0.18",
        "mypy>=2.4,<2.5",
        "pytest>=8",
        "pytest-xdist>=3.6",
        "hypothesis>=6.100",
        # Test-only: chex.variants runs the core golden-value tests with and without jit,
        # chex.assert_* compare trees. The library validates its inputs in
        # fedsp.core.checks (ValueErrors naming the argument) and never imports chex.
        "chex>=0.1.90,<0.2",
        "nbmake>=1.5",
        # tests/test_notebooks.py executes notebooks/ in a kernel of the venv's python
        "nbclient>=0.10",
        "nbformat>=5.9",
        "ipykernel>=6.29",
        # torch (CPU) is only the test oracle for model parity; 2.13 ships a CPU wheel
        # for Python 3.11 on the machines this project is developed on.
        "torch>=2.4,<2.14",
        # transformers refuses to load a GGUF model without accelerate; the real-weight
        # parity tests load SmolLM2's GGUF in torch as the oracle.
        "accelerate>=1.0",
        # the torch side of the side-by-side benchmarks (torch + peft LoRA step)
        "peft>=0.17,<1",
    ],
    "data": ["datasets>=3.0"],
    # The capacity planner's TPU targets (fedsp.plan): jax[tpu] brings the libtpu of the
    # installed jax (0.10.2: libtpu 0.0.42.*, ~680 MB), which compiles for TPU topologies
    # without TPU hardware. make test installs it: tests/plan compile for a v5e-8.
    "plan": ["jax[tpu]>=0.10.0,<0.12"],
    # Real federations (fedsp.flower): Flower's Message API (ClientApp/ServerApp,
    # ArrayRecord) and its SuperLink/SuperNode; make test installs it for the localhost
    # deployment tests.
    "flower": ["flwr>=1.42,<2"],
    # ε accounting of DP-FedAvg (fedsp.core.privacy.epsilon): Google's dp_accounting.
    "dp": ["dp-accounting>=0.6,<0.7"],
}

setup(
    name="fedsp",
    version="0.1.0",
    description="Federated self-play fine-tuning of LLMs (SPEAR, TPAW, advantage-weighted FL) in JAX/Flax NNX",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # Only the library: experiments/, benchmarks/ and tests/ run from a checkout
    # (``python -m experiments.run`` from its root), so no generic top-level package
    # named "experiments" lands in site-packages.
    packages=find_packages(include=["fedsp", "fedsp.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
