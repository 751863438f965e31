"""The nested sequential recommender: histories, causality, exact extraction, GPT-2 Medium shapes, training.

References are independent of the code under test: leave-last-out and windows are checked by hand on a
toy frame, the decoder against a NumPy forward pass written from the paper's formulas (pre-norm GPT-2
block, causal softmax attention, exact GELU, tied output), the loss against a NumPy masked
cross-entropy, and the ranking metrics against ranks counted in NumPy.
"""

import math

import keras
import numpy as np
import pandas as pd
import pytest
from scipy.special import erf

from matta_tf.data.schema import Label
from matta_tf.data.sequences import (
    OOV_ID,
    NextItemWindows,
    leave_last_out,
    prepare_next_item_data,
    training_windows,
    user_histories,
)
from matta_tf.extraction import SubmodelSpec, extract_submodel, spec_cost
from matta_tf.layers import NestedTransformerBlock, TAOnly, TransformerBlock
from matta_tf.models.relevance import ConfigError
from matta_tf.models.sequential import (
    NextItemMatTAModel,
    SequentialConfig,
    block_parameters,
    build_sequential_network,
    next_item_dataset,
    next_item_scores,
    non_embedding_parameters,
    parameter_counts,
    ranking_metrics,
    train_next_item,
    wide_narrow_wide,
)

TOLERANCE = 2e-5
# Student 6 blocks (FFN 8), TA 9 blocks (FFN 20): TA-only blocks after blocks 1, 3 and 5.
TINY = SequentialConfig(vocabulary_size=23, max_length=7, model_dim=8, num_heads=2, student_layers=6,
                        student_ffn_dim=8, ta_layers=9, ta_ffn_dim=20, dropout=0.0)


# ---- histories --------------------------------------------------------------------------------------------
def _toy_ratings() -> pd.DataFrame:
    # user 1: 30 and 20 share a timestamp (ordered by item id); user 2 has two items only; item 90 only
    # appears as user 3's test item, so it is outside the training vocabulary.
    rows = [
        (1, 10, 5), (1, 30, 3), (1, 20, 3), (1, 40, 9), (1, 50, 7), (1, 60, 11),
        (2, 10, 1), (2, 20, 2),
        (3, 20, 1), (3, 10, 2), (3, 30, 4), (3, 90, 8),
    ]
    return pd.DataFrame(rows, columns=["userId", "movieId", "timestamp"]).sample(frac=1.0, random_state=0)


def test_histories_are_time_ordered_and_split_leave_last_out():
    histories = user_histories(_toy_ratings())
    assert {u: h.tolist() for u, h in histories.items()} == {
        1: [20, 30, 10, 50, 40, 60], 2: [10, 20], 3: [20, 10, 30, 90]}
    split = leave_last_out(histories)
    assert {u: h.tolist() for u, h in split["train"].items()} == {1: [20, 30, 10, 50], 2: [10, 20], 3: [20, 10]}
    assert split["validation"] == {1: 40, 3: 30} and split["test"] == {1: 60, 3: 90}

    data = prepare_next_item_data(_toy_ratings(), max_length=3)
    # Training counts: 20 x3, 10 x3, 30 x1, 50 x1 -> ties broken by the smaller id.
    assert data.vocabulary == (10, 20, 30, 50)
    ids = {10: 2, 20: 3, 30: 4, 50: 5}
    assert data.num_ids == 6
    np.testing.assert_array_equal(data.validation.users, [1, 3])
    # Validation reads the training history only (the last 3 ids), right-padded.
    np.testing.assert_array_equal(data.validation.inputs, [[ids[30], ids[10], ids[50]], [ids[20], ids[10], 0]])
    np.testing.assert_array_equal(data.validation.lengths, [3, 2])
    np.testing.assert_array_equal(data.validation.targets, [OOV_ID, ids[30]])  # 40 was never trained on
    # Test also reads the validation item; `seen` is the whole history, not only the last 3.
    np.testing.assert_array_equal(data.test.inputs, [[ids[10], ids[50], OOV_ID], [ids[20], ids[10], ids[30]]])
    np.testing.assert_array_equal(data.test.targets, [OOV_ID, OOV_ID])
    assert sorted(data.test.seen[0].tolist()) == [OOV_ID, 2, 3, 4, 5]
    # Training windows: user 1 [20 30 10 50] -> one window; user 2 [10 20]; user 3 [20 10].
    expected_inputs = [[ids[20], ids[30], ids[10]], [ids[10], 0, 0], [ids[20], 0, 0]]
    expected_targets = [[ids[30], ids[10], ids[50]], [ids[20], 0, 0], [ids[10], 0, 0]]
    np.testing.assert_array_equal(data.train.inputs, expected_inputs)
    np.testing.assert_array_equal(data.train.targets, expected_targets)
    np.testing.assert_array_equal(data.train.weights, np.asarray(expected_targets) > 0)


