"""M-nested Keras layers: each runs a Student and a TA activation stream on shared parameters.

Nested layers take `(x_student, x_ta)` (or one tensor read by both streams) and return
`(y_student, y_ta)`. Every one implements the protocol of `matta_tf.layers.base.NestedLayer`:
`stream_widths()`, `from_plain(layer, context)` (used by `mnestify`), `extract(choice, input_layout,
name)` (ordinary Keras layers holding sliced copies of the weights, used by extraction),
`output_layout(...)` and `cost(...)`. `GAU` and `TransformerBlock` are plain counterparts.

Supported layers (what `mnestify` nests, and what extraction returns):

| plain Student layer | nested layer | TA widths (Student's times) | extracts to |
|---|---|---|---|
| `keras.layers.Dense` | `NestedDense` | `units * m` (output layers keep theirs) | `Dense` |
| `keras.layers.Embedding`, `keras_rs.layers.EmbedReduce` | `NestedEmbedding` | `output_dim * d_model_m` | same |
| `keras.layers.LayerNormalization`, `RMSNormalization` | `NestedNormalization` | follow the input | same |
| `keras.layers.Concatenate` | `NestedConcatenate` | follow the inputs | `Concatenate` |
| `keras_rs.layers.FeatureCross` (full rank) | `NestedFeatureCross` | follow the input | `FeatureCross` |
| `matta_tf.layers.TransformerBlock` | `NestedTransformerBlock` | `ffn_dim * m`, heads `* heads_m` | same |
| `matta_tf.layers.GAU` | `NestedGAU` | `expansion_dim * m`, `key_dim * m` | same |
| (inserted by `ta_only_after`) | `TAOnly` | Student skips, TA runs | the wrapped layer |
| weightless layers (below) | run on each stream | follow the input | a copy |

Weightless layers: `Activation`, `ReLU`, `LeakyReLU`, `ELU`, `Softmax`, `Dropout`, `GaussianNoise`,
`GaussianDropout`, `AlphaDropout`, `Identity`, `Add`, `Subtract`, `Multiply`, `Average`, `Maximum`,
`Minimum`, `Dot`, `GlobalAveragePooling1D`, `GlobalMaxPooling1D`, `Flatten`. Normalizations must
normalize the last axis. `m` is the width multiplier (per layer or global), `d_model_m` the d_model
multiplier, `heads_m` the heads multiplier (see `matta_tf.mnestify`).

In a subclassed Student traced by `mnestify(student, inputs=...)`, element-wise `keras.ops` (`add`,
`subtract`, `multiply`, `divide`, `negative`, `abs`, `exp`, `log`, `sqrt`, `square`, `maximum`,
`minimum`, `tanh`, `relu`, `relu6`, `sigmoid`, `silu`, `gelu`, `softplus`, `elu`, `leaky_relu`) run on
each stream and `keras.ops.concatenate` becomes a `NestedConcatenate`; other ops are refused by name.
Nested `Sequential` / functional sub-models are inlined. Any other layer with weights is rejected by
`mnestify` with its name and class.
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
