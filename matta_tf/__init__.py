"""matta-tf: MatTA (Matryoshka Teaching Assistant) for TensorFlow and Keras 3.

One production (Student) ranking model is M-nested into a larger Teaching Assistant (TA), both are
co-trained with distillation, and Mix'n'Match extracts many servable Student models from one run.
"""

from matta_tf import data, extraction, layers, optimizers, training
from matta_tf.extraction import SubmodelSpec, extract_submodel
from matta_tf.mnestify import mnestify
from matta_tf.optimizers import Shampoo
from matta_tf.training import DistillationSchedule, IndependentStudentTA, MatTAModel, MidEpochBackupAndRestore

__version__ = "0.1.0"

__all__ = [
    "DistillationSchedule",
    "IndependentStudentTA",
    "MatTAModel",
    "MidEpochBackupAndRestore",
    "Shampoo",
    "SubmodelSpec",
    "data",
    "extract_submodel",
    "extraction",
    "layers",
    "mnestify",
    "optimizers",
    "training",
]
