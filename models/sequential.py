"""A nested sequential recommender: the paper's GPT-2 experiment on users' item histories.

A decoder-only Transformer reads a user's item ids in time order and predicts the next item at every
position (GPT-2 layout: learned positions, pre-norm blocks with causal attention, a final norm, and
output logits `h E^T` tied to the item embedding table `E`). Its M-nested Student+TA network follows
the paper's GPT-2 Medium recipe (section 4.2.2): every block's FFN is nested (the TA's hidden width is
wider, the Student's is its leading part, `NestedTransformerBlock`), and the TA has extra blocks that
only it runs (depth nesting, `TAOnly`), spread evenly over the stack. The model width, the heads and
the embedding table are shared. `SequentialConfig.gpt2_medium()` gives the paper's shapes.

Training (`train_next_item`) runs `NextItemMatTAModel` on next-item windows: a softmax over the item
ids at every position, the Student, the TA or both with MatTA's distillation. Evaluation
(`evaluate_next_item`) ranks all items for each user's held-out next item (leave-last-out, see
`matta_tf.data.sequences`) with keras-rs ranking metrics. Mix'n'Match over the trained stack is the
paper's wide-narrow-wide family (`wide_narrow_wide`), extracted with `extract_submodel`.

Example (a test under `make test-all`: it trains):

```python slow
from matta_tf.data.movielens import load_ratings
from matta_tf.data.sequences import prepare_next_item_data

ratings = load_ratings()                       # all of MovieLens: drop the filter, use the defaults
data = prepare_next_item_data(ratings[ratings["userId"] <= 20], max_length=8)
config = SequentialConfig(vocabulary_size=data.num_ids, max_length=8, model_dim=16, num_heads=2,
                          student_layers=2, student_ffn_dim=16, ta_layers=3, ta_ffn_dim=32)
network = build_sequential_network(config)     # item ids -> [student_logits, ta_logits], (batch, 8, ids)
# One short epoch; XLA (the default `jit_compile=True`) repays its compile time only over many steps.
model, history = train_next_item(network, data, mode="matta", epochs=1, jit_compile=False, verbose=0)
metrics = evaluate_next_item(network, data.test, stream="student")   # {"hit_rate@10": ..., "mrr": ...}
specs = wide_narrow_wide(network, config)      # K = 0 (Student), 2, ..., student_layers (TA)
assert [spec.name for spec in specs] == ["wnw-0", "wnw-2"]
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import keras_rs
import numpy as np
import tensorflow as tf
from keras import ops

from matta_tf.data.schema import Label
from matta_tf.data.sequences import NUM_RESERVED_IDS, NextItemData, NextItemExamples, NextItemWindows
from matta_tf.extraction import SubmodelSpec, choosable_layers, wide_narrow_wide_specs
from matta_tf.layers import NestedNormalization, NestedTransformerBlock, TAOnly, TransformerBlock
from matta_tf.layers._nesting import NORMALIZATIONS, STUDENT_INITS
from matta_tf.models.relevance import ConfigError
from matta_tf.training import DistillationSchedule, LatestValue, MatTAModel

TOP_K = 10
# GPT-2 initializes its token and position tables from N(0, 0.02).
EMBEDDING_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class SequentialConfig:
    """Sizes of the Student decoder and of the TA it is M-nested into (FFN and depth nesting).

    Args:
        vocabulary_size: Number of item ids, padding and out-of-vocabulary included (the logits per
            position; `NextItemData.num_ids`).
        max_length: Longest input sequence (learned positions). Defaults to 50.
        model_dim: Width of the residual stream and of the item embeddings (shared). Defaults to 64.
        num_heads: Attention heads of every block (shared). Defaults to 4.
        student_layers: Blocks of the Student. Defaults to 4.
        student_ffn_dim: FFN hidden width of the Student's blocks. Defaults to 128.
        ta_layers: Blocks of the TA, `>= student_layers`; the `ta_layers - student_layers` extra blocks
            run on the TA stream only. Defaults to 6.
        ta_ffn_dim: FFN hidden width of the TA's blocks (nested blocks and TA-only blocks),
            `>= student_ffn_dim`. Defaults to 256.
        dropout: Dropout on the embeddings and on both residual branches of every block. Defaults to 0.1.
        normalization: `"layer_norm"` (default, as GPT-2) or `"rms_norm"`.
        student_init: `"standalone"` (default): every Student sub-block is initialized exactly as a
            standalone Student's; `"ta_slice"`: Student blocks are slices of TA-shaped draws.
    """

    vocabulary_size: int
    max_length: int = 50
    model_dim: int = 64
    num_heads: int = 4
    student_layers: int = 4
    student_ffn_dim: int = 128
    ta_layers: int = 6
    ta_ffn_dim: int = 256
    dropout: float = 0.1
    normalization: str = "layer_norm"
    student_init: str = "standalone"

    def __post_init__(self) -> None:
        for field in ("vocabulary_size", "max_length", "model_dim", "num_heads", "student_layers", "student_ffn_dim",
                      "ta_layers", "ta_ffn_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"`{field}` must be an integer >= 1. Received: {field}={value!r}")
        if self.vocabulary_size <= NUM_RESERVED_IDS:
            raise ConfigError(
                f"`vocabulary_size` must exceed the {NUM_RESERVED_IDS} reserved ids (padding, out of vocabulary). "
                f"Received: vocabulary_size={self.vocabulary_size}"
            )
        if self.model_dim % self.num_heads:
            raise ConfigError(
                "`model_dim` must be a multiple of `num_heads`. "
                f"Received: model_dim={self.model_dim}, num_heads={self.num_heads}"
            )
        for student_field, ta_field in (("student_layers", "ta_layers"), ("student_ffn_dim", "ta_ffn_dim")):
            if getattr(self, student_field) > getattr(self, ta_field):
                raise ConfigError(
                    f"`{ta_field}` must be >= `{student_field}` (the TA is no smaller than the Student). "
                    f"Received: {student_field}={getattr(self, student_field)}, {ta_field}={getattr(self, ta_field)}"
                )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`dropout` must be in [0, 1). Received: dropout={self.dropout!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"`normalization` must be one of {NORMALIZATIONS}. Received: normalization={self.normalization!r}"
            )
        if self.student_init not in STUDENT_INITS:
            raise ConfigError(
                f"`student_init` must be one of {STUDENT_INITS}. Received: student_init={self.student_init!r}"
            )

    @classmethod
    def gpt2_medium(cls, vocabulary_size: int = 50257, max_length: int = 1024, width_divisor: int = 1,
                    **overrides: Any) -> SequentialConfig:
        """The paper's GPT-2 Medium shapes (Table 2, section 4.2.2).

        Student: 24 blocks, d_model 1024, 16 heads, FFN 4096 (GPT-2 Medium); TA: FFN 8192 and 12 more
        blocks (36). `width_divisor` divides d_model and both FFN widths (layer and head counts stay),
        so that tests can build the full depth at a tiny width.

        Args:
            vocabulary_size: Item (token) ids. Defaults to GPT-2's 50257.
            max_length: Context length. Defaults to GPT-2's 1024.
            width_divisor: Positive integer dividing 1024 into a multiple of 16 heads. Defaults to 1.
            **overrides: Other `SequentialConfig` fields (e.g. `dropout`).
        """
        if not isinstance(width_divisor, int) or isinstance(width_divisor, bool) or width_divisor < 1 or (
            1024 % (16 * width_divisor)
        ):
            raise ConfigError(
                "`width_divisor` must be a positive integer that leaves d_model=1024/width_divisor a multiple of "
                f"the 16 heads (1, 2, 4, ..., 64). Received: width_divisor={width_divisor!r}"
            )
        return cls(
            vocabulary_size=vocabulary_size,
            max_length=max_length,
            model_dim=1024 // width_divisor,
            num_heads=16,
            student_layers=24,
            student_ffn_dim=4096 // width_divisor,
            ta_layers=36,
            ta_ffn_dim=8192 // width_divisor,
            **overrides,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SequentialConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field {unknown[0]!r}. Known fields: {sorted(known)}")
        return cls(**data)

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def ta_only_layers(self) -> int:
        return self.ta_layers - self.student_layers

    def ta_only_after(self) -> tuple[int, ...]:
        """How many TA-only blocks follow each nested block: spread evenly, the last block gets one first.

        GPT-2 Medium (24 + 12): one after every second block (blocks 1, 3, ..., 23).
        """
        n, extra = self.student_layers, self.ta_only_layers
        return tuple((i + 1) * extra // n - i * extra // n for i in range(n))

    def student_config(self) -> SequentialConfig:
        """The Student alone: a network whose TA stream is the Student (the baseline)."""
        return dataclasses.replace(self, ta_layers=self.student_layers, ta_ffn_dim=self.student_ffn_dim)


# ---- layers -------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="matta_tf")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position vector to each token: `y[:, t] = x[:, t] + P[t]` (GPT-2).

    Args:
        max_length: int. Number of positions `P` holds.
        initializer: Initializer of `P`. Defaults to `RandomNormal(stddev=0.02)`.
        **kwargs: Args passed to `keras.layers.Layer`.
    """

    def __init__(self, max_length: int, initializer: Any = None, **kwargs: Any) -> None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"`max_length` must be a positive integer. Received: max_length={max_length!r}")
        super().__init__(**kwargs)
        self.max_length = max_length
        self.initializer = keras.initializers.get(initializer or keras.initializers.RandomNormal(EMBEDDING_STDDEV))

    def build(self, input_shape: Any) -> None:
        length = input_shape[-2]
        if length is not None and length > self.max_length:
            raise ValueError(
                f"Layer '{self.name}' holds {self.max_length} positions. Received: sequence length {length}"
            )
        self.positions = self.add_weight(
            name="positions", shape=(self.max_length, input_shape[-1]), initializer=self.initializer
        )

    def call(self, inputs: Any) -> Any:
        length = ops.shape(inputs)[-2]
        return ops.add(inputs, ops.cast(self.positions[:length], inputs.dtype))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(max_length=self.max_length, initializer=keras.initializers.serialize(self.initializer))
        return config


