"""The M-nested DCN-v2 cross layer (keras-rs `FeatureCross`, with a nested projection)."""

from __future__ import annotations

from typing import Any

import keras
import keras_rs
from keras import ops

from matta_tf.layers import _nesting
from matta_tf.layers.nested_dense import NestedDense


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedFeatureCross(keras.layers.Layer):
    """A cross layer whose Student weights are the leading block of the TA's.

    Per stream, as `keras_rs.layers.FeatureCross` (DCN-v2, full-rank):

    `y = x0 * (W x + b) + x`

    with one nested kernel: the Student uses `W[:d_S, :d_S]` and `b[:d_S]` over its width `d_S`, the TA
    the full `W` (`d_TA x d_TA`). `x0` and `x` are stream pairs of equal widths.

    Args:
        kernel_initializer: Initializer of `W`. Defaults to `"glorot_uniform"`.
        bias_initializer: Initializer of `b`. Defaults to `"zeros"`.
        student_init: `"standalone"` (default) or `"ta_slice"`, as in `NestedDense`.
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        x0: pair `(x0_student, x0_ta)`, the cross layer's base input.
        x: optional pair `(x_student, x_ta)`; defaults to `x0`.

    Returns:
        A pair `(y_student, y_ta)` with the shapes of `x0`.

    Example:

    ```python
    x0 = (np.random.rand(4, 8).astype("float32"), np.random.rand(4, 32).astype("float32"))
    x0 = (x0[1][:, :8], x0[1])
    cross = NestedFeatureCross()
    y_student, y_ta = cross(x0)    # (4, 8), (4, 32)
    plain = cross.extract(dim=8)   # a keras_rs.layers.FeatureCross
    np.testing.assert_allclose(plain(x0[0]), y_student, rtol=1e-5)
    ```

    References:
    - [Wang et al., 2020. DCN V2](https://arxiv.org/abs/2008.13535).
    - [Verma et al., 2025. MatTA](https://doi.org/10.1145/3711896.3737245), section 3.2.1.
    """

    def __init__(
        self,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        student_init: str = "standalone",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.student_init = student_init
        self.student_dim: int | None = None
        self.ta_dim: int | None = None
        self.dense: NestedDense | None = None

    def build(self, x0_shape: Any, x_shape: Any = None) -> None:
        student_shape, ta_shape = x0_shape
        self.student_dim, self.ta_dim = int(student_shape[-1]), int(ta_shape[-1])
        self.dense = NestedDense(
            self.student_dim, self.ta_dim,
            kernel_initializer=self.kernel_initializer, bias_initializer=self.bias_initializer,
            student_init=self.student_init, dtype=self.dtype_policy, name="dense",
        )
        self.dense.build((tuple(student_shape), tuple(ta_shape)))

    def call(self, x0: Any, x: Any = None) -> tuple[Any, Any]:
        x = x0 if x is None else x
        projected_student, projected_ta = self.dense((x[0], x[1]))
        return (
            ops.add(ops.multiply(x0[0], projected_student), x[0]),
            ops.add(ops.multiply(x0[1], projected_ta), x[1]),
        )

    def compute_output_shape(self, x0_shape: Any, x_shape: Any = None) -> tuple[tuple, tuple]:
        return tuple(x0_shape[0]), tuple(x0_shape[1])

    def extract(self, dim: int, name: str | None = None) -> keras_rs.layers.FeatureCross:
        """A standalone `keras_rs.layers.FeatureCross` holding `W[:dim, :dim]` and `b[:dim]`."""
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before extraction.")
        if not 1 <= dim <= self.ta_dim:
            raise ValueError(f"`dim` must be an integer in [1, {self.ta_dim}]. Received: dim={dim!r}")
        cross = keras_rs.layers.FeatureCross(
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy, name=name or self.name,
        )
        cross.build((None, dim))
        cross.dense.build((None, dim))  # keras-rs creates its Dense in `build` but builds it on first call
        plain = self.dense.extract(dim, dim)
        cross.dense.kernel.assign(plain.kernel)
        cross.dense.bias.assign(plain.bias)
        return cross

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "student_init": self.student_init,
            }
        )
        return config
