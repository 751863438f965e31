"""Synthetic events: deterministic per seed, streamed in chunks, labels that follow the hidden truth."""

import numpy as np
import pytest

from matta_tf.data import Schema, SyntheticConfig, decode_example, generate_synthetic, read_records
from matta_tf.data.synthetic import GroundTruth, generate_chunk, synthetic_schema

SMALL = SyntheticConfig(num_users=300, num_items=100, num_events=3_000, chunk_size=700, num_shards=2, seed=3)


def _all_records(directory) -> list[bytes]:
    return [r for split in ("train", "validation", "test") for r in read_records(str(directory / split))]


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    generate_synthetic(str(tmp_path / "a"), SMALL, progress=False)
    generate_synthetic(str(tmp_path / "b"), SMALL, progress=False)
    generate_synthetic(str(tmp_path / "c"), SyntheticConfig(**{**SMALL.__dict__, "seed": 4}), progress=False)
    for split in ("train", "validation", "test"):
        for a, b in zip(sorted((tmp_path / "a" / split).iterdir()), sorted((tmp_path / "b" / split).iterdir()),
                        strict=True):
            assert a.read_bytes() == b.read_bytes()
    assert _all_records(tmp_path / "a") != _all_records(tmp_path / "c")


def test_chunks_do_not_depend_on_chunk_order():
    truth = GroundTruth(SMALL)
    later_first = generate_chunk(truth, 2, 1400, 700)
    generate_chunk(truth, 0, 0, 700)
    again = generate_chunk(GroundTruth(SMALL), 2, 1400, 700)
    for name in later_first:
        expected, actual = np.asarray(later_first[name], dtype=object), np.asarray(again[name], dtype=object)
        np.testing.assert_array_equal(actual, expected)


def test_counts_schema_and_records(tmp_path):
    summary = generate_synthetic(str(tmp_path), SMALL, progress=False)
    assert [summary["splits"][s]["events"] for s in ("train", "validation", "test")] == [2400, 300, 300]
    schema = Schema.load(str(tmp_path))
    records = [decode_example(r, schema) for r in _all_records(tmp_path)]
    assert len(records) == 3000
    assert sorted(r["event_index"] for r in records) == list(range(3000))
    assert {f.kind for f in schema.features} == {"int_id", "string", "multi_categorical", "numeric"}
    assert all(1 <= len(r["item_categories"]) <= 3 for r in records)


def test_labels_follow_the_hidden_logit():
    truth = GroundTruth(SyntheticConfig(num_users=500, num_items=200, num_events=20_000, seed=1))
    chunk = generate_chunk(truth, 0, 0, 20_000)
    probability = 1 / (1 + np.exp(-chunk["true_logit"]))
    # Calibration: observed positive rate per decile of the true probability matches its mean.
    order = np.argsort(probability)
    for part in np.array_split(order, 10):
        assert chunk["label"][part].mean() == pytest.approx(probability[part].mean(), abs=0.03)
    assert 0.15 < chunk["label"].mean() < 0.6


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_users"):
        SyntheticConfig(num_users=0)
    with pytest.raises(ValueError, match="split_fractions"):
        SyntheticConfig(split_fractions=(0.5, 0.5))


def test_teacher_labels_are_the_hidden_probability(tmp_path):
    config = SyntheticConfig(**{**SMALL.__dict__, "teacher_labels": True})
    generate_synthetic(str(tmp_path), config, progress=False)
    schema = Schema.load(str(tmp_path))
    teacher = schema.label("teacher_probability")
    assert (teacher.source, teacher.representation) == ("teacher", "probabilities")
    records = [decode_example(r, schema) for r in read_records(str(tmp_path / "test"))]
    logits = np.array([float(np.ravel(r["true_logit"])[0]) for r in records])
    probabilities = np.array([float(np.ravel(r["teacher_probability"])[0]) for r in records])
    np.testing.assert_allclose(probabilities, 1.0 / (1.0 + np.exp(-logits)), rtol=1e-5)
    # Without the option the schema has only the event label.
    assert [label.name for label in synthetic_schema(SMALL).labels] == ["label"]