# ---- network ------------------------------------------------------------------------------------------
def block_name(index: int) -> str:
    return f"block_{index}"


def ta_block_name(index: int) -> str:
    return f"ta_block_{index}"


def build_sequential_network(config: SequentialConfig, name: str = "sequential") -> keras.Model:
    """The M-nested decoder: item ids `(batch, max_length)` -> `[student_logits, ta_logits]`.

    Each output is `(batch, max_length, vocabulary_size)`: the logits of the next id at every position.
    Layers: `item_embedding` (`keras.layers.ReversibleEmbedding`, read by both streams and reused,
    transposed, for the output logits), `position_embedding`, `block_i` (`NestedTransformerBlock`,
    causal, Student FFN `student_ffn_dim` / TA FFN `ta_ffn_dim`), `ta_block_j` (`TAOnly` over a plain
    `TransformerBlock` of the TA's FFN width) after the nested blocks that `config.ta_only_after()` names,
    and `final_norm` (`NestedNormalization`).
    """
    item_ids = keras.Input((config.max_length,), dtype="int32", name="item_ids")
    items = keras.layers.ReversibleEmbedding(
        config.vocabulary_size, config.model_dim,
        embeddings_initializer=keras.initializers.RandomNormal(EMBEDDING_STDDEV), name="item_embedding",
    )
    x = items(item_ids)
    x = PositionEmbedding(config.max_length, name="position_embedding")(x)
    x = keras.layers.Dropout(config.dropout, name="embedding_dropout")(x)
    ta_index = 0
    for index, extra in enumerate(config.ta_only_after()):
        x = NestedTransformerBlock(
            config.num_heads, config.head_dim, config.student_ffn_dim, config.ta_ffn_dim, causal=True,
            normalization=config.normalization, dropout=config.dropout, student_init=config.student_init,
            name=block_name(index),
        )(x)
        for _ in range(extra):
            block = TransformerBlock(config.num_heads, config.head_dim, config.ta_ffn_dim, causal=True,
                                     normalization=config.normalization, dropout=config.dropout,
                                     name=f"{ta_block_name(ta_index)}_block")
            x = TAOnly(block, residual=False, name=ta_block_name(ta_index))(x)
            ta_index += 1
    x_student, x_ta = NestedNormalization(config.normalization, name="final_norm")(x)
    # Tied output: one table for the input ids and both streams' logits.
    logits = [items(x_student, reverse=True), items(x_ta, reverse=True)]
    return keras.Model(item_ids, logits, name=name)