def test_training_windows_make_every_later_item_a_target_once():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(2, 50, size=n) for n in (1, 2, 5, 6, 7, 13)]
    windows = training_windows(sequences, max_length=5)
    # n items give n - 1 targets, at most 5 per window.
    assert windows.inputs.shape == windows.targets.shape == (0 + 1 + 1 + 1 + 2 + 3, 5)
    targets = windows.targets[windows.weights > 0]
    expected = np.concatenate([s[1:] for s in sequences])
    assert sorted(targets.tolist()) == sorted(expected.tolist())
    for row_inputs, row_targets, row_weights in zip(windows.inputs, windows.targets, windows.weights, strict=True):
        real = int(row_weights.sum())
        # Real positions first (right padding); the target is the next input.
        assert (row_inputs[:real] > 0).all() and (row_inputs[real:] == 0).all()
        np.testing.assert_array_equal(row_targets[: real - 1], row_inputs[1:real])
    oov = training_windows([np.array([2, OOV_ID, 3])], max_length=4)
    np.testing.assert_array_equal(oov.weights, [[0, 1, 0, 0]])


def test_bad_input_names_the_field_and_value():
    with pytest.raises(ConfigError, match=r"`student_layers` must be an integer >= 1. Received: student_layers=-1"):
        SequentialConfig(vocabulary_size=10, student_layers=-1)
    with pytest.raises(ConfigError, match=r"`ta_layers` must be >= `student_layers`.*ta_layers=3"):
        SequentialConfig(vocabulary_size=10, student_layers=4, ta_layers=3)
    with pytest.raises(ConfigError, match=r"`ta_ffn_dim` must be >= `student_ffn_dim`"):
        SequentialConfig(vocabulary_size=10, student_ffn_dim=64, ta_ffn_dim=32)
    with pytest.raises(ConfigError, match=r"multiple of `num_heads`. Received: model_dim=10, num_heads=4"):
        SequentialConfig(vocabulary_size=10, model_dim=10)
    with pytest.raises(ConfigError, match=r"Received: vocabulary_size=2"):
        SequentialConfig(vocabulary_size=2)
    with pytest.raises(ConfigError, match=r"Received: dropout=1.5"):
        SequentialConfig(vocabulary_size=10, dropout=1.5)
    with pytest.raises(ConfigError, match=r"Received: normalization='batch_norm'"):
        SequentialConfig(vocabulary_size=10, normalization="batch_norm")
    with pytest.raises(ConfigError, match=r"Received: width_divisor=3"):
        SequentialConfig.gpt2_medium(width_divisor=3)
    with pytest.raises(ConfigError, match=r"unknown field 'layers'"):
        SequentialConfig.from_dict({"vocabulary_size": 10, "layers": 2})
    with pytest.raises(ConfigError, match=r"every group to hold a choice"):
        config = SequentialConfig(vocabulary_size=10, max_length=4, model_dim=4, num_heads=1, student_layers=2,
                                  student_ffn_dim=4, ta_layers=2, ta_ffn_dim=4)
        wide_narrow_wide(build_sequential_network(config), config)
    with pytest.raises(ValueError, match=r"Received: max_length=0"):
        prepare_next_item_data(_toy_ratings(), max_length=0)
    with pytest.raises(ValueError, match=r"Received: min_item_count=0"):
        prepare_next_item_data(_toy_ratings(), min_item_count=0)
    with pytest.raises(ValueError, match=r"Received: item='itemId'"):
        user_histories(_toy_ratings(), item="itemId")


