"""Test-session set-up shared by every test module.

TensorFlow's devices can only be configured before first use, so the two logical CPU devices that the
`MirroredStrategy` tests need are created here, at import time, for the whole session.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory):
    """matta-tf from its wheel in a clean virtual environment (`tests/installed_package.py`)."""
    from installed_package import build_wheel, clean_environment

    workdir = tmp_path_factory.mktemp("installed")
    return clean_environment(build_wheel(workdir), workdir)
