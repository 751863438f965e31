"""The d_model-nested embedding table (MatTA, section 3.2.3)."""

from typing import Any

import keras
import keras_rs

from matta_tf.layers import _nesting, base

COMBINERS = ("mean", "sum", "sqrtn")


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedEmbedding(base.NestedLayer, keras.layers.Layer):
    """An embedding table of the TA's width whose first `student_dim` columns are the Student's.

    One table `E` of shape `(input_dim, ta_dim)`; for ids `i`

    `e_TA = E[i]`, `e_S = E[i, :student_dim] = e_TA[..., :student_dim]`,

    so both streams come from one lookup. With a `combiner` the layer embeds multi-valued features
    (a dense `(batch, n)` id matrix, a `tf.RaggedTensor` or a `tf.SparseTensor` of ids, with optional
    per-id `weights`) and reduces them over the values, exactly as `keras_rs.layers.EmbedReduce`:
    `sum_j w_j E[i_j] / norm` with `norm = 1` (`"sum"`), `sum_j w_j` (`"mean"`) or
    `sqrt(sum_j w_j^2)` (`"sqrtn"`). The reduction is linear per column, so the Student's reduced
    embedding is the leading slice of the TA's.

    Args:
        input_dim: int. Vocabulary size (largest id + 1).
        student_dim: int. Embedding width `d_S` of the Student stream.
        ta_dim: int. Embedding width `d_TA` of the TA stream, `>= student_dim`.
        embeddings_initializer: string or `keras.initializers.Initializer`. Defaults to `"uniform"`
            (as `keras.layers.Embedding`).
        embeddings_regularizer: optional regularizer applied to the full table. Defaults to `None`.
        embeddings_constraint: optional constraint applied to the full table. Defaults to `None`.
        combiner: `None`, `"mean"`, `"sum"` or `"sqrtn"`. `None` (default) embeds every id (any
            rank, like `keras.layers.Embedding`); otherwise the last id axis is reduced (like
            `keras_rs.layers.EmbedReduce`).
        student_init: `"standalone"` (default) draws the Student's columns with the initializer at
            the Student's shape `(input_dim, student_dim)` and the other columns at the TA's shape;
            `"ta_slice"` draws the whole table at the TA's shape.
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        inputs: integer ids.
        weights: optional per-id weights, only with a `combiner` (see `keras_rs.layers.EmbedReduce`).

    Returns:
        A pair `(e_student, e_ta)`, the same tensor twice when `student_dim == ta_dim`.

    Example:

    ```python
    table = matta_tf.layers.NestedEmbedding(input_dim=100, student_dim=8, ta_dim=16)
    e_student, e_ta = table(np.array([3, 7, 42]))            # (3, 8), (3, 16)
    genres = matta_tf.layers.NestedEmbedding(20, 8, 16, combiner="mean")
    g_student, g_ta = genres(tf.ragged.constant([[1, 4], [2], [5, 6, 7]]))  # (3, 8), (3, 16)
    student_table = table.extract("student")  # a plain keras.layers.Embedding(100, 8)
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), section 3.2.3 (d_model M-nesting).
    - [Kusupati et al., 2022. Matryoshka Representation Learning](https://arxiv.org/abs/2205.13147).
    """

    plain_classes = (keras.layers.Embedding, keras_rs.layers.EmbedReduce)
    reads_features = False

    def __init__(
        self,
        input_dim: int,
        student_dim: int,
        ta_dim: int,
        embeddings_initializer: str | keras.initializers.Initializer = "uniform",
        embeddings_regularizer: str | keras.regularizers.Regularizer | None = None,
        embeddings_constraint: str | keras.constraints.Constraint | None = None,
        combiner: str | None = None,
        student_init: str = "standalone",
        **kwargs: Any,
    ) -> None:
        _nesting.check_positive_int("input_dim", input_dim)
        _nesting.check_positive_int("student_dim", student_dim)
        _nesting.check_positive_int("ta_dim", ta_dim)
        _nesting.check_not_wider("student_dim", student_dim, "ta_dim", ta_dim)
        if combiner is not None:
            _nesting.check_choice("combiner", combiner, COMBINERS)
        _nesting.check_choice("student_init", student_init, _nesting.STUDENT_INITS)
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.student_dim = student_dim
        self.ta_dim = ta_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.embeddings_constraint = keras.constraints.get(embeddings_constraint)
        self.combiner = combiner
        self.student_init = student_init
        # The lookup (and reduction) runs in a plain layer of the TA's width.
        self.lookup = self._plain_layer(
            ta_dim,
            _nesting.nested_initializer(self.embeddings_initializer, (input_dim, student_dim), student_init),
            name="lookup",
        )

    def _plain_layer(self, dim: int, initializer: Any, name: str) -> keras.layers.Embedding:
        kwargs = dict(
            input_dim=self.input_dim,
            output_dim=dim,
            embeddings_initializer=initializer,
            embeddings_regularizer=self.embeddings_regularizer,
            embeddings_constraint=self.embeddings_constraint,
            dtype=self.dtype_policy,
            name=name,
        )
        if self.combiner is None:
            return keras.layers.Embedding(**kwargs)
        return keras_rs.layers.EmbedReduce(combiner=self.combiner, **kwargs)

    @property
    def embeddings(self) -> Any:
        """The `(input_dim, ta_dim)` table; the Student reads its first `student_dim` columns."""
        return self.lookup.embeddings

    def build(self, input_shape: Any = None) -> None:
        self.lookup.build(input_shape)

    def call(self, inputs: Any, weights: Any = None) -> tuple[Any, Any]:
        if weights is None:
            e_ta = self.lookup(inputs)
        elif self.combiner is None:
            raise ValueError(f"Layer '{self.name}': `weights` need a `combiner`. Received: combiner=None")
        else:
            e_ta = self.lookup(inputs, weights)
        if self.student_dim == self.ta_dim:
            return e_ta, e_ta
        return e_ta[..., : self.student_dim], e_ta

    def compute_output_shape(self, input_shape: Any, weights_shape: Any = None) -> tuple[tuple, tuple]:
        shape_ta = tuple(self.lookup.compute_output_shape(input_shape))
        return (*shape_ta[:-1], self.student_dim), shape_ta

    def compute_output_spec(self, inputs: Any, weights: Any = None) -> tuple[Any, Any]:
        shape_student, shape_ta = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(shape_student, dtype=self.compute_dtype),
            keras.KerasTensor(shape_ta, dtype=self.compute_dtype),
        )

    @classmethod
    def from_plain(cls, layer: keras.layers.Embedding, context: base.NestingContext) -> "NestedEmbedding":
        """`Embedding(input_dim, d)` / `EmbedReduce` -> `NestedEmbedding(input_dim, d, round(d * d_model_m))`."""
        if getattr(layer, "mask_zero", False):
            raise ValueError(
                f"mnestify does not support layer '{layer.name}' of class Embedding with "
                "`mask_zero=True`. Supported: Embedding without masking."
            )
        if not context.inputs_shared:
            raise ValueError(f"mnestify: the ids of embedding '{layer.name}' must be the same for both streams.")
        return cls(
            layer.input_dim,
            layer.output_dim,
            context.widen(layer.output_dim, "d_model"),
            embeddings_initializer=_nesting.clone_initializer(layer.embeddings_initializer),
            embeddings_regularizer=layer.embeddings_regularizer,
            embeddings_constraint=layer.embeddings_constraint,
            combiner=layer.combiner if isinstance(layer, keras_rs.layers.EmbedReduce) else None,
            student_init=context.student_init,
            dtype=layer.dtype_policy,
            name=context.name,
        )

    def stream_widths(self) -> base.StreamWidths:
        return base.StreamWidths({"dim": self.student_dim}, {"dim": self.ta_dim})

    def _dim(self, choice: str | int) -> int:
        base.check_choice(choice, allow_int=True)
        dim = {"student": self.student_dim, "ta": self.ta_dim}.get(choice, choice)
        if not 1 <= dim <= self.ta_dim:
            raise ValueError(f"`dim` must be an integer in [1, {self.ta_dim}]. Received: choice={choice!r}")
        return int(dim)

    def extract_config(self, choice: str | int = "ta", input_layout: base.InputLayout = None) -> dict[str, Any]:
        """The config of the plain layer that `extract(choice)` returns."""
        return self._plain_layer(
            self._dim(choice), _nesting.clone_initializer(self.embeddings_initializer), name=self.name
        ).get_config()

    def extract(
        self, choice: str | int = "ta", input_layout: base.InputLayout = None, name: str | None = None
    ) -> keras.layers.Embedding:
        """A standalone embedding holding a copy of the first `dim` columns of the table.

        Args:
            choice: `"student"` (`student_dim`), `"ta"` (`ta_dim`) or any width in `[1, ta_dim]`.
            input_layout: unused (the inputs are ids, not features); must be `None`.
            name: optional name of the extracted layer. Defaults to this layer's name.

        Returns:
            A built `keras.layers.Embedding` (without a combiner) or `keras_rs.layers.EmbedReduce`
            (with one), with its own variables.
        """
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before extraction.")
        if input_layout is not None:
            raise ValueError(
                f"Layer '{self.name}' reads ids, not features: `input_layout` must be None. "
                f"Received: input_layout={input_layout!r}"
            )
        dim = self._dim(choice)
        config = self.extract_config(choice)
        if name is not None:
            config["name"] = name
        plain = self.lookup.__class__.from_config(config)
        plain.build()
        plain.embeddings.assign(_nesting.leading_block(self.embeddings, (self.input_dim, dim)))
        return plain

    @classmethod
    def plain_flops(cls, plain: keras.layers.Embedding, input_shape: tuple) -> int:
        if isinstance(plain, keras_rs.layers.EmbedReduce):
            return 2 * int(input_shape[-1]) * plain.output_dim  # weighted sum over the values
        return 0

    def assign_subnet(self, embedding: keras.layers.Embedding) -> None:
        """Writes a plain embedding table into the leading columns (the inverse of `extract`)."""
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before `assign_subnet`.")
        if embedding.input_dim != self.input_dim:
            raise ValueError(
                f"`input_dim` differs between '{embedding.name}' ({embedding.input_dim}) and "
                f"'{self.name}' ({self.input_dim})."
            )
        _nesting.assign_leading_block(self.embeddings, embedding.embeddings)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "input_dim": self.input_dim,
                "student_dim": self.student_dim,
                "ta_dim": self.ta_dim,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
                "embeddings_constraint": keras.constraints.serialize(self.embeddings_constraint),
                "combiner": self.combiner,
                "student_init": self.student_init,
            }
        )
        return config
