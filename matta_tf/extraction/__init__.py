"""Mix'n'Match: describe, enumerate, cost, extract and evaluate standalone sub-models of a nested model.

```python
from matta_tf.extraction import evaluate_submodels, extract_submodel, plot_quality_vs_size, random_specs
from matta_tf.extraction import select_submodel

specs = random_specs(nested, 2, seed=0)           # the Student, the TA and 2 random mixes
table = evaluate_submodels(nested, specs, dataset, progress=False)   # one row per spec
plot_quality_vs_size(table, "quality_vs_size.png", baseline=0.3)    # e.g. the baseline's AucLoss
best = select_submodel(table, max_parameters=table["parameters"].median())
servable = extract_submodel(nested, best)       # ordinary Keras layers, no nesting code
```

Over a stack of identical blocks (a Transformer), `wide_narrow_wide_specs(nested, stack=["block_0",
"block_1", "block_2", "block_3"])` gives the paper's wide-narrow-wide family instead.
"""

from matta_tf.extraction.cost import SubmodelCost, layer_flops, measure_latency, model_cost, spec_cost
from matta_tf.extraction.enumerate import all_specs, random_specs, wide_narrow_wide_specs
from matta_tf.extraction.evaluate import (
    binary_metrics,
    evaluate_submodels,
    exact_auroc,
    pareto_frontier,
    plot_quality_vs_size,
    select_submodel,
)
from matta_tf.extraction.extract import extract_submodel, is_extractable, trace_submodel
from matta_tf.extraction.spec import ChoosableLayer, SpecError, SubmodelSpec, choosable_layers, functional_view

__all__ = [
    "ChoosableLayer",
    "SpecError",
    "SubmodelCost",
    "SubmodelSpec",
    "all_specs",
    "binary_metrics",
    "exact_auroc",
    "choosable_layers",
    "evaluate_submodels",
    "extract_submodel",
    "functional_view",
    "is_extractable",
    "layer_flops",
    "measure_latency",
    "model_cost",
    "pareto_frontier",
    "plot_quality_vs_size",
    "random_specs",
    "select_submodel",
    "spec_cost",
    "trace_submodel",
    "wide_narrow_wide_specs",
]
