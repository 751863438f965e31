"""Relevance data: the feature schema, tf.Example records, TFRecord shards and `tf.data` input.

`make_dataset` yields *raw* features (ids, strings, floats, keyed by feature name); a network reads
them after `FeaturePreprocessor` (vocabulary lookups, OOV buckets, bucketization, padding,
standardization), whose outputs are keyed `preprocessed_name(feature)` (`"user_id_index"`).

Also builds real MovieLens events offline (`prepare_movielens`), synthetic events at scale
(`generate_synthetic`), and time-ordered item histories for next-item models (`sequences`).
"""

from matta_tf.data import sequences
from matta_tf.data.describe import describe_events
from matta_tf.data.examples import (
    RecordError,
    assert_valid_values,
    check_example,
    decode_example,
    encode_example,
    feature_spec,
    parse_example_bytes,
    parse_examples,
    serialize_example,
)
from matta_tf.data.movielens import MovieLensConfig, build_events, movielens_schema, prepare_movielens
from matta_tf.data.preprocessing import FeaturePreprocessor, preprocessed_name
from matta_tf.data.schema import Feature, Label, Schema, SchemaError
from matta_tf.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_schema
from matta_tf.data.tfrecords import (
    ShardedTFRecordWriter,
    TFRecordFramingError,
    check_framing,
    list_files,
    make_dataset,
    read_records,
    write_records,
)
from matta_tf.data.vocabulary import build_vocabulary, lookup_layer

__all__ = [
    "Feature",
    "FeaturePreprocessor",
    "Label",
    "MovieLensConfig",
    "RecordError",
    "Schema",
    "SchemaError",
    "ShardedTFRecordWriter",
    "TFRecordFramingError",
    "SyntheticConfig",
    "build_events",
    "sequences",
    "assert_valid_values",
    "build_vocabulary",
    "check_framing",
    "check_example",
    "decode_example",
    "describe_events",
    "encode_example",
    "feature_spec",
    "generate_synthetic",
    "list_files",
    "lookup_layer",
    "make_dataset",
    "movielens_schema",
    "parse_example_bytes",
    "parse_examples",
    "preprocessed_name",
    "prepare_movielens",
    "read_records",
    "serialize_example",
    "synthetic_schema",
    "write_records",
]
