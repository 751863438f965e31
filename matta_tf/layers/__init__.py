"""M-nested Keras layers: each runs a Student and a TA activation stream on shared parameters.

Nested layers take `(x_student, x_ta)` (or one tensor read by both streams) and return
`(y_student, y_ta)`. Every one implements the protocol of `matta_tf.layers.base.NestedLayer`:
`stream_widths()`, `from_plain(layer, context)` (used by `mnestify`), `extract(choice, input_layout,
name)` (ordinary Keras layers holding sliced copies of the weights, used by extraction),
`output_layout(...)` and `cost(...)`. `GAU` and `TransformerBlock` are plain counterparts.

Supported layers: what `mnestify` nests, keeps shared or refuses, and what extraction returns (the
one table; `matta_tf.mnestify` and the README point here):

| Student layer (`keras.layers.*`) | `mnestify` | nested layer | TA widths (Student's times) | extracts to |
|---|---|---|---|---|
| `Dense` | nests | `NestedDense` | `units * m` (output layers keep theirs) | `Dense` |
| `Embedding`, `keras_rs.layers.EmbedReduce` | nests | `NestedEmbedding` | `output_dim * d_model_m` | same |
| `LayerNormalization`, `RMSNormalization` | nests | `NestedNormalization` | follow the input | same |
| `Concatenate` | nests | `NestedConcatenate` | follow the inputs | `Concatenate` |
| `keras_rs.layers.FeatureCross` (full rank) | nests | `NestedFeatureCross` | follow the input | `FeatureCross` |
| `matta_tf.layers.TransformerBlock` | nests | `NestedTransformerBlock` | `ffn_dim * m`, heads `* heads_m` | same |
| `matta_tf.layers.GAU` | nests | `NestedGAU` | `expansion_dim * m`, `key_dim * m` | same |
| (inserted by `ta_only_after`) | adds | `TAOnly` | Student skips, TA runs | the wrapped layer |
| weightless layers (below) | runs on each stream | a copy per stream | follow the input | a copy |
| preprocessing layers (below) | keeps shared | one copy, read by both streams | not nested | a copy with its state |
| anything else (`TextVectorization`, other ops, ...) | refuses | (names it, says what to do) | | |

Preprocessing layers kept shared: `StringLookup`, `IntegerLookup`, `Hashing`, `Discretization`,
`Normalization`. Weightless layers: `Activation`, `ReLU`, `LeakyReLU`, `ELU`, `Softmax`, `Dropout`, `GaussianNoise`,
`GaussianDropout`, `AlphaDropout`, `Identity`, `Add`, `Subtract`, `Multiply`, `Average`, `Maximum`,
`Minimum`, `Dot`, `GlobalAveragePooling1D`, `GlobalMaxPooling1D`, `Flatten`. Normalizations must
normalize the last axis. `m` is the width multiplier (per layer or global), `d_model_m` the d_model
multiplier, `heads_m` the heads multiplier (see `matta_tf.mnestify`).

Shared preprocessing layers (`matta_tf.layers.shared`): a lookup or a `Normalization` has no width
to nest, so both streams read one output. `mnestify` puts a copy of each into the nested network
with its state (vocabulary, mean/variance, bin boundaries; also with `copy_student_weights=False`:
that state is data, not a trained weight), and extraction copies it again, so an extracted Student
gives the nested stream's outputs and its SavedModel (`model.export`) carries the vocabulary. Such a
layer must read tensors both streams share (the Student's inputs, or another shared layer's
output); one placed after a nested layer is refused. A network with lookups inside cannot compile
with XLA (`jit_compile=True`); the reference relevance model keeps them outside instead, in
`matta_tf.data.FeaturePreprocessor`. A preprocessing layer that is refused runs in `tf.data`
before the network.

In a subclassed Student traced by `mnestify(student, inputs=...)`, element-wise `keras.ops` (`add`,
`subtract`, `multiply`, `divide`, `negative`, `abs`, `exp`, `log`, `sqrt`, `square`, `maximum`,
`minimum`, `tanh`, `relu`, `relu6`, `sigmoid`, `silu`, `gelu`, `softplus`, `elu`, `leaky_relu`) run on
each stream and `keras.ops.concatenate` becomes a `NestedConcatenate`; other ops are refused by name.
Nested `Sequential` / functional sub-models are inlined. Any other layer is rejected by `mnestify`
with its name, its class and what to do instead.
"""

from matta_tf.layers.base import LayerCost, NestedLayer, NestingContext, StreamWidths
from matta_tf.layers.gau import GAU
from matta_tf.layers.nested_concatenate import NestedConcatenate
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.layers.nested_embedding import NestedEmbedding
from matta_tf.layers.nested_feature_cross import NestedFeatureCross
from matta_tf.layers.nested_gau import NestedGAU
from matta_tf.layers.nested_normalization import NestedNormalization
from matta_tf.layers.nested_transformer_block import NestedTransformerBlock
from matta_tf.layers.ta_only import TAOnly
from matta_tf.layers.transformer_block import TransformerBlock

__all__ = [
    "GAU",
    "LayerCost",
    "NestedConcatenate",
    "NestedDense",
    "NestedEmbedding",
    "NestedFeatureCross",
    "NestedGAU",
    "NestedLayer",
    "NestedNormalization",
    "NestedTransformerBlock",
    "NestingContext",
    "StreamWidths",
    "TAOnly",
    "TransformerBlock",
]