# ---- parameter counts ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the Student and the TA: the shared embeddings, and each model's non-embedding ones."""

    embedding: int
    student_non_embedding: int
    ta_non_embedding: int

    @property
    def student(self) -> int:
        return self.embedding + self.student_non_embedding

    @property
    def ta(self) -> int:
        return self.embedding + self.ta_non_embedding


def block_parameters(config: SequentialConfig, ffn_dim: int) -> int:
    """Parameters of one pre-norm block of FFN width `ffn_dim` (weights and biases of Q, K, V, O, FFN, norms)."""
    d = config.model_dim
    norm = 2 * d if config.normalization == "layer_norm" else d
    attention = 4 * d * d + 4 * d  # Q, K, V and output projections (num_heads * head_dim == d), with biases
    ffn = 2 * d * ffn_dim + ffn_dim + d
    return attention + ffn + 2 * norm


def parameter_counts(config: SequentialConfig) -> ParameterCounts:
    """Analytic parameter counts (non-embedding: everything but the item and position tables, as for GPT-2).

    GPT-2 Medium (`SequentialConfig.gpt2_medium()`): Student 24 * (12 d^2 + 13 d) + 2 d = 302,311,424
    non-embedding parameters, TA 36 * (20 d^2 + 9 d + 8192) + 2 d = 755,603,456.
    """
    d = config.model_dim
    final_norm = 2 * d if config.normalization == "layer_norm" else d
    embedding = config.vocabulary_size * d + config.max_length * d
    student = config.student_layers * block_parameters(config, config.student_ffn_dim) + final_norm
    ta = config.ta_layers * block_parameters(config, config.ta_ffn_dim) + final_norm
    return ParameterCounts(embedding, student, ta)


