"""Extracted sub-models serve as fast as plain Keras models of the same shape (target: <= 1.05x).

Builds the MovieLens relevance network (nested), extracts its Student and TA, and builds plain Keras
models of the same shapes from ordinary layers written here independently (Embedding / EmbedReduce,
Concatenate, Dense, keras-rs FeatureCross). Each pair is timed in one run, interleaved, on the same
batches: median milliseconds per batch of a compiled `tf.function`, ratio extracted / plain.

    python benchmarks/extraction_latency.py [--repeats 200] [--batch-sizes 1,64,512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_rs  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.data import MovieLensConfig, Schema, make_dataset, prepare_movielens  # noqa: E402
from matta_tf.data.movielens import load_ratings  # noqa: E402
from matta_tf.data.preprocessing import embedding_rows, preprocessed_name  # noqa: E402
from matta_tf.extraction import SubmodelSpec, extract_submodel  # noqa: E402
from matta_tf.models.relevance import (  # noqa: E402
    ROLES,
    PaddingWeights,
    RelevanceConfig,
    build_relevance_network,
    network_inputs,
    relevance_preprocessor,
)


def plain_relevance(schema: Schema, config: RelevanceConfig) -> keras.Model:
    """The relevance Student architecture written with ordinary Keras layers only."""
    inputs = network_inputs(schema)
    embedded = {}
    for feature in schema.model_features:
        rows = embedding_rows(feature)
        tensor = inputs[preprocessed_name(feature)]
        if feature.is_multi_valued:
            weights = PaddingWeights()(tensor)
            layer = keras_rs.layers.EmbedReduce(rows, config.embedding_dim, combiner="mean")
            embedded[feature.name] = layer(tensor, weights)
        else:
            embedded[feature.name] = keras.layers.Embedding(rows, config.embedding_dim)(tensor)
    towers = []
    for role in ROLES:
        features = [f for f in schema.model_features if f.role == role]
        if not features:
            continue
        x = keras.layers.Concatenate()([embedded[f.name] for f in features])
        for units in config.tower_units:
            x = keras.layers.Dense(units, activation="relu")(x)
        towers.append(x)
    x0 = keras.layers.Concatenate()(towers)
    x = x0
    for _ in range(config.num_cross_layers):
        x = keras_rs.layers.FeatureCross()(x0, x)
    for units in config.head_units:
        x = keras.layers.Dense(units, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(config.num_logits)(x))


def time_pair(first: keras.Model, second: keras.Model, batch, repeats: int) -> tuple[float, float]:
    calls = [tf.function(lambda x, m=m: m(x, training=False)) for m in (first, second)]
    for call in calls:
        for _ in range(10):
            call(batch).numpy()
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            call(batch).numpy()
            times[index].append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch-sizes", default="1,64,512")
    args = parser.parse_args()
    data_dir = os.path.join(tempfile.mkdtemp(), "movielens")
    prepare_movielens(data_dir, MovieLensConfig(num_shards=1), ratings=load_ratings(), progress=False)
    schema = Schema.load(data_dir)
    config = RelevanceConfig()
    nested = build_relevance_network(schema, config)
    preprocessor = relevance_preprocessor(schema)
    rows = []
    for stream, plain_config in (("student", config.student_config()), ("ta", config.ta_config())):
        extracted = extract_submodel(nested, SubmodelSpec.uniform(nested, stream))
        plain = plain_relevance(schema, plain_config)
        assert extracted.count_params() == plain.count_params(), (extracted.count_params(), plain.count_params())
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            features, _ = next(iter(make_dataset(os.path.join(data_dir, "test"), schema, batch_size, labels="label")))
            batch = preprocessor(features)
            extracted_ms, plain_ms = time_pair(extracted, plain, batch, args.repeats)
            rows.append((stream, extracted.count_params(), batch_size, extracted_ms, plain_ms, extracted_ms / plain_ms))
    print(f"{'model':8} {'params':>9} {'batch':>6} {'extracted ms':>13} {'plain ms':>9} {'ratio':>6}")
    for stream, params, batch_size, extracted_ms, plain_ms, ratio in rows:
        print(f"{stream:8} {params:>9,} {batch_size:>6} {extracted_ms:>13.3f} {plain_ms:>9.3f} {ratio:>6.3f}")
    print(f"max ratio: {max(r[-1] for r in rows):.3f} (target <= 1.05); tf {tf.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
