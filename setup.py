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
        # FAISS comes from an extra: faiss-cpu and faiss-gpu both install the module `faiss`, so a
        # default faiss-cpu could not be swapped for faiss-gpu by `.[gpu]` (pip would unpack both)
        "submitit",
        "tqdm",
        "PyYAML",
        "matplotlib",
        "traker",
    ],
    extras_require={
        "test": ["pytest"],
        "bench": ["scikit-learn"],
        "cpu": ["faiss-cpu"],  # every CPU machine, CI: pip install -c constraints.txt -e .[cpu]
        # a CUDA node: k-means on the GPU (cluster.faiss_has_gpu); the wheel brings its CUDA 12 runtime and
        # cuBLAS (nvidia-*-cu12), beside torch's CUDA 13 ones; needs an NVIDIA driver >= 525
        "gpu": ["faiss-gpu"],
    },
    entry_points={"console_scripts": ["ddm-hpc=ddm_hpc.cli:main"]},
)
