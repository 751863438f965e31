"""Mix'n'Match extraction: every spec's standalone model equals the nested computation for that spec.

The reference for a spec is independent of the extractor: the nested model with the weights that the
spec leaves out set to zero (the TA-only columns of every layer taken at Student width, the wrapped
weights of every dropped TA-only layer), run on its TA stream. With activations that map 0 to 0 and
no normalization across a nested width, that is exactly the sub-model's computation.
"""

import os

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from matta_tf.data import Feature, Label, Schema
from matta_tf.data.preprocessing import FeaturePreprocessor
from matta_tf.extraction import (
    SpecError,
    SubmodelSpec,
    all_specs,
    choosable_layers,
    evaluate_submodels,
    extract_submodel,
    model_cost,
    pareto_frontier,
    plot_quality_vs_size,
    random_specs,
    select_submodel,
    spec_cost,
    wide_narrow_wide_specs,
)
from matta_tf.layers import (
    NestedConcatenate,
    NestedDense,
    NestedEmbedding,
    NestedFeatureCross,
    NestedTransformerBlock,
    TAOnly,
    TransformerBlock,
)
from matta_tf.models.relevance import RelevanceConfig, build_relevance_network

SCHEMA = Schema(
    features=(
        Feature("user_id", "user", "int_id", vocabulary=tuple(range(1, 30))),
        Feature("tags", "item", "multi_categorical", dtype="string", vocabulary=("a", "b", "c")),
    ),
    labels=(Label("label"),),
)
# Six choosable layers (2 embeddings, 2 towers, the head layer, a TA-only block): 64 specs.
CONFIG = RelevanceConfig(embedding_dim=3, tower_units=(5,), head_units=(6,), num_cross_layers=1, ta_only_blocks=1,
                         ta_width_multiplier=2, ta_embedding_multiplier=2)


