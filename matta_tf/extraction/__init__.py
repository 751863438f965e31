"""Mix'n'Match: describe, enumerate, cost, extract and evaluate standalone sub-models of a nested model.

```python
specs = wide_narrow_wide_specs(nested, stack=["block_0", "block_1", "block_2", "block_3"])
table = evaluate_submodels(nested, specs, validation_dataset)
plot_quality_vs_size(table, "quality_vs_size.png", baseline=baseline_auc_loss)
best = select_submodel(table, max_parameters=2e6)
servable = extract_submodel(nested, best)       # ordinary Keras layers, no nesting code
```
"""

from matta_tf.extraction.cost import SubmodelCost, layer_flops, measure_latency, model_cost, spec_cost
from matta_tf.extraction.enumerate import all_specs, random_specs, wide_narrow_wide_specs
from matta_tf.extraction.evaluate import (
    binary_metrics,
    evaluate_submodels,
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