def non_embedding_parameters(model: keras.Model) -> int:
    """Parameters of a built (nested or extracted) decoder minus its item and position tables."""
    embedding = sum(
        int(np.prod(w.shape)) for layer in model.layers
        if isinstance(layer, (keras.layers.Embedding, PositionEmbedding)) for w in layer.weights
    )
    return int(model.count_params()) - embedding


# ---- Mix'n'Match ------------------------------------------------------------------------------------------
def stack_groups(network: keras.Model, config: SequentialConfig) -> list[str]:
    """Wide-narrow-wide stack entries: each nested block with the TA-only blocks that follow it.

    Only choosable layers are named (a nested block whose Student and TA widths are equal offers no
    choice), so an entry may hold the TA-only blocks alone.
    """
    choosable = {layer.name for layer in choosable_layers(network)}
    groups, ta_index = [], 0
    for index, extra in enumerate(config.ta_only_after()):
        names = [block_name(index)] + [ta_block_name(ta_index + j) for j in range(extra)]
        ta_index += extra
        groups.append(",".join(name for name in names if name in choosable))
    return groups


def wide_narrow_wide(network: keras.Model, config: SequentialConfig,
                     ks: Sequence[int] | None = None) -> list[SubmodelSpec]:
    """The paper's wide-narrow-wide specs over the stack: the lowest K/2 and top K/2 groups at the TA.

    A group (`stack_groups`) at the TA takes the nested block's TA FFN and keeps the TA-only blocks after
    it; at the Student it takes the Student FFN and drops them. `K = 0` is the Student, `K =
    student_layers` the TA. Defaults to `K = 0, 2, ..., student_layers`.
    """
    groups = stack_groups(network, config)
    if any(not group for group in groups):
        raise ConfigError(
            "wide-narrow-wide needs every group to hold a choice: give the TA a wider FFN "
            f"(`ta_ffn_dim` > `student_ffn_dim`). Received: student_ffn_dim={config.student_ffn_dim}, "
            f"ta_ffn_dim={config.ta_ffn_dim}"
        )
    return wide_narrow_wide_specs(network, groups, ks=ks)


