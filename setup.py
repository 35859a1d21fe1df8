from setuptools import find_packages, setup

setup(
    name="alit_fast",
    version="0.1.0",
    description="Fast, faithful ALIT (adaptive-length image tokenization) with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["alit_fast", "alit_fast.*"]) + ["alit_fast.kernels"],
    package_dir={"alit_fast.kernels": "kernels"},
    package_data={"alit_fast": ["io/pretrained_models/*.safetensors"]},
    install_requires=[
        # the CPU wheel is pinned by .ci/run; a bare requirement here lets users keep their CUDA build
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "safetensors",
        "tqdm",
        "pillow",
    ],
    extras_require={
        # pytest-benchmark: the benchmarks/ cases' fixture (CI runs them once with --benchmark-disable)
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "scipy", "huggingface_hub>=0.23"],
        "demo": ["scikit-image"],
        "hub": ["huggingface_hub>=0.23"],
    },
    entry_points={"console_scripts": ["alit-fast=alit_fast.cli:main"]},
)
