"""Cost of one nested Student+TA forward+backward pass relative to a plain Student plus a plain TA.

MatTA runs both streams in one nested network whose Student weights are a block of the TA's. This
benchmark times one forward+backward step (loss on both outputs, gradients of every weight) of

- a nested MLP stack (relevance-model shape: one shared input, widths doubled, logit output),
- a nested Transformer stack (GPT-2-style: FFN width doubled, shared embeddings),

against the same batch through the plain Student and the plain TA, extracted from the nested model
and run separately, and prints `nested / (student + ta)`. A ratio <= 1.0 means nesting costs no more
than training the two models apart. Warm-up steps (and tracing/compilation) are excluded; the three
variants are timed in interleaved rounds (order alternating), and the ratio reported is the median
over rounds of `nested / (student + ta)` measured in the same round, which is robust to a machine
whose load drifts. Both wall-clock and process CPU-time ratios are printed: on a shared machine
the CPU-time ratio is the steadier measure of the work done.

Run from the repository root:

    python benchmarks/nesting_cost.py            # graph mode and XLA, both stacks
    python benchmarks/nesting_cost.py --quick    # a smoke run
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.layers import NestedDense, NestedEmbedding, NestedNormalization, NestedTransformerBlock  # noqa: E402


def nested_mlp(input_dim: int, student_widths: list[int], multiplier: int) -> keras.Model:
    inputs = keras.Input((input_dim,))
    x = inputs
    for i, width in enumerate(student_widths):
        x = NestedDense(width, width * multiplier, activation="relu", name=f"hidden_{i}")(x)
    outputs = NestedDense(1, 1, name="logit")(x)
    return keras.Model(inputs, list(outputs))


def plain_mlp(nested: keras.Model, stream: str, input_dim: int) -> keras.Model:
    return keras.Sequential([keras.Input((input_dim,))] + [layer.extract(stream) for layer in nested.layers[1:]])


def nested_transformer(
    vocabulary: int, length: int, model_dim: int, num_heads: int, ffn_dim: int, num_blocks: int
) -> keras.Model:
    tokens = keras.Input((length,), dtype="int32")
    x = NestedEmbedding(vocabulary, model_dim, model_dim, name="embedding")(tokens)
    for i in range(num_blocks):
        x = NestedTransformerBlock(num_heads, model_dim // num_heads, ffn_dim, 2 * ffn_dim, name=f"block_{i}")(x)
    x = NestedNormalization(name="final_norm")(x)
    outputs = NestedDense(vocabulary, vocabulary, name="head")(x)
    return keras.Model(tokens, list(outputs))


def plain_transformer(nested: keras.Model, stream: str, length: int, model_dim: int) -> keras.Model:
    layers = [keras.Input((length,), dtype="int32")]
    return keras.Sequential(layers + [layer.extract(stream) for layer in nested.layers[1:]])


def train_step(model: keras.Model, jit_compile: bool) -> Callable:
    """Forward+backward: the loss is the mean square of every output, gradients of all weights."""

    @tf.function(jit_compile=jit_compile)
    def step(inputs):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            loss = tf.add_n([tf.reduce_mean(tf.square(y)) for y in tf.nest.flatten(outputs)])
        return tape.gradient(loss, model.trainable_variables)

    return step


def time_steps(step: Callable, inputs, steps: int) -> tuple[float, float]:
    """Seconds per step: wall clock, and CPU time of this process (all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        gradients = step(inputs)
    # Gradients are ready only once a value is read back.
    tf.nest.map_structure(lambda g: g.numpy() if hasattr(g, "numpy") else g, gradients[-1])
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _ratio(rounds: dict[str, list[tuple[float, float]]], clock: int) -> float:
    """Median over rounds of the same-round `nested / (student + ta)`: robust to load that changes between rounds."""
    return statistics.median(
        n[clock] / (s[clock] + t[clock])
        for n, s, t in zip(rounds["nested"], rounds["student"], rounds["ta"], strict=True)
    )


def compare(name: str, nested: keras.Model, student: keras.Model, ta: keras.Model, inputs, args) -> list:
    rows = []
    for jit_compile in args.modes:
        steps = {
            "nested": train_step(nested, jit_compile),
            "student": train_step(student, jit_compile),
            "ta": train_step(ta, jit_compile),
        }
        for step in steps.values():
            for _ in range(args.warmup):
                time_steps(step, inputs, 1)
        rounds = {key: [] for key in steps}
        for repeat in range(args.repeats):
            # Alternate the order so that a drifting machine load biases no variant.
            order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
            for key in order:
                rounds[key].append(time_steps(steps[key], inputs, args.steps))

        ms = {key: 1000 * statistics.median(wall for wall, _ in values) for key, values in rounds.items()}
        mode = "XLA" if jit_compile else "graph"
        row = (name, mode, ms["student"], ms["ta"], ms["nested"], _ratio(rounds, 0), _ratio(rounds, 1))
        rows.append(row)
        print(
            f"{name:<32} {mode:<5} student {row[2]:8.1f} ms  ta {row[3]:8.1f} ms  nested {row[4]:8.1f} ms  "
            f"ratio wall {row[5]:.3f}  cpu {row[6]:.3f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--no-xla", action="store_true", help="time graph mode only")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    args.modes = [False] if args.no_xla else [False, True]
    if args.quick:
        args.steps, args.repeats, args.warmup = 2, 2, 1
    print(f"load average before: {os.getloadavg()}", flush=True)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    mlp_shape = (
        dict(input_dim=64, student_widths=[128, 64], batch=64)
        if args.quick
        else dict(input_dim=512, student_widths=[1024, 512, 256], batch=1024)
    )
    mlp = nested_mlp(mlp_shape["input_dim"], mlp_shape["student_widths"], multiplier=2)
    features = tf.constant(rng.normal(size=(mlp_shape["batch"], mlp_shape["input_dim"])), tf.float32)
    rows = compare(
        f"MLP {mlp_shape['input_dim']}-{'-'.join(map(str, mlp_shape['student_widths']))}-1 (x2)",
        mlp,
        plain_mlp(mlp, "student", mlp_shape["input_dim"]),
        plain_mlp(mlp, "ta", mlp_shape["input_dim"]),
        features,
        args,
    )

    lm_shape = (
        dict(vocabulary=100, length=16, model_dim=32, num_heads=2, ffn_dim=64, num_blocks=2, batch=4)
        if args.quick
        else dict(vocabulary=1000, length=64, model_dim=128, num_heads=4, ffn_dim=512, num_blocks=4, batch=16)
    )
    lm = nested_transformer(**{k: v for k, v in lm_shape.items() if k != "batch"})
    tokens = tf.constant(rng.integers(0, lm_shape["vocabulary"], (lm_shape["batch"], lm_shape["length"])), tf.int32)
    rows += compare(
        f"Transformer {lm_shape['num_blocks']}x d{lm_shape['model_dim']} ffn {lm_shape['ffn_dim']} (x2)",
        lm,
        plain_transformer(lm, "student", lm_shape["length"], lm_shape["model_dim"]),
        plain_transformer(lm, "ta", lm_shape["length"], lm_shape["model_dim"]),
        tokens,
        args,
    )

    print(
        "\n| Stack | Mode | Student (ms) | TA (ms) | Nested (ms) | Nested / (Student + TA), wall clock "
        "| Nested / (Student + TA), CPU time |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, mode, student_ms, ta_ms, nested_ms, wall_ratio, cpu_ratio in rows:
        print(
            f"| {name} | {mode} | {student_ms:.1f} | {ta_ms:.1f} | {nested_ms:.1f} "
            f"| {wall_ratio:.3f} | {cpu_ratio:.3f} |"
        )
    print(
        f"\nbatch: MLP {mlp_shape['batch']}, Transformer {lm_shape['batch']}x{lm_shape['length']} tokens; "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores; "
        f"load average after: {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