def _features(n: int = 24, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = {
        "user_id": tf.constant(rng.integers(0, 35, n), tf.int64),
        "tags": tf.ragged.constant([rng.choice(["a", "b", "c", "z"], rng.integers(0, 3)).tolist() for _ in range(n)],
                                   dtype=tf.string, ragged_rank=1),
    }
    return FeaturePreprocessor(SCHEMA)(raw)


def _masked_reference(nested: keras.Model, spec: SubmodelSpec, inputs) -> np.ndarray:
    """The nested model's TA stream with the weights the spec leaves out zeroed."""
    saved = [w.numpy() for w in nested.weights]
    try:
        for layer in nested.layers:
            choice = spec.choices.get(layer.name)
            if choice != "student":
                continue
            if isinstance(layer, NestedDense):
                layer.kernel.assign(np.where(np.arange(layer.ta_units) < layer.student_units, layer.kernel.numpy(), 0))
                layer.bias.assign(np.where(np.arange(layer.ta_units) < layer.student_units, layer.bias.numpy(), 0))
            elif isinstance(layer, NestedEmbedding):
                keep = np.arange(layer.ta_dim) < layer.student_dim
                layer.embeddings.assign(np.where(keep, layer.embeddings.numpy(), 0))
            elif isinstance(layer, NestedTransformerBlock):
                ffn = layer.ffn_intermediate
                keep = np.arange(ffn.ta_units) < ffn.student_units
                ffn.kernel.assign(np.where(keep, ffn.kernel.numpy(), 0))
                ffn.bias.assign(np.where(keep, ffn.bias.numpy(), 0))
            elif isinstance(layer, TAOnly):
                for weight in layer.layer.weights:
                    weight.assign(np.zeros(weight.shape, weight.dtype))
        return nested(inputs)[1].numpy()
    finally:
        for weight, value in zip(nested.weights, saved, strict=True):
            weight.assign(value)


@pytest.fixture(scope="module")
def relevance() -> keras.Model:
    keras.utils.set_random_seed(0)
    nested = build_relevance_network(SCHEMA, CONFIG)
    # Non-zero biases, so that a wrong bias slice cannot hide.
    for weight in nested.weights:
        if weight.path.endswith("bias"):
            weight.assign(np.random.default_rng(1).normal(0, 0.3, weight.shape))
    return nested


def test_every_spec_of_the_relevance_model_matches_the_nested_computation(relevance):
    inputs = _features()
    specs = all_specs(relevance)
    assert len(specs) == 2 ** len(choosable_layers(relevance)) == 64
    extracted = 0
    for spec in specs:
        kept_after_narrow = spec.choices["ta_block_0"] == "ta" and spec.choices["head_0"] == "student"
        if kept_after_narrow:
            with pytest.raises(SpecError, match="TA-only layer 'ta_block_0' is kept"):
                extract_submodel(relevance, spec)
            continue
        model = extract_submodel(relevance, spec)
        np.testing.assert_allclose(model(inputs).numpy(), _masked_reference(relevance, spec, inputs), atol=1e-5,
                                   err_msg=spec.name)
        extracted += 1
    assert extracted == 48


def test_extracted_models_are_plain_keras_and_survive_saving(relevance, tmp_path):
    inputs = _features(seed=2)
    mixed = SubmodelSpec.uniform(relevance, "student").replace(user_id_embedding="ta", user_tower_0="ta", name="mix")
    for spec in (SubmodelSpec.uniform(relevance, "student"), SubmodelSpec.uniform(relevance, "ta"), mixed):
        model = extract_submodel(relevance, spec)
        classes = {layer.__class__.__module__.removeprefix("matta_tf.").split(".")[0] for layer in model.layers}
        assert classes <= {"keras", "keras_rs", "models"}, classes  # PaddingWeights is the model's own plain layer
        path = tmp_path / f"{spec.name}.keras"
        model.save(path)
        restored = keras.saving.load_model(path)
        np.testing.assert_allclose(restored(inputs).numpy(), model(inputs).numpy(), atol=1e-6)
        np.testing.assert_allclose(restored(inputs).numpy(), _masked_reference(relevance, spec, inputs), atol=1e-5)


def test_student_and_ta_specs_have_plain_student_and_ta_parameter_counts():
    config = RelevanceConfig(embedding_dim=4, tower_units=(8, 6), head_units=(8,), num_cross_layers=2)
    nested = build_relevance_network(SCHEMA, config)
    student = extract_submodel(nested, SubmodelSpec.uniform(nested, "student"))
    ta = extract_submodel(nested, SubmodelSpec.uniform(nested, "ta"))
    assert student.count_params() == build_relevance_network(SCHEMA, config.student_config()).count_params()
    assert ta.count_params() == build_relevance_network(SCHEMA, config.ta_config()).count_params()
    assert ta.count_params() == nested.count_params()
    assert spec_cost(nested, SubmodelSpec.uniform(nested, "student")).parameters == student.count_params()
    assert spec_cost(nested, SubmodelSpec.uniform(nested, "student")) == model_cost(student)


def test_flops_follow_the_dense_formula():
    inputs = keras.Input((7,))
    nested_model = keras.Model(inputs, list(NestedDense(1, 1)(NestedDense(4, 10, activation="relu")(inputs))))
    student = spec_cost(nested_model, SubmodelSpec.uniform(nested_model, "student"))
    ta = spec_cost(nested_model, SubmodelSpec.uniform(nested_model, "ta"))
    assert (student.parameters, student.flops_per_example) == (7 * 4 + 4 + 4 + 1, 2 * 7 * 4 + 2 * 4)
    assert (ta.parameters, ta.flops_per_example) == (7 * 10 + 10 + 10 + 1, 2 * 7 * 10 + 2 * 10)


def _transformer_stack(num_blocks: int = 4, extras: tuple[int, ...] = (1, 2)) -> keras.Model:
    tokens = keras.Input((6,), dtype="int32")
    x = NestedEmbedding(40, 8, 8, name="tokens")(tokens)
    for index in range(num_blocks):
        x = NestedTransformerBlock(2, 4, 12, 24, name=f"block_{index}")(x)
        if index in extras:
            block = TransformerBlock(2, 4, 16, name=f"extra_{index}_block")
            x = TAOnly(block, residual=False, name=f"extra_{index}")(x)
    pooled = [keras.layers.GlobalAveragePooling1D()(stream) for stream in x]
    return keras.Model(tokens, list(NestedDense(3, 3, name="logits")(tuple(pooled))))


def test_every_spec_of_a_transformer_stack_matches_the_nested_computation():
    keras.utils.set_random_seed(3)
    stack = _transformer_stack(num_blocks=3, extras=(1,))
    inputs = np.random.default_rng(0).integers(0, 40, (5, 6))
    specs = all_specs(stack)
    assert len(specs) == 2 ** 4
    for spec in specs:
        model = extract_submodel(stack, spec)
        np.testing.assert_allclose(model(inputs).numpy(), _masked_reference(stack, spec, inputs), atol=1e-5,
                                   err_msg=spec.name)


def test_wide_narrow_wide_family():
    stack = _transformer_stack()
    blocks = ["block_0", "block_1,extra_1", "block_2,extra_2", "block_3"]
    specs = wide_narrow_wide_specs(stack, blocks)
    assert [s.name for s in specs] == ["wnw-0", "wnw-2", "wnw-4"]
    assert specs[0].choices == SubmodelSpec.uniform(stack, "student").choices
    assert specs[2].choices == SubmodelSpec.uniform(stack, "ta").choices
    assert [specs[1].choices[n] for n in ("block_0", "block_1", "extra_1", "block_2", "block_3")] == [
        "ta", "student", "student", "student", "ta"]
    sizes = [spec_cost(stack, s).parameters for s in specs]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    with pytest.raises(SpecError, match="not a choosable layer"):
        wide_narrow_wide_specs(stack, ["block_0", "nope"])
    with pytest.raises(SpecError, match="even numbers"):
        wide_narrow_wide_specs(stack, blocks, ks=[1])


def test_spec_validation_names_the_layer(relevance):
    student = SubmodelSpec.uniform(relevance, "student")
    with pytest.raises(SpecError, match="names layer 'cross_9'"):
        student.replace(cross_9="ta").validate(relevance)
    with pytest.raises(SpecError, match="gives no choice for layer 'head_0'"):
        SubmodelSpec({k: v for k, v in student.choices.items() if k != "head_0"}).validate(relevance)
    with pytest.raises(SpecError, match="untrained width"):
        student.replace(head_0=12)
    assert SubmodelSpec.from_json(student.to_json()) == student
    specs = random_specs(relevance, 5, seed=1)
    assert len({s.to_json() for s in specs}) == 7 and specs[0].name == "student"


def test_evaluate_pareto_plot_and_select(relevance, tmp_path):
    labels = np.random.default_rng(0).integers(0, 2, 24)
    dataset = tf.data.Dataset.from_tensor_slices((dict(_features()), labels)).batch(8)
    specs = [SubmodelSpec.uniform(relevance, "student"), SubmodelSpec.uniform(relevance, "ta"),
             SubmodelSpec.uniform(relevance, "ta").replace(head_0="student", name="bad")]
    table = evaluate_submodels(relevance, specs, dataset, progress=False)
    assert list(table["spec"]) == ["student", "ta", "bad"]
    assert "is kept" in table.loc[2, "error"] and np.isnan(table.loc[2, "auc"])
    assert table.loc[0, "parameters"] < table.loc[1, "parameters"]
    assert (table.loc[:1, "latency_ms"] > 0).all()
    # The evaluated AUROC is the extracted model's AUROC on the dataset.
    student_logits = extract_submodel(relevance, specs[0])(_features()).numpy().ravel()
    scores, positive = np.asarray(student_logits).reshape(-1), np.asarray(labels).reshape(-1) >= 0.5
    pairs = scores[positive][:, None] - scores[~positive][None, :]  # the exact AUROC, pair by pair
    assert table.loc[0, "auc"] == pytest.approx((pairs > 0).mean() + 0.5 * (pairs == 0).mean(), abs=1e-9)
    path = plot_quality_vs_size(table, str(tmp_path / "quality.png"), baseline=0.5)
    assert os.path.getsize(path) > 10_000
    budget = table.loc[0, "parameters"]
    assert select_submodel(table, max_parameters=budget).name == "student"
    with pytest.raises(SpecError, match="no evaluated sub-model fits"):
        select_submodel(table, max_parameters=1)


def test_pareto_frontier():
    table = pd.DataFrame({"parameters": [1, 2, 3, 4, 5], "auc": [0.6, 0.58, 0.7, 0.69, 0.75]})
    assert pareto_frontier(table, "parameters", "auc").tolist() == [True, False, True, False, True]


class MyRanker(keras.Model):
    """A subclassed nested network built from matta-tf layers (with keras.ops on each stream)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.user = NestedEmbedding(30, 3, 6, name="user_embedding")
        self.item = NestedEmbedding(20, 4, 8, name="item_embedding")
        self.concat = NestedConcatenate(name="concat")
        self.hidden = NestedDense(5, 10, name="hidden")
        self.cross = NestedFeatureCross(name="cross")
        self.extra = TAOnly(keras.layers.Dense(10, activation="relu"), name="extra")
        self.logit = NestedDense(1, 1, name="logit")

    def call(self, inputs):
        x = self.concat([self.user(inputs["user"]), self.item(inputs["item"])])
        h = tuple(keras.ops.relu(stream) for stream in self.hidden(x))
        h = self.extra(self.cross(h))
        return list(self.logit(h))


def test_subclassed_nested_network_extracts_its_student_and_ta():
    from matta_tf.extraction import functional_view

    rng = np.random.default_rng(3)
    data = {"user": rng.integers(0, 30, 7).astype("int32"), "item": rng.integers(0, 20, 7).astype("int32")}
    ranker = MyRanker(name="my_ranker")
    y_student, y_ta = ranker(data)
    for weight in ranker.weights:
        weight.assign(rng.normal(0, 0.4, weight.shape))
    y_student, y_ta = ranker(data)
    with pytest.raises(SpecError, match="'my_ranker' .* is a subclassed model.*functional_view"):
        all_specs(ranker)
    inputs = {name: keras.Input((), dtype="int32", name=name) for name in ("user", "item")}
    view = functional_view(ranker, inputs)
    assert [layer.name for layer in choosable_layers(view)] == ["user_embedding", "item_embedding", "hidden", "extra"]
    assert len(all_specs(view)) == 16
    for choice, expected in (("student", y_student), ("ta", y_ta)):
        spec = SubmodelSpec.uniform(view, choice)
        plain = extract_submodel(view, spec)
        np.testing.assert_allclose(plain(data).numpy(), keras.ops.convert_to_numpy(expected), atol=1e-5)
        assert spec_cost(view, spec) == model_cost(plain)


def test_random_specs_are_extractable(relevance):
    from matta_tf.extraction import is_extractable

    specs = random_specs(relevance, 4, seed=0)
    assert len({s.to_json() for s in specs}) == 6
    for spec in specs[2:]:
        extract_submodel(relevance, spec)  # raises SpecError for a spec that cannot be extracted
    unfiltered = random_specs(relevance, 30, seed=0, extractable_only=False)
    assert not all(is_extractable(relevance, spec) for spec in unfiltered)


def test_a_subclassed_nested_sub_model_is_named():
    class Tower(keras.Model):
        def __init__(self):
            super().__init__(name="tower")
            self.dense = NestedDense(2, 4, name="tower_dense")

        def call(self, x):
            return self.dense(x)

    inputs = keras.Input((3,))
    tower = Tower()
    nested = keras.Model(inputs, list(NestedDense(1, 1, name="logit")(tower(inputs))))
    with pytest.raises(SpecError, match="subclassed model 'tower' .*functional_view"):
        extract_submodel(nested, SubmodelSpec({}, name="student"))


def _selection_table() -> pd.DataFrame:
    specs = [SubmodelSpec({"head_0": "student"}, name="small"), SubmodelSpec({"head_0": "ta"}, name="large")]
    return pd.DataFrame({"spec": [s.name for s in specs], "spec_json": [s.to_json() for s in specs],
                         "parameters": [10, 100], "auc": [0.6, 0.7], "auc_loss": [0.4, 0.3],
                         "error": [None, None]})


def test_select_submodel_names_a_missing_quality_or_budget_column():
    table = _selection_table()
    assert select_submodel(table).name == "large"
    assert select_submodel(table, max_parameters=50).name == "small"
    assert select_submodel(table, quality="auc_loss", higher_is_better=False).name == "large"
    with pytest.raises(SpecError, match=r"no quality column 'quality'\. Its columns: spec, spec_json, "
                                        r"parameters, auc, auc_loss, error"):
        select_submodel(table, quality="quality")
    with pytest.raises(SpecError, match=r"no budget column 'latency_ms'\. Its columns: spec, spec_json"):
        select_submodel(table, max_latency_ms=5.0)
    # A budget column that is absent matters only when that budget is asked for.
    assert select_submodel(table, max_parameters=1000).name == "large"
    with pytest.raises(SpecError, match="no spec column 'spec_json'"):
        select_submodel(table.drop(columns="spec_json"))
    # Every spec failed to evaluate: the table has no metric columns, and the error says why.
    failed = pd.DataFrame({"spec": ["bad"], "spec_json": [table.loc[0, "spec_json"]], "error": ["is kept"]})
    with pytest.raises(SpecError, match=r"no quality column 'auc' \(every row of the table failed"):
        select_submodel(failed)
    # A real empty budget keeps its own message.
    with pytest.raises(SpecError, match="no evaluated sub-model fits the budget: max_parameters=1,"):
        select_submodel(table, max_parameters=1)


def test_exact_auroc_equals_the_pairwise_definition_with_ties_and_binary_metrics_uses_it():
    from matta_tf.extraction import binary_metrics, exact_auroc

    rng = np.random.default_rng(3)
    for scores in (rng.normal(size=300), np.round(rng.normal(size=300), 1), np.array([40.0, 50.0, 60.0, 45.0])):
        positive = rng.random(len(scores)) < 0.4
        positive[:2] = [True, False]
        # The definition: every (positive, negative) pair, a win counting 1 and a tie one half.
        wins = (scores[positive][:, None] > scores[~positive][None, :]).mean()
        ties = (scores[positive][:, None] == scores[~positive][None, :]).mean()
        assert exact_auroc(positive, scores) == pytest.approx(wins + 0.5 * ties, abs=1e-12)
    # Logits past the sigmoid's float resolution still rank: [40, 50, 60] would all be probability 1.0.
    assert exact_auroc([False, True, True], [40.0, 50.0, 60.0]) == 1.0
    metrics = binary_metrics(np.array([0.2, 0.9, 0.7, 0.1]), np.array([-1.0, 2.0, 0.5, 0.5]))
    assert metrics["auc"] == pytest.approx(3.5 / 4) and metrics["auc_loss"] == pytest.approx(0.5 / 4)  # one tie
    assert np.isnan(exact_auroc([True, True], [0.1, 0.2]))
