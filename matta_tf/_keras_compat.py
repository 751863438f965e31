"""Overrides of private Keras / TensorFlow trainer internals that matta-tf needs, in one place.

Keras 3.15's TensorFlow trainer builds a model symbolically before `fit` / `evaluate` under a
distribution strategy (`TensorFlowTrainer._maybe_symbolic_build`). It reads the first batch with one
`strategy.reduce("MEAN", (x, y, sample_weight), axis=None)` call on the whole nested batch.
`reduce` takes a single value; under `MultiWorkerMirroredStrategy` with more than one worker the
nested batch goes to the collective all-reduce, which fails before training starts (for any model).
`PerReplicaSymbolicBuild` builds from one replica's batch instead: the shapes are all the build needs.

`tests/test_keras_internals.py` checks that the internals used here still exist with the shapes we
rely on: if Keras renames `_maybe_symbolic_build`, the override would silently stop being called and
the MultiWorker crash would come back, so the canary fails with the internal's name.

| internal | what for |
|---|---|
| `TensorFlowTrainer._maybe_symbolic_build(iterator, data_batch)` | overridden: build from one replica's batch |
| `Trainer._symbolic_build(data_batch=...)` | called by the override |
| `Model._distribute_strategy` | the strategy the model was created under (`None` outside one) |
| `MultiWorkerMirroredStrategy.extended._in_multi_worker_mode()` | whether per-step logs are reduced over workers |
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

MAYBE_SYMBOLIC_BUILD = "_maybe_symbolic_build"


class PerReplicaSymbolicBuild:
    """Mixin for a `keras.Model` subclass (list it first): the symbolic build reads one replica's batch.

    Outside a distribution strategy (or without an iterator) Keras' own `_maybe_symbolic_build` runs.
    """

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        strategy = self._distribute_strategy
        if strategy is None or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues)
                else value,
                next(batches),
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` spanning more than one worker."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )
