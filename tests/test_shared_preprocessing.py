"""Preprocessing layers inside a Student: `mnestify` keeps them shared, extraction copies them with their state."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import matta_tf
from matta_tf.extraction import SubmodelSpec, extract_submodel
from matta_tf.layers.shared import SHARED_PREPROCESSING_LAYERS, copy_preprocessing_layer

COUNTRIES = np.array(["fr", "fr", "de", "de", "de", "us", "us", "us", "us", "jp"])  # distinct counts
rng = np.random.default_rng(0)
PRICES = rng.normal(3.0, 2.0, size=(64, 2)).astype("float32")
AGES = rng.uniform(0, 90, size=64).astype("float32")


def _adapted_layers() -> dict:
    """Preprocessing layers as a Keras user writes them: adapted (state not in the config) or configured."""
    country = keras.layers.StringLookup(name="country_lookup")
    country.adapt(COUNTRIES)
    price = keras.layers.Normalization(name="price_norm")
    price.adapt(PRICES)
    age = keras.layers.Discretization(num_bins=4, name="age_buckets")
    age.adapt(AGES)
    return {
        "country": country,
        "item": keras.layers.IntegerLookup(vocabulary=[11, 22, 33, 44], name="item_lookup"),
        "price": price,
        "age": age,
        "city": keras.layers.Hashing(num_bins=13, name="city_hash"),
    }


def _inputs() -> dict:
    return {
        "country": keras.Input((), dtype="string", name="country"),
        "item": keras.Input((), dtype="int64", name="item"),
        "price": keras.Input((2,), name="price"),
        "age": keras.Input((), name="age"),
        "city": keras.Input((), dtype="string", name="city"),
    }


def _batch(n: int = 16, seed: int = 1) -> dict:
    r = np.random.default_rng(seed)
    return {
        "country": tf.constant(r.choice(["fr", "de", "us", "jp", "unseen"], n)),
        "item": tf.constant(r.choice([11, 22, 33, 44, 99], n), tf.int64),
        "price": tf.constant(r.normal(3.0, 2.0, size=(n, 2)), tf.float32),
        "age": tf.constant(r.uniform(0, 90, n), tf.float32),
        "city": tf.constant(r.choice(["paris", "tokyo", "ny"], n)),
    }


def _functional_student() -> keras.Model:
    layers, inputs = _adapted_layers(), _inputs()
    embedded = [
        keras.layers.Embedding(layers["country"].vocabulary_size(), 4, name="country_embedding")(
            layers["country"](inputs["country"])),
        keras.layers.Embedding(layers["item"].vocabulary_size(), 4, name="item_embedding")(
            layers["item"](inputs["item"])),
        keras.layers.Embedding(4, 3, name="age_embedding")(layers["age"](inputs["age"])),
        keras.layers.Embedding(13, 3, name="city_embedding")(layers["city"](inputs["city"])),
        layers["price"](inputs["price"]),
    ]
    x = keras.layers.Concatenate(name="features")(embedded)
    x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="logit")(x), name="student")


class SubclassedStudent(keras.Model):
    """StringLookup -> Embedding and Normalization -> Dense in a subclassed `call`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        layers = _adapted_layers()
        self.lookup, self.norm = layers["country"], layers["price"]
        self.embedding = keras.layers.Embedding(self.lookup.vocabulary_size(), 4, name="country_embedding")
        self.price_dense = keras.layers.Dense(4, name="price_dense")
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.logit = keras.layers.Dense(1, name="logit")

    def call(self, inputs):
        country = self.embedding(self.lookup(inputs["country"]))
        price = self.price_dense(self.norm(inputs["price"]))
        return self.logit(self.hidden(keras.ops.concatenate([country, price], axis=-1)))


def _students():
    functional = _functional_student()
    subclassed = SubclassedStudent(name="subclassed")
    batch = _batch()
    subclassed({"country": batch["country"], "price": batch["price"]})  # builds it
    subclassed_inputs = {"country": keras.Input((), dtype="string", name="country"),
                         "price": keras.Input((2,), name="price")}
    return [(functional, None, batch), (subclassed, subclassed_inputs, {k: batch[k] for k in ("country", "price")})]


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_mnestify_keeps_preprocessing_shared_and_extraction_reproduces_both_streams(kind, tmp_path):
    student, inputs, batch = dict(zip(["functional", "subclassed"], _students(), strict=True))[kind]
    nested = matta_tf.mnestify(student, width_multiplier=4, d_model_multiplier=2, inputs=inputs)
    expected = student(batch).numpy()
    student_out, ta_out = (t.numpy() for t in nested(batch))
    # Before training the Student stream is the Student (same float ops on the same weights).
    np.testing.assert_allclose(student_out, expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(student_out, ta_out)
    # One copy of each preprocessing layer, read by both streams; not the Student's own objects.
    originals = [layer for layer in student.layers if isinstance(layer, SHARED_PREPROCESSING_LAYERS)]
    copies = [layer for layer in nested.layers if isinstance(layer, SHARED_PREPROCESSING_LAYERS)]
    assert sorted(layer.name for layer in copies) == sorted(layer.name for layer in originals)
    assert not {id(layer) for layer in copies} & {id(layer) for layer in originals}
    for stream, output in (("student", student_out), ("ta", ta_out)):
        extracted = extract_submodel(nested, SubmodelSpec.uniform(nested, stream))
        np.testing.assert_allclose(extracted(batch).numpy(), output, rtol=1e-5, atol=1e-5)
        lookup = extracted.get_layer("country_lookup")
        assert lookup.get_vocabulary() == student_lookup_vocabulary(student)
    # Unseen values go to the OOV index, exactly as in the Student.
    assert extracted.get_layer("country_lookup")(tf.constant(["unseen", "us"])).numpy().tolist() == [0, 1]


def student_lookup_vocabulary(student: keras.Model) -> list:
    lookup = next(layer for layer in student.layers if isinstance(layer, keras.layers.StringLookup))
    return lookup.get_vocabulary()


def test_mnestify_without_student_weights_still_copies_vocabularies_and_statistics():
    student = _functional_student()
    nested = matta_tf.mnestify(student, width_multiplier=2, copy_student_weights=False)
    assert nested.get_layer("country_lookup").get_vocabulary() == ["[UNK]", "us", "de", "fr", "jp"]
    np.testing.assert_allclose(nested.get_layer("price_norm").mean.numpy().ravel(), PRICES.mean(axis=0), rtol=1e-5)


def test_saved_model_export_of_the_extracted_student_keeps_the_vocabulary(tmp_path):
    student = _functional_student()
    nested = matta_tf.mnestify(student, width_multiplier=4)
    extracted = extract_submodel(nested, SubmodelSpec.uniform(nested, "student"))
    batch = _batch(seed=3)
    expected = extracted(batch).numpy()
    path = str(tmp_path / "saved_model")
    extracted.export(path, verbose=False)
    del extracted, nested, student
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(loaded.serve(batch).numpy(), expected, rtol=1e-6, atol=1e-6)
    # The vocabulary travels inside the SavedModel: changing only the countries changes the logits as the
    # lookup says ("fr" and "unseen" map to different rows).
    swapped = dict(batch, country=tf.constant(["fr"] * 16))
    unseen = dict(batch, country=tf.constant(["unseen"] * 16))
    assert not np.allclose(loaded.serve(swapped).numpy(), loaded.serve(unseen).numpy())


def test_copy_preprocessing_layer_matches_numpy_references():
    layers = _adapted_layers()
    countries = ["us", "de", "fr", "jp", "xx"]
    # Adapted vocabulary: most frequent first after the OOV token at index 0.
    vocabulary = ["[UNK]", "us", "de", "fr", "jp"]
    copy = copy_preprocessing_layer(layers["country"], name="copied")
    assert copy.name == "copied"
    assert copy(tf.constant(countries)).numpy().tolist() == [vocabulary.index(c) if c in vocabulary else 0
                                                             for c in countries]
    x = PRICES[:5]
    expected = (x - PRICES.mean(axis=0)) / np.sqrt(PRICES.var(axis=0))
    np.testing.assert_allclose(copy_preprocessing_layer(layers["price"])(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    boundaries = np.asarray(layers["age"].bin_boundaries)
    ages = np.array([0.0, 30.0, 60.0, 89.0], np.float32)
    assert copy_preprocessing_layer(layers["age"])(ages).numpy().tolist() == np.digitize(ages, boundaries).tolist()
    items = tf.constant([22, 99, 44], tf.int64)
    assert copy_preprocessing_layer(layers["item"])(items).numpy().tolist() == [2, 0, 4]
    cities = tf.constant(["paris", "ny"])
    np.testing.assert_array_equal(copy_preprocessing_layer(layers["city"])(cities), layers["city"](cities))
    with pytest.raises(ValueError, match=r"layer 'hidden' is a Dense"):
        copy_preprocessing_layer(keras.layers.Dense(3, name="hidden"))


def test_preprocessing_on_a_nested_activation_is_refused_with_advice():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="hidden")(inputs)
    norm = keras.layers.Normalization(mean=0.0, variance=1.0, name="late_norm")
    student = keras.Model(inputs, keras.layers.Dense(1, name="logit")(norm(x)))
    with pytest.raises(ValueError, match=r"preprocessing layer 'late_norm' \(Normalization\) shared.*Move it before"):
        matta_tf.mnestify(student)


def test_unsupported_preprocessing_layer_error_says_to_preprocess_in_tf_data():
    inputs = keras.Input((3,))
    encoded = keras.layers.CategoryEncoding(num_tokens=5, output_mode="multi_hot", name="encode")(inputs)
    student = keras.Model(inputs, keras.layers.Dense(1, name="logit")(encoded))
    with pytest.raises(ValueError, match=r"'encode'.*CategoryEncoding.*kept shared by both streams StringLookup, "
                                         r"IntegerLookup.*run before the network.*FeaturePreprocessor"):
        matta_tf.mnestify(student)


def test_matta_training_with_shared_lookups_then_extraction_equals_the_streams():
    student = _functional_student()
    nested = matta_tf.mnestify(student, width_multiplier=4)
    batch = _batch(64, seed=5)
    labels = tf.constant(np.random.default_rng(5).integers(0, 2, 64))
    model = matta_tf.MatTAModel(nested)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))  # "auto" jit: off, the lookups cannot compile
    before = nested.get_layer("hidden").kernel.numpy().copy()
    model.fit(tf.data.Dataset.from_tensor_slices((batch, labels)).batch(16), epochs=1, verbose=0)
    assert not np.allclose(before, nested.get_layer("hidden").kernel.numpy())
    assert nested.get_layer("country_lookup").get_vocabulary() == student_lookup_vocabulary(student)  # not trained
    for stream, output in zip(("student", "ta"), nested(batch), strict=True):
        extracted = extract_submodel(nested, SubmodelSpec.uniform(nested, stream))
        np.testing.assert_allclose(extracted(batch).numpy(), output.numpy(), rtol=1e-5, atol=1e-5)
