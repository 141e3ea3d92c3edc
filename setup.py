"""ddm_hpc: training-data attribution with Distilled Datamodels (Ye et al., CVPR 2024)."""
from setuptools import find_packages, setup

setup(
    name="ddm_hpc",
    version="0.1.0",
    description="HPC batch toolkit for training-data attribution with Distilled Datamodels",
    packages=find_packages(include=["ddm_hpc", "ddm_hpc.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "triton",
        "numpy",
        "h5py",
        "faiss-cpu",
        "submitit",
        "tqdm",
        "PyYAML",
        "matplotlib",
        "traker",
    ],
    extras_require={"test": ["pytest"], "bench": ["scikit-learn"]},
    entry_points={"console_scripts": ["ddm-hpc=ddm_hpc.cli:main"]},
)