# ---- GPT-2 Medium ------------------------------------------------------------------------------------------
def test_gpt2_medium_preset_shapes_and_parameter_counts():
    config = SequentialConfig.gpt2_medium()
    assert (config.model_dim, config.num_heads, config.head_dim) == (1024, 16, 64)
    assert (config.student_layers, config.student_ffn_dim, config.ta_layers, config.ta_ffn_dim) == (24, 4096, 36, 8192)
    assert config.ta_only_after() == (0, 1) * 12
    counts = parameter_counts(config)
    d = 1024
    assert counts.student_non_embedding == 24 * (12 * d * d + 13 * d) + 2 * d == 302_311_424
    assert counts.ta_non_embedding == 36 * (20 * d * d + 9 * d + 8192) + 2 * d == 755_603_456
    # With GPT-2's 50,257 tokens and 1,024 positions the Student is GPT-2 Medium's 354,823,168 parameters.
    assert counts.student == 354_823_168



@pytest.mark.slow  # builds and extracts the 36-block network (15-50 s); the analytic counts stay in the default run
def test_gpt2_medium_preset_built_at_a_64th_of_its_width_has_the_analytic_counts():
    # The same preset at 1/64 width: the analytic counts are the built models' counts.
    tiny = SequentialConfig.gpt2_medium(vocabulary_size=30, max_length=6, width_divisor=64)
    widths = (tiny.model_dim, tiny.num_heads, tiny.head_dim, tiny.student_ffn_dim, tiny.ta_ffn_dim)
    assert widths == (16, 16, 1, 64, 128)
    network = build_sequential_network(tiny)
    nested = [layer for layer in network.layers if isinstance(layer, NestedTransformerBlock)]
    ta_only = [layer for layer in network.layers if isinstance(layer, TAOnly)]
    assert len(nested) == 24 and len(ta_only) == 12
    widths = {(b.student_num_heads, b.ta_num_heads, b.student_ffn_dim, b.ta_ffn_dim) for b in nested}
    assert widths == {(16, 16, 64, 128)}
    assert {(b.layer.num_heads, b.layer.ffn_dim) for b in ta_only} == {(16, 128)}
    counts = parameter_counts(tiny)
    assert network.count_params() == counts.ta
    assert non_embedding_parameters(network) == counts.ta_non_embedding
    for choice, blocks, ffn_dim, expected in (("student", 24, 64, counts.student_non_embedding),
                                              ("ta", 36, 128, counts.ta_non_embedding)):
        spec = SubmodelSpec.uniform(network, choice)
        extracted = extract_submodel(network, spec)
        plain_blocks = [layer for layer in extracted.layers if isinstance(layer, TransformerBlock)]
        assert len(plain_blocks) == blocks and {b.ffn_dim for b in plain_blocks} == {ffn_dim}
        assert non_embedding_parameters(extracted) == expected
        assert spec_cost(network, spec).parameters == extracted.count_params() == counts.embedding + expected
        assert extracted.output.shape == (None, 6, 30)


# ---- the decoder -----------------------------------------------------------------------------------------
def _randomized(config: SequentialConfig, seed: int = 0) -> keras.Model:
    """A network with non-trivial norms and biases, so that a wrong slice or a skipped term shows."""
    keras.utils.set_random_seed(seed)
    network = build_sequential_network(config)
    rng = np.random.default_rng(seed)
    for weight in network.weights:
        name = weight.path.split("/")[-1]
        if name in ("bias", "beta"):
            weight.assign(rng.normal(0, 0.2, weight.shape))
        elif name == "gamma":
            weight.assign(rng.uniform(0.5, 1.5, weight.shape))
        elif name in ("embeddings", "positions"):
            weight.assign(rng.normal(0, 0.5, weight.shape))
    return network


def _ids(config: SequentialConfig, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocabulary_size, (batch, config.max_length)).astype("int32")


