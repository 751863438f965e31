"""MatTA training: `MatTAModel` co-trains the Student and the TA of a nested network (Algorithm 1).

The loss terms (eqs. 1-3) are pure functions in `matta_tf.training.losses`, the distillation
curriculum (section 3.1.1) is `DistillationSchedule`, a `TrainingStrategy` (`FixedMatTA`, the
default, or `Sandwich`, which also trains sampled Mix'n'Match specs) says what a step trains, and
`MidEpochBackupAndRestore` resumes a killed run mid-epoch with the same result as an uninterrupted
one.
"""

from matta_tf.training.backup import MidEpochBackupAndRestore
from matta_tf.training.matta_model import MODES, MatTAModel
from matta_tf.training.metrics import AUCLoss, LatestValue
from matta_tf.training.networks import IndependentStudentTA
from matta_tf.training.plateau import PlateauStopping
from matta_tf.training.schedules import DistillationSchedule
from matta_tf.training.strategies import FixedMatTA, InPlaceSubmodel, Sandwich, TrainingStrategy

__all__ = [
    "AUCLoss",
    "DistillationSchedule",
    "FixedMatTA",
    "InPlaceSubmodel",
    "IndependentStudentTA",
    "LatestValue",
    "MODES",
    "MatTAModel",
    "MidEpochBackupAndRestore",
    "PlateauStopping",
    "Sandwich",
    "TrainingStrategy",
]
