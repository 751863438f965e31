"""M-nested Keras layers: each runs a Student and a TA activation stream on shared parameters.

Nested layers take `(x_student, x_ta)` (or one tensor read by both streams) and return
`(y_student, y_ta)`; every one offers `extract(...)`, which returns ordinary Keras layers holding
sliced copies of the weights. `GAU` and `TransformerBlock` are their plain counterparts.
"""

from matta_tf.layers.gau import GAU
from matta_tf.layers.nested_concatenate import NestedConcatenate
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.layers.nested_embedding import NestedEmbedding
from matta_tf.layers.nested_gau import NestedGAU
from matta_tf.layers.nested_normalization import NestedNormalization
from matta_tf.layers.nested_transformer_block import NestedTransformerBlock
from matta_tf.layers.ta_only import TAOnly
from matta_tf.layers.transformer_block import TransformerBlock

__all__ = [
    "GAU",
    "NestedConcatenate",
    "NestedDense",
    "NestedEmbedding",
    "NestedGAU",
    "NestedNormalization",
    "NestedTransformerBlock",
    "TAOnly",
    "TransformerBlock",
]
