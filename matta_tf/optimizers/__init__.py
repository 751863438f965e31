"""Optimizers for matta-tf: `Shampoo`, a Kronecker-factored preconditioner for Keras 3."""

from matta_tf.optimizers.callbacks import ShampooFaultCounters
from matta_tf.optimizers.shampoo import Shampoo

__all__ = ["Shampoo", "ShampooFaultCounters"]