# ---- training -----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="matta_tf")
class NextItemMatTAModel(MatTAModel):
    """`MatTAModel` over sequences: every position of every sequence is one next-item example.

    `network` maps item ids `(batch, n)` to `(student_logits, ta_logits)`, each `(batch, n, ids)`;
    positions are flattened into examples `(batch * n, ids)`, so labels are the next ids `(batch, n)`
    (or per-position teacher distributions `(batch, n, ids)` with a teacher `label`) and sample weights
    `(batch, n)`, 0 where there is no next item. The loss is `MatTAModel`'s (eqs. 1-3, averaged with
    Keras' `"sum_over_batch_size"`, so weights that sum to `batch * n` over a batch, as
    `next_item_dataset` gives, make it the mean over the real positions).

    Metrics per trained stream: `{stream}_log_loss` and `{stream}_hit_rate_at_10` (the next id among the
    10 highest logits), and `churn` in `"matta"` mode. `MatTAModel`'s one-vs-rest AUROC over every id is
    left out: it costs `thresholds x positions x ids` per step.

    Args:
        network: The nested decoder (`build_sequential_network`).
        label: `matta_tf.data.Label`. Defaults to next-id class indices over the network's output width.
        **kwargs: Args of `MatTAModel` (`mode`, `loss_weights`, `distillation_schedule`, ...).
    """

    def __init__(self, network: keras.layers.Layer, label: Label | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if label is None:
            width = getattr(network, "outputs", None) and network.outputs[0].shape[-1]
            if not width:
                raise ValueError(
                    "`label` is needed when `network` is not a functional model with known output widths. "
                    f"Received: network={network!r}"
                )
            label = Label("next_item", task="multiclass", num_classes=int(width))
        super().__init__(network, label=label, **kwargs)

    def _create_metrics(self) -> None:
        self.term_trackers = [keras.metrics.Mean(name=f"{term}_loss") for term in self.terms]
        self.distillation_weight_tracker = (
            LatestValue(name="distillation_weight") if "distillation" in self.terms else None
        )
        self.stream_metrics = [
            [
                keras.metrics.Mean(name=f"{stream}_log_loss"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=TOP_K, name=f"{stream}_hit_rate_at_{TOP_K}"),
            ]
            for stream in self.streams
        ]
        self.churn_tracker = keras.metrics.Mean(name="churn") if self.mode == "matta" else None

    def call(self, inputs: Any, training: bool | None = None) -> dict[str, Any]:
        outputs = self.network(inputs, training=training)
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2 or any(len(o.shape) != 3 for o in outputs):
            shapes = [tuple(o.shape) for o in outputs] if isinstance(outputs, (tuple, list)) else outputs
            raise ValueError(
                "`network` must return a pair of per-position logits `(batch, n, ids)`. "
                f"Received: {shapes}"
            )
        flat = [ops.reshape(logits, (-1, ops.shape(logits)[-1])) for logits in outputs]
        student_logits, ta_logits = self._check_network_outputs(flat)
        return {"student": student_logits, "ta": ta_logits}

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> dict[str, Any]:
        del x
        if self.label.representation == "class_index" and not isinstance(y, Mapping):
            next_ids = ops.reshape(ops.cast(y, "int32"), (-1,))
        else:
            next_ids = ops.argmax(self.targets(y), axis=-1)
        weights = None if sample_weight is None else ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        for stream, (log_loss, hit_rate) in zip(self.streams, self.stream_metrics, strict=True):
            logits = ops.cast(y_pred[stream], "float32")
            log_loss.update_state(
                ops.sparse_categorical_crossentropy(next_ids, logits, from_logits=True), sample_weight=weights
            )
            hit_rate.update_state(next_ids, logits, sample_weight=weights)
        if self.churn_tracker is not None:
            disagree = ops.cast(ops.not_equal(ops.argmax(y_pred["student"], -1), ops.argmax(y_pred["ta"], -1)),
                                "float32")
            self.churn_tracker.update_state(disagree, sample_weight=weights)
        return self.get_metrics_result()


def next_item_dataset(windows: NextItemWindows, batch_size: int, shuffle: bool = True,
                      seed: int = 0) -> tf.data.Dataset:
    """`(inputs, targets, weights)` batches of training windows for `NextItemMatTAModel.fit`.

    Each batch's weights are rescaled to sum to `batch * n`, so that the model's loss, a sum over the
    batch's `batch * n` positions divided by that number, is the mean over the positions with a target.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}")
    dataset = tf.data.Dataset.from_tensor_slices((windows.inputs, windows.targets, windows.weights))
    if shuffle:
        dataset = dataset.shuffle(len(windows), seed=seed, reshuffle_each_iteration=True)

    def normalize(inputs: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor) -> tuple:
        size = tf.cast(tf.size(weights), weights.dtype)
        return inputs, targets, weights * tf.math.divide_no_nan(size, tf.reduce_sum(weights))

    return dataset.batch(batch_size).map(normalize).prefetch(tf.data.AUTOTUNE)


class NextItemValidation(keras.callbacks.Callback):
    """After each epoch, ranks every user's validation item with each trained stream; adds the metrics to logs."""

    def __init__(self, network: keras.Model, examples: NextItemExamples, streams: Sequence[str], k: int = TOP_K):
        super().__init__()
        self.examples, self.k = examples, k
        self.scorers = {stream: NextItemScorer(network, stream) for stream in streams}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        for stream, scorer in self.scorers.items():
            metrics = ranking_metrics(scorer(self.examples), self.examples.targets, self.examples.seen, k=self.k)
            for metric, value in metrics.items():
                logs[f"val_{stream}_{metric}"] = value


def train_next_item(
    network: keras.Model,
    data: NextItemData,
    mode: str = "matta",
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
    distillation_schedule: DistillationSchedule | None = None,
    seed: int = 0,
    validate: bool = True,
    jit_compile: bool = True,
    verbose: int | str = "auto",
) -> tuple[NextItemMatTAModel, dict[str, list[float]]]:
    """Trains `network` on `data.train` with Adam; returns the model and Keras' `History.history`.

    With `validate`, each epoch's logs also hold `val_{stream}_{hit_rate@10, ndcg@10, mrr}` on
    `data.validation`. The progress bar is Keras' (`verbose`). XLA (`jit_compile`, the default) halves
    the step time on CPU: the softmax over every id at every position dominates it.
    """
    model = NextItemMatTAModel(network, mode=mode, loss_weights=loss_weights,
                               distillation_schedule=distillation_schedule)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit_compile)
    callbacks = [NextItemValidation(network, data.validation, model.streams)] if validate else []
    # The dataset shuffles itself (seeded); Keras' own `shuffle` does not apply to a `tf.data.Dataset`.
    history = model.fit(next_item_dataset(data.train, batch_size, seed=seed), epochs=epochs, callbacks=callbacks,
                        shuffle=False, verbose=verbose)
    return model, history.history


