"""The training curriculum of MatTA (section 3.1.1): the weight of L_D ramps up from 0."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from matta_tf._checks import check_choice, check_non_negative_int

CURVES = ("linear", "cosine")


@keras.saving.register_keras_serializable(package="matta_tf")
class DistillationSchedule:
    """The factor in `[0, 1]` that multiplies the distillation weight `w_D` at a training step.

    Both models are poor at the start of training, so L_D is left out for the first steps and then
    brought in gradually. With `t` the optimizer step (updates applied so far), `a = start_step`,
    `r = ramp_steps` and the progress `u = clip((t - a) / r, 0, 1)`:

    `factor(t) = 0` for `t < a`, then `u` (`"linear"`) or `(1 - cos(pi u)) / 2` (`"cosine"`), and 1
    from `t >= a + r` on. With `r = 0` the factor steps from 0 to 1 at `t = a`; the default
    (`a = r = 0`) is the constant 1 (no curriculum).

    The schedule is plain configuration: its state is the step it is called with, which
    `MatTAModel` reads from its optimizer's iteration counter, so it resumes with the optimizer and
    needs no Python-side state.

    Args:
        start_step: int. Steps with `w_D = 0` before the ramp begins. Defaults to 0.
        ramp_steps: int. Steps over which the factor rises from 0 to 1. Defaults to 0.
        curve: `"linear"` (default) or `"cosine"`.

    Example:

    ```python
    from matta_tf.training import MatTAModel

    schedule = DistillationSchedule(start_step=1000, ramp_steps=4000, curve="cosine")
    assert abs(float(schedule(3000)) - 0.5) < 1e-6
    student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    network = matta_tf.mnestify(student)      # (student_logit, ta_logit)
    model = MatTAModel(network, distillation_schedule=schedule)
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), section 3.1.1.
    """

    def __init__(self, start_step: int = 0, ramp_steps: int = 0, curve: str = "linear") -> None:
        check_non_negative_int("start_step", start_step)
        check_non_negative_int("ramp_steps", ramp_steps)
        check_choice("curve", curve, CURVES)
        self.start_step = start_step
        self.ramp_steps = ramp_steps
        self.curve = curve

    def __call__(self, step: Any) -> Any:
        """The factor at `step` (an int or an integer tensor), as a float32 scalar tensor."""
        step = ops.cast(step, "float32")
        started = ops.cast(ops.greater_equal(step, float(self.start_step)), "float32")
        if self.ramp_steps == 0:
            return started
        progress = ops.clip((step - float(self.start_step)) / float(self.ramp_steps), 0.0, 1.0)
        if self.curve == "cosine":
            progress = 0.5 * (1.0 - ops.cos(math.pi * progress))
        return started * progress

    def get_config(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "ramp_steps": self.ramp_steps, "curve": self.curve}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DistillationSchedule:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DistillationSchedule) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(self.get_config().items()))

    def __repr__(self) -> str:
        return (
            f"DistillationSchedule(start_step={self.start_step}, ramp_steps={self.ramp_steps}, "
            f"curve={self.curve!r})"
        )