def test_causal_masking_no_future_leakage_in_either_stream():
    network = _randomized(TINY)
    ids = _ids(TINY, 3, seed=1)
    outputs = [o.numpy() for o in network(ids)]
    extracted = extract_submodel(network, wide_narrow_wide(network, TINY)[1])
    for t in range(TINY.max_length - 1):
        changed = ids.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + np.arange(TINY.max_length - t - 1)) % TINY.vocabulary_size
        for before, after in zip(outputs, network(changed), strict=True):
            np.testing.assert_allclose(after.numpy()[:, : t + 1], before[:, : t + 1], atol=1e-6)
            # The changed positions do move, so the check above could fail.
            assert np.abs(after.numpy()[:, t + 1] - before[:, t + 1]).max() > 1e-3
        np.testing.assert_allclose(extracted(changed).numpy()[:, : t + 1], extracted(ids).numpy()[:, : t + 1],
                                   atol=1e-6)


def _layer_norm(x, gamma, beta, epsilon=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + epsilon) * gamma + beta


def _numpy_block(x, weights, num_heads):
    """Pre-norm GPT-2 block: `x + Attn(LN1 x)`, then `+ W2 gelu(W1 LN2 x + b1) + b2`, causal softmax attention."""
    batch, n, d = x.shape
    head_dim = d // num_heads
    h = _layer_norm(x, *weights["norm_1"])

    def heads(w, b):
        return (h @ w + b).reshape(batch, n, num_heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = heads(*weights["query"]), heads(*weights["key"]), heads(*weights["value"])
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    attention = np.exp(scores - scores.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    attended = (attention @ v).transpose(0, 2, 1, 3).reshape(batch, n, d)
    x = x + attended @ weights["output"][0] + weights["output"][1]
    hidden = _layer_norm(x, *weights["norm_2"]) @ weights["ffn_1"][0] + weights["ffn_1"][1]
    hidden = 0.5 * hidden * (1.0 + erf(hidden / math.sqrt(2.0)))
    return x + hidden @ weights["ffn_2"][0] + weights["ffn_2"][1]


def _nested_block_weights(block: NestedTransformerBlock, ffn_dim: int) -> dict:
    """The weights a nested block's stream of FFN width `ffn_dim` uses: the FFN's leading hidden units."""
    def dense(layer, columns=None, rows=None):
        return layer.kernel.numpy()[:rows, :columns], layer.bias.numpy()[:columns]

    def norm(layer):
        return layer.gamma.numpy(), layer.beta.numpy()

    return {"norm_1": norm(block.attention_norm), "query": dense(block.query), "key": dense(block.key),
            "value": dense(block.value), "output": dense(block.attention_output), "norm_2": norm(block.ffn_norm),
            "ffn_1": dense(block.ffn_intermediate, columns=ffn_dim), "ffn_2": dense(block.ffn_output, rows=ffn_dim)}


def _plain_block_weights(block: TransformerBlock) -> dict:
    attention = block.attention

    def projection(dense):
        kernel, bias = dense.kernel.numpy(), dense.bias.numpy()
        return kernel.reshape(kernel.shape[0], -1), bias.reshape(-1)

    output_kernel = attention.output_dense.kernel.numpy()
    return {"norm_1": (block.attention_norm.gamma.numpy(), block.attention_norm.beta.numpy()),
            "query": projection(attention.query_dense), "key": projection(attention.key_dense),
            "value": projection(attention.value_dense),
            "output": (output_kernel.reshape(-1, output_kernel.shape[-1]), attention.output_dense.bias.numpy()),
            "norm_2": (block.ffn_norm.gamma.numpy(), block.ffn_norm.beta.numpy()),
            "ffn_1": (block.ffn_intermediate.kernel.numpy(), block.ffn_intermediate.bias.numpy()),
            "ffn_2": (block.ffn_output.kernel.numpy(), block.ffn_output.bias.numpy())}


def _numpy_decoder(network: keras.Model, config: SequentialConfig, choices: dict, ids: np.ndarray) -> np.ndarray:
    """The sub-model `choices` describes, computed in NumPy from the nested network's weights."""
    table = network.get_layer("item_embedding").embeddings.numpy()
    x = table[ids] + network.get_layer("position_embedding").positions.numpy()[: ids.shape[1]]
    ta_index = 0
    for index, extra in enumerate(config.ta_only_after()):
        wide = choices[f"block_{index}"] == "ta"
        ffn_dim = config.ta_ffn_dim if wide else config.student_ffn_dim
        x = _numpy_block(x, _nested_block_weights(network.get_layer(f"block_{index}"), ffn_dim), config.num_heads)
        for _ in range(extra):
            name = f"ta_block_{ta_index}"
            if choices[name] == "ta":
                x = _numpy_block(x, _plain_block_weights(network.get_layer(name).layer), config.num_heads)
            ta_index += 1
    final = network.get_layer("final_norm")
    return _layer_norm(x, final.gamma.numpy(), final.beta.numpy()) @ table.T


def test_wide_narrow_wide_extraction_is_exact_for_every_k(tmp_path):
    network = _randomized(TINY)
    ids = _ids(TINY, 4, seed=2)
    specs = wide_narrow_wide(network, TINY)
    assert [spec.name for spec in specs] == ["wnw-0", "wnw-2", "wnw-4", "wnw-6"]
    # K = 2: the lowest and the top group wide, i.e. blocks 0 and 5 and the TA-only block after block 5.
    wide = sorted(name for name, choice in specs[1].choices.items() if choice == "ta")
    assert wide == ["block_0", "block_5", "ta_block_2"]
    student, ta = (o.numpy() for o in network(ids))
    counts = parameter_counts(TINY)
    sizes = []
    for spec in specs:
        extracted = extract_submodel(network, spec)
        output = extracted(ids).numpy()
        np.testing.assert_allclose(output, _numpy_decoder(network, TINY, spec.choices, ids), atol=TOLERANCE,
                                   err_msg=spec.name)
        # One item table, read for the inputs and (transposed) for the logits.
        tables = [layer for layer in extracted.layers if isinstance(layer, keras.layers.Embedding)]
        assert len(tables) == 1 and len(tables[0].weights) == 1
        ta_only_kept = sum(choice == "ta" for name, choice in spec.choices.items() if name.startswith("ta_block"))
        wide_blocks = sum(choice == "ta" for name, choice in spec.choices.items() if name.startswith("block"))
        student_block, ta_block = (block_parameters(TINY, f) for f in (TINY.student_ffn_dim, TINY.ta_ffn_dim))
        expected = counts.student_non_embedding + wide_blocks * (ta_block - student_block) + ta_only_kept * ta_block
        assert non_embedding_parameters(extracted) == expected
        sizes.append(expected)
        if spec is specs[0]:
            np.testing.assert_allclose(output, student, atol=TOLERANCE)
        if spec is specs[-1]:
            np.testing.assert_allclose(output, ta, atol=TOLERANCE)
            path = tmp_path / "ta.keras"
            extracted.save(path)
            np.testing.assert_allclose(keras.saving.load_model(path)(ids).numpy(), output, atol=1e-6)
    assert sizes == sorted(sizes) and sizes[-1] == counts.ta_non_embedding


# ---- training and evaluation --------------------------------------------------------------------------------
def _cyclic_data(config: SequentialConfig, users: int = 48):
    """Histories of 12 steps through a cycle of all ids from a random start: the next item is predictable."""
    rng = np.random.default_rng(0)
    rows = []
    span = config.vocabulary_size - 2
    for user in range(users):
        start = rng.integers(0, span)
        for step in range(12):
            rows.append((user, 100 + (start + step) % span, step))
    return prepare_next_item_data(pd.DataFrame(rows, columns=["userId", "movieId", "timestamp"]),
                                  max_length=config.max_length)


def test_loss_is_the_mean_over_real_positions():
    config = SequentialConfig(vocabulary_size=11, max_length=5, model_dim=8, num_heads=2, student_layers=1,
                              student_ffn_dim=4, ta_layers=2, ta_ffn_dim=8, dropout=0.0)
    network = _randomized(config)
    rng = np.random.default_rng(3)
    inputs = rng.integers(2, 11, (4, 5)).astype("int32")
    targets = rng.integers(2, 11, (4, 5)).astype("int32")
    weights = (rng.random((4, 5)) > 0.3).astype("float32")
    teacher = rng.dirichlet(np.ones(11), (4, 5)).astype("float32")
    inputs_batch, targets_batch, weights_batch = next(iter(next_item_dataset(
        NextItemWindows(inputs, targets, weights), batch_size=4, shuffle=False)))
    np.testing.assert_allclose(weights_batch.numpy().sum(), 20.0, rtol=1e-6)
    student, ta = (o.numpy().astype("float64") for o in network(inputs))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    mask = weights > 0
    for label, y in ((None, np.eye(11)[targets]),
                     (Label("next_item", source="teacher", task="multiclass", num_classes=11), teacher)):
        model = NextItemMatTAModel(network, label=label, loss_weights=(1.0, 0.5, 2.0))
        labels = targets_batch if label is None else teacher
        y_pred = model(inputs_batch)
        loss = float(model.compute_loss(y=labels, y_pred=y_pred, sample_weight=weights_batch))
        p_ta = np.exp(log_softmax(ta))
        per_position = (-(y * log_softmax(student)).sum(-1) - 0.5 * (y * log_softmax(ta)).sum(-1)
                        - 2.0 * (p_ta * log_softmax(student)).sum(-1))
        assert loss == pytest.approx(per_position[mask].mean(), rel=1e-5)


def test_matta_training_learns_next_items_and_ranking_is_exact():
    config = SequentialConfig(vocabulary_size=42, max_length=6, model_dim=16, num_heads=2, student_layers=2,
                              student_ffn_dim=16, ta_layers=3, ta_ffn_dim=32, dropout=0.0)
    data = _cyclic_data(config)
    keras.utils.set_random_seed(0)
    network = build_sequential_network(config)
    held_out = data.validation
    before = {stream: ranking_metrics(next_item_scores(network, held_out, stream), held_out.targets, held_out.seen)
              for stream in ("student", "ta")}
    _, history = train_next_item(network, data, mode="matta", epochs=8, batch_size=16, learning_rate=1e-2,
                                 jit_compile=False, verbose=0)
    assert history["student_loss"][-1] < 0.5 * history["student_loss"][0]
    assert history["ta_loss"][-1] < 0.5 * history["ta_loss"][0]
    assert {"distillation_loss", "churn", "student_hit_rate_at_10", "val_student_ndcg@10", "val_ta_mrr"} <= set(history)
    for stream in ("student", "ta"):
        after = history[f"val_{stream}_mrr"][-1]
        assert after > 0.8 and after > before[stream]["mrr"] + 0.5

    # Scores are read at each user's last real position; the metrics are ranks counted in NumPy.
    scores = next_item_scores(network, data.test, stream="ta")
    full = network(data.test.inputs)[1].numpy()
    np.testing.assert_allclose(scores, full[np.arange(len(full)), data.test.lengths - 1], atol=1e-5)
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(40, 30)).astype("float32")
    targets = rng.integers(2, 30, 40)
    targets[:3] = OOV_ID
    seen = [rng.choice(np.arange(2, 30), 5, replace=False) for _ in range(40)]
    seen[10] = np.append(seen[10], targets[10])  # a re-consumed target stays a candidate
    reference = {"hit_rate@10": [], "ndcg@10": [], "mrr": []}
    for row in range(40):
        candidate = np.ones(30, bool)
        candidate[:2] = False
        candidate[seen[row]] = False
        if targets[row] == OOV_ID:
            rank = np.inf
        else:
            candidate[targets[row]] = True
            rank = 1 + np.sum(candidate & (scores[row] > scores[row, targets[row]]))
        reference["hit_rate@10"].append(float(rank <= 10))
        reference["ndcg@10"].append(1.0 / math.log2(rank + 1) if rank <= 10 else 0.0)
        reference["mrr"].append(1.0 / rank)
    metrics = ranking_metrics(scores, targets, seen)
    for name, values in reference.items():
        assert metrics[name] == pytest.approx(np.mean(values), abs=1e-6), name
    assert ranking_metrics(scores, targets)["mrr"] <= metrics["mrr"]
