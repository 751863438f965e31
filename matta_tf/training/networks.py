"""Pair-output networks for `MatTAModel` without parameter sharing (the ablation of Table 4)."""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="matta_tf")
class IndependentStudentTA(keras.Model):
    """A Student and a TA with independent weights, called as one `(student_logits, ta_logits)` network.

    `MatTAModel` trains whatever pair-output network it wraps. An M-nested network shares the
    Student's parameters with the TA (`Theta ⊂ Phi`); this one combines two separate networks,
    `Theta ∩ Phi = ∅`, the "no parameter sharing" ablation of the paper (better single Student, no
    Mix'n'Match). Both read the same inputs:

    `call(x) = (student(x), ta(x))`.

    Args:
        student: Keras layer or model mapping the inputs to Student logits, `(batch, 1)` for a binary
            task or `(batch, C)`.
        ta: Keras layer or model mapping the same inputs to TA logits of the same shape.
        **kwargs: Args passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    from matta_tf.training import MatTAModel

    student = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    ta = keras.Sequential([keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model = MatTAModel(IndependentStudentTA(student, ta))
    student_logit, ta_logit = model.network(np.random.rand(4, 8))   # (4, 1) each, no shared weights
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), Table 4.
    """

    def __init__(self, student: keras.layers.Layer, ta: keras.layers.Layer, **kwargs: Any) -> None:
        for name, value in (("student", student), ("ta", ta)):
            if not isinstance(value, keras.layers.Layer):
                raise ValueError(f"`{name}` must be a Keras layer or model. Received: {name}={value!r}")
        if student is ta:
            raise ValueError("`student` and `ta` must be two different networks; one network would share every weight")
        super().__init__(**kwargs)
        self.student = student
        self.ta = ta
        # No variables of its own: built when both networks are (e.g. functional or with an Input).
        self.built = student.built and ta.built

    def call(self, inputs: Any, training: bool | None = None) -> tuple[Any, Any]:
        return self.student(inputs, training=training), self.ta(inputs, training=training)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            student=keras.saving.serialize_keras_object(self.student),
            ta=keras.saving.serialize_keras_object(self.ta),
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> IndependentStudentTA:
        config = dict(config)
        student = keras.saving.deserialize_keras_object(config.pop("student"))
        ta = keras.saving.deserialize_keras_object(config.pop("ta"))
        return cls(student, ta, **config)
