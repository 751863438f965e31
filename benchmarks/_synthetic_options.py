"""The synthetic events' SyntheticConfig fields that `ablation.py` sets, with its option for each.

Shared by `ablation.py` (which refuses events that differ from its options) and `loss_sweep.py` (which
passes a reference run's events on to it); kept apart so that the sweep does not load TensorFlow.
"""

SYNTHETIC_OPTIONS = {"num_users": "--users", "num_items": "--items", "num_events": "--events",
                     "latent_dim": "--latent-dim", "nonlinear_units": "--nonlinear-units",
                     "interaction_scale": "--interaction-scale"}