# ---- evaluation ---------------------------------------------------------------------------------------
class NextItemScorer:
    """Logits `(users, ids)` of each user's next item, read at the last real position of their history.

    The model runs in one compiled function (traced once, for any number of users), so a scorer can be
    called every epoch.

    Args:
        model: An extracted (one-output) decoder, or the nested network with `stream` set.
        stream: `"student"` or `"ta"` for a two-output network; `None` (default) for a one-output model.
        batch_size: Users per call. Defaults to 64.
    """

    def __init__(self, model: keras.Model, stream: str | None = None, batch_size: int = 64) -> None:
        outputs = model.outputs if isinstance(getattr(model, "outputs", None), list) else [None]
        if stream is None and len(outputs) != 1:
            raise ValueError(f"`stream` ('student' or 'ta') is needed for a model with {len(outputs)} outputs")
        if stream is not None and stream not in ("student", "ta"):
            raise ValueError(f"`stream` must be 'student' or 'ta'. Received: stream={stream!r}")
        pick = None if stream is None else ("student", "ta").index(stream)
        self.batch_size = batch_size
        length = model.inputs[0].shape[1] if getattr(model, "inputs", None) else None

        @tf.function(autograph=False, input_signature=[tf.TensorSpec((None, length), tf.int32),
                                                       tf.TensorSpec((None,), tf.int32)])
        def last_logits(inputs: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
            logits = model(inputs, training=False)
            if pick is not None:
                logits = logits[pick]
            return tf.gather(logits, positions, axis=1, batch_dims=1)

        self._last_logits = last_logits

    def __call__(self, examples: NextItemExamples) -> np.ndarray:
        scores = []
        for start in range(0, len(examples), self.batch_size):
            stop = start + self.batch_size
            scores.append(self._last_logits(tf.constant(examples.inputs[start:stop], tf.int32),
                                            tf.constant(examples.lengths[start:stop] - 1, tf.int32)).numpy())
        return np.concatenate(scores)


def next_item_scores(model: keras.Model, examples: NextItemExamples, stream: str | None = None,
                     batch_size: int = 64) -> np.ndarray:
    """`NextItemScorer(model, stream, batch_size)(examples)`: next-item logits `(users, ids)`."""
    return NextItemScorer(model, stream, batch_size)(examples)


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, seen: Sequence[np.ndarray] | None = None,
                    k: int = TOP_K) -> dict[str, float]:
    """HitRate@k (= Recall@k with one relevant item), NDCG@k and MRR of one held-out item per user (keras-rs).

    Every real item id is a candidate, except the items in the user's history (`seen`; the target itself
    stays a candidate). A target outside the vocabulary (`OOV_ID`) cannot be ranked and counts as a miss.
    """
    scores = np.asarray(scores, np.float32)
    targets = np.asarray(targets)
    if scores.ndim != 2 or len(targets) != len(scores):
        raise ValueError(f"`scores` must be (users, ids) with one target per user. Received: scores.shape="
                         f"{scores.shape}, targets.shape={targets.shape}")
    users, ids = scores.shape
    labels = np.zeros((users, ids), np.float32)
    labels[np.arange(users), targets] = 1.0
    labels[:, :NUM_RESERVED_IDS] = 0.0
    mask = np.ones((users, ids), bool)
    mask[:, :NUM_RESERVED_IDS] = False
    if seen is not None:
        for row, history in enumerate(seen):
            mask[row, history] = False
        mask[np.arange(users), targets] = targets >= NUM_RESERVED_IDS
    metrics = {
        f"hit_rate@{k}": keras_rs.metrics.RecallAtK(k=k, seed=0),
        f"ndcg@{k}": keras_rs.metrics.NDCG(k=k, seed=0),
        "mrr": keras_rs.metrics.MeanReciprocalRank(seed=0),
    }
    results = {}
    for name, metric in metrics.items():
        metric.update_state({"labels": labels, "mask": mask}, scores)
        results[name] = float(metric.result())
    return results


def evaluate_next_item(model: keras.Model, examples: NextItemExamples, stream: str | None = None,
                       k: int = TOP_K, exclude_seen: bool = True) -> dict[str, float]:
    """`ranking_metrics` of `model`'s next-item logits on `examples` (see `next_item_scores`)."""
    scores = next_item_scores(model, examples, stream=stream)
    return ranking_metrics(scores, examples.targets, examples.seen if exclude_seen else None, k=k)
