"""The distribution strategy a training process should use, read from its environment.

The same training command runs on one CPU, on several local GPUs and on a cluster of workers: the
environment says which.

| environment | strategy |
|---|---|
| `TF_CONFIG` names a cluster of two or more tasks | `MultiWorkerMirroredStrategy` (a process per worker, gRPC) |
| no cluster, two or more local GPUs | `MirroredStrategy` over them |
| otherwise | TensorFlow's default strategy (one device) |

Under a multi-worker strategy every worker runs the same program; only the chief (the `chief` task,
or worker 0 when the cluster has no chief) writes checkpoints and outputs (`is_chief`). A worker that
must still take part in a collective save (Keras' own `ModelCheckpoint`) writes to a private temporary
folder that it deletes afterwards (`worker_output_dir`).

Example:

```python
from matta_tf.layers import NestedDense
from matta_tf.optimizers import Shampoo
from matta_tf.training import MatTAModel

strategy = strategy_from_environment()   # first, before any TensorFlow op
with strategy.scope():
    inputs = keras.Input((4,))
    network = keras.Model(inputs, list(NestedDense(1, 1)(NestedDense(4, 16, activation="relu")(inputs))))
    model = MatTAModel(network)
    model.compile(optimizer=Shampoo())
model.fit(np.ones((32, 4)), np.ones((32,), "int64"), batch_size=8, verbose=0)
out = worker_output_dir("out")   # "out" on the chief, a private temporary folder elsewhere
os.makedirs(out, exist_ok=True)
model.save(os.path.join(out, "model.keras"))
```
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

_CLUSTER_STRATEGIES: dict[str, tf.distribute.Strategy] = {}


class DistributionConfigError(ValueError):
    """`TF_CONFIG` is malformed; the message names the field and the value."""


def cluster_config(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """`TF_CONFIG` parsed and checked, or `None` when it is unset or describes a single task.

    Raises:
        DistributionConfigError: `TF_CONFIG` is not JSON, has no `cluster`/`task`, or its task is
            not in its cluster.
    """
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise DistributionConfigError(f"TF_CONFIG is not valid JSON ({error}). Received: {text[:200]!r}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise DistributionConfigError(f"TF_CONFIG must be an object with a `cluster` mapping. Received: {text[:200]!r}")
    cluster = config["cluster"]
    tasks = sum(len(addresses) for name, addresses in cluster.items() if name != "evaluator")
    if tasks < 2:
        return None
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise DistributionConfigError(f"TF_CONFIG.task must give `type` and `index`. Received: {task!r}")
    if task["type"] not in cluster or not 0 <= int(task["index"]) < len(cluster[task["type"]]):
        raise DistributionConfigError(
            f"TF_CONFIG.task {task!r} is not in TF_CONFIG.cluster (types {sorted(cluster)})")
    return config


def strategy_from_environment() -> tf.distribute.Strategy:
    """The strategy this process's environment asks for (see the module docstring's table).

    Call it before any TensorFlow op runs in the process: a multi-worker strategy configures
    TensorFlow's collective ops, which TensorFlow allows only at start-up. Later calls in the same
    process return the same multi-worker strategy.

    Returns:
        A `MultiWorkerMirroredStrategy`, a `MirroredStrategy` or the default strategy.

    Raises:
        DistributionConfigError: `TF_CONFIG` is set but malformed.
    """
    if cluster_config() is not None:
        # One per process: TensorFlow configures collectives once, so a second training run in the same
        # process (matta run trains MatTA, then the baseline) must reuse the first one's strategy.
        text = os.environ["TF_CONFIG"]
        if text not in _CLUSTER_STRATEGIES:
            _CLUSTER_STRATEGIES[text] = tf.distribute.MultiWorkerMirroredStrategy()  # it reads TF_CONFIG itself
        return _CLUSTER_STRATEGIES[text]
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) >= 2:
        return tf.distribute.MirroredStrategy([device.name for device in gpus])
    return tf.distribute.get_strategy()


def is_chief(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process writes checkpoints and outputs: always, unless it is a non-chief cluster task."""
    config = cluster_config(environ)
    if config is None:
        return True
    task, cluster = config["task"], config["cluster"]
    if task["type"] == "chief":
        return True
    return "chief" not in cluster and task["type"] == "worker" and int(task["index"]) == 0


def worker_output_dir(out_dir: str, environ: Mapping[str, str] | None = None) -> str:
    """`out_dir` on the chief; a fresh private temporary folder on any other worker."""
    if is_chief(environ):
        return out_dir
    return tempfile.mkdtemp(prefix="matta-worker-")
