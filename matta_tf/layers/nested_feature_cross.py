"""The M-nested DCN-v2 cross layer (keras-rs `FeatureCross`, full rank, with a nested projection)."""

from __future__ import annotations

from typing import Any

import keras
import keras_rs
import numpy as np
from keras import ops

from matta_tf.layers import _nesting, base
from matta_tf.layers.nested_dense import NestedDense


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedFeatureCross(base.NestedLayer, keras.layers.Layer):
    """A cross layer whose Student weights are the leading block of the TA's.

    Per stream, as `keras_rs.layers.FeatureCross` (DCN-v2, full rank):

    `y = x0 * (act(W x + b) + diag_scale * x) + x`

    with one nested kernel: the Student uses `W[:d_S, :d_S]` and `b[:d_S]` over its width `d_S`, the
    TA the full `W` (`d_TA x d_TA`). `x0` and `x` are stream pairs (or one tensor read by both
    streams) of equal widths; the widths follow the input, so `mnestify` nests a Student's
    `FeatureCross` by widening what feeds it.

    Args:
        diag_scale: float `>= 0`. Added to the diagonal of `W` (as in keras-rs). Defaults to `0.0`.
        use_bias: bool. Whether `W x` adds a bias. Defaults to `True`.
        pre_activation: optional activation of `W x + b`. Defaults to `None`.
        kernel_initializer: Initializer of `W`. Defaults to `"glorot_uniform"`.
        bias_initializer: Initializer of `b`. Defaults to `"zeros"`.
        kernel_regularizer: optional regularizer of the full `W`. Defaults to `None`.
        bias_regularizer: optional regularizer of the full `b`. Defaults to `None`.
        student_init: `"standalone"` (default) or `"ta_slice"`, as in `NestedDense`.
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        x0: pair `(x0_student, x0_ta)` or one tensor, the cross layer's base input.
        x: optional pair `(x_student, x_ta)` or one tensor; defaults to `x0`.

    Returns:
        A pair `(y_student, y_ta)` with the shapes of `x0`.

    Example:

    ```python
    x_ta = np.random.rand(4, 32).astype("float32")
    cross = matta_tf.layers.NestedFeatureCross()
    y_student, y_ta = cross((x_ta[:, :8], x_ta))   # (4, 8), (4, 32)
    plain = cross.extract("student")               # a keras_rs.layers.FeatureCross over 8 features
    ```

    References:
    - [Wang et al., 2020. DCN V2](https://arxiv.org/abs/2008.13535).
    - [Verma et al., 2025. MatTA](https://doi.org/10.1145/3711896.3737245), section 3.2.1.
    """

    plain_classes = (keras_rs.layers.FeatureCross,)

    def __init__(
        self,
        diag_scale: float | None = 0.0,
        use_bias: bool = True,
        pre_activation: str | Any | None = None,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        kernel_regularizer: str | keras.regularizers.Regularizer | None = None,
        bias_regularizer: str | keras.regularizers.Regularizer | None = None,
        student_init: str = "standalone",
        **kwargs: Any,
    ) -> None:
        if diag_scale is not None and diag_scale < 0:
            raise ValueError(f"`diag_scale` must be non-negative. Received: diag_scale={diag_scale!r}")
        _nesting.check_choice("student_init", student_init, _nesting.STUDENT_INITS)
        super().__init__(**kwargs)
        self.diag_scale = diag_scale
        self.use_bias = use_bias
        self.pre_activation = keras.activations.get(pre_activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.student_init = student_init
        self.student_dim: int | None = None
        self.ta_dim: int | None = None
        self.dense: NestedDense | None = None

    def build(self, x0_shape: Any, x_shape: Any = None) -> None:
        self.student_dim, self.ta_dim = _nesting.input_widths(x0_shape, self.name)
        self.dense = NestedDense(
            self.student_dim,
            self.ta_dim,
            activation=self.pre_activation,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            student_init=self.student_init,
            dtype=self.dtype_policy,
            name="dense",
        )
        self.dense.build(_nesting.split_shapes(x0_shape if x_shape is None else x_shape))

    def call(self, x0: Any, x: Any = None) -> tuple[Any, Any]:
        x0_student, x0_ta = _nesting.split_streams(x0)
        x_student, x_ta = (x0_student, x0_ta) if x is None else _nesting.split_streams(x)
        projected_student, projected_ta = self.dense(x_ta if x_student is x_ta else (x_student, x_ta))

        def cross(base_input: Any, projected: Any, stream: Any) -> Any:
            projected = ops.cast(projected, self.compute_dtype)
            if self.diag_scale:
                projected = ops.add(projected, ops.multiply(self.diag_scale, stream))
            return ops.add(ops.multiply(base_input, projected), stream)

        y_ta = cross(x0_ta, projected_ta, x_ta)
        if x0_student is x0_ta and x_student is x_ta and projected_student is projected_ta:
            return y_ta, y_ta
        return cross(x0_student, projected_student, x_student), y_ta

    def compute_output_shape(self, x0_shape: Any, x_shape: Any = None) -> tuple[tuple, tuple]:
        return _nesting.split_shapes(x0_shape)

    @classmethod
    def from_plain(cls, layer: keras_rs.layers.FeatureCross, context: base.NestingContext) -> NestedFeatureCross:
        """A full-rank `FeatureCross` -> `NestedFeatureCross`: its widths follow the (widened) input."""
        if layer.projection_dim is not None:
            raise ValueError(
                f"mnestify does not support layer '{layer.name}' of class FeatureCross with a low-rank "
                f"projection. Received: projection_dim={layer.projection_dim}. Supported: projection_dim=None."
            )
        return cls(
            diag_scale=layer.diag_scale,
            use_bias=layer.use_bias,
            pre_activation=layer.pre_activation,
            kernel_initializer=_nesting.clone_initializer(layer.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(layer.bias_initializer),
            kernel_regularizer=layer.kernel_regularizer,
            bias_regularizer=layer.bias_regularizer,
            student_init=context.student_init,
            dtype=layer.dtype_policy,
            name=context.name,
        )

    def assign_subnet(self, cross: keras_rs.layers.FeatureCross) -> None:
        """Writes a plain `FeatureCross`'s `W` and `b` into the leading block (the inverse of `extract`)."""
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before `assign_subnet`.")
        if getattr(cross, "dense", None) is None or not cross.dense.built:
            raise ValueError(f"'{cross.name}' must be built (called once) before its weights can be assigned.")
        self.dense.assign_subnet(cross.dense)

    def _positions(self, choice: str | int, input_layout: base.InputLayout) -> np.ndarray:
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before extraction.")
        base.check_choice(choice, allow_int=True)
        width = {"student": self.student_dim, "ta": self.ta_dim}.get(choice, choice)
        layouts = input_layout if isinstance(input_layout, tuple) else (input_layout,)
        positions = [base.input_positions(layout, width, high=self.ta_dim, layer_name=self.name) for layout in layouts]
        if any(not np.array_equal(p, positions[0]) for p in positions[1:]):
            raise ValueError(f"Layer '{self.name}': its two inputs `x0` and `x` have different layouts")
        return positions[0]

    def extract(
        self, choice: str | int = "ta", input_layout: base.InputLayout = None, name: str | None = None
    ) -> keras_rs.layers.FeatureCross:
        """A standalone `keras_rs.layers.FeatureCross` holding `W[p, p]` and `b[p]` for the input's features `p`.

        Args:
            choice: `"student"` (`d_S` features), `"ta"` (`d_TA`) or an integer width in `[1, d_TA]`:
                the input's width when `input_layout` is `None`.
            input_layout: optional layout of the input (one for both `x0` and `x`, or a tuple
                `(x0_layout, x_layout)` of equal layouts).
            name: optional name of the extracted layer. Defaults to this layer's name.
        """
        positions = self._positions(choice, input_layout)
        cross = keras_rs.layers.FeatureCross(
            diag_scale=self.diag_scale,
            use_bias=self.use_bias,
            pre_activation=self.pre_activation,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name=name or self.name,
        )
        cross.build((None, len(positions)))
        # keras-rs creates its projection in `build` but builds it on the first call.
        cross.dense.build((None, len(positions)))
        cross.dense.kernel.assign(ops.convert_to_numpy(self.dense.kernel)[np.ix_(positions, positions)])
        if self.use_bias:
            cross.dense.bias.assign(ops.convert_to_numpy(self.dense.bias)[positions])
        return cross

    def output_layout(self, choice: str | int, input_layout: base.InputLayout) -> np.ndarray | None:
        return None if input_layout is None else self._positions(choice, input_layout)

    @classmethod
    def plain_flops(cls, plain: keras_rs.layers.FeatureCross, input_shape: tuple) -> int:
        d = int(input_shape[-1])
        per_position = 2 * d * d + 3 * d + (2 * d if plain.diag_scale else 0)
        return per_position * base.positions_per_example(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "diag_scale": self.diag_scale,
                "use_bias": self.use_bias,
                "pre_activation": keras.activations.serialize(self.pre_activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "student_init": self.student_init,
            }
        )
        return config
