"""Serving matta-tf models with TF Serving: export every Mix'n'Match size, configure, call, A/B test.

```python
from matta_tf.extraction import SubmodelSpec
from matta_tf.serving import (ModelEntry, PredictionClient, ServableModel, export_for_serving, raw_features,
                              serving_command, write_model_config)
from matta_tf.serving.server import LocalModelServer

specs = [SubmodelSpec.uniform(nested, "student"), SubmodelSpec.uniform(nested, "ta")]
exported = export_for_serving([ServableModel.extract(nested, spec, schema) for spec in specs], "runs/serving")
write_model_config("runs/serving/models.config",       # also writes runs/serving/batching_parameters.txt
                   [ModelEntry("relevance", "runs/serving/relevance", labels={"control": 1, "treatment": 2})])
command = serving_command("runs/serving/models.config", "runs/serving/batching_parameters.txt")
# tensorflow_model_server --port=8500 --rest_api_port=8501 --model_config_file=... \
#     --allow_version_labels_for_unavailable_models=true --enable_batching=true --batching_parameters_file=...
# (the same flags work with `matta serve`; serving/README.md has the conformance table), or in-process:
with LocalModelServer("runs/serving/models.config", grpc_port=0, rest_port=0,
                      allow_version_labels_for_unavailable_models=True) as server:
    client = PredictionClient(f"127.0.0.1:{server.grpc_port}", "relevance")   # TF Serving: 127.0.0.1:8500
    probabilities = client.predict(raw_features(records, schema), label="treatment")["probabilities"]
assert probabilities.shape == (len(records), 1)
```

Names are imported on first use, so `matta_tf.serving.ab` (assignment and analysis) loads without TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ExportedServable": "matta_tf.serving.export",
    "ServableModel": "matta_tf.serving.export",
    "export_for_serving": "matta_tf.serving.export",
    "raw_features": "matta_tf.serving.export",
    "raw_input_signature": "matta_tf.serving.export",
    "BatchingParameters": "matta_tf.serving.model_config",
    "ModelEntry": "matta_tf.serving.model_config",
    "serving_command": "matta_tf.serving.model_config",
    "write_batching_parameters": "matta_tf.serving.model_config",
    "read_model_config": "matta_tf.serving.model_config",
    "write_model_config": "matta_tf.serving.model_config",
    "Prediction": "matta_tf.serving.client",
    "PredictionClient": "matta_tf.serving.client",
    "PredictionError": "matta_tf.serving.client",
    "LocalModelServer": "matta_tf.serving.server",
    "ServingError": "matta_tf.serving.server",
    "ABAnalysis": "matta_tf.serving.ab",
    "ABTest": "matta_tf.serving.ab",
    "Arm": "matta_tf.serving.ab",
    "ExposureLog": "matta_tf.serving.ab",
    "analyze_ab_test": "matta_tf.serving.ab",
    "predict_for_user": "matta_tf.serving.ab",
    "read_exposures": "matta_tf.serving.ab",
    "sample_ratio_check": "matta_tf.serving.ab",
    "write_ab_report": "matta_tf.serving.ab",
}

__all__ = [
    "ABAnalysis",
    "ABTest",
    "Arm",
    "BatchingParameters",
    "ExportedServable",
    "ExposureLog",
    "LocalModelServer",
    "ModelEntry",
    "Prediction",
    "PredictionClient",
    "PredictionError",
    "ServableModel",
    "ServingError",
    "analyze_ab_test",
    "export_for_serving",
    "predict_for_user",
    "raw_features",
    "raw_input_signature",
    "read_exposures",
    "read_model_config",
    "sample_ratio_check",
    "serving_command",
    "write_ab_report",
    "write_batching_parameters",
    "write_model_config",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from matta_tf.serving.ab import (
        ABAnalysis,
        ABTest,
        Arm,
        ExposureLog,
        analyze_ab_test,
        predict_for_user,
        read_exposures,
        sample_ratio_check,
        write_ab_report,
    )
    from matta_tf.serving.client import Prediction, PredictionClient, PredictionError
    from matta_tf.serving.export import (
        ExportedServable,
        ServableModel,
        export_for_serving,
        raw_features,
        raw_input_signature,
    )
    from matta_tf.serving.model_config import (
        BatchingParameters,
        ModelEntry,
        read_model_config,
        serving_command,
        write_batching_parameters,
        write_model_config,
    )
    from matta_tf.serving.server import LocalModelServer, ServingError
