"""The three MatTA loss terms (Verma et al., 2025, eqs. 1-3) as pure functions of logits and labels.

Per example, over the classes `i` of a `C`-class task (a binary task is the 2-class case, with one
logit `z`: `p_1 = sigmoid(z)`, `p_0 = 1 - p_1`):

- `L_S  = -sum_i y_i    log p_S,i`   (eq. 1, Student vs labels)
- `L_TA = -sum_i y_i    log p_TA,i`  (eq. 2, TA vs labels)
- `L_D  = -sum_i p_TA,i log p_S,i`   (eq. 3, Student vs TA; no gradient into the TA)

Every term is computed from logits with `log_sigmoid` / `log_softmax`, never as the log of a
probability, and in float32 whatever the compute dtype. Labels are first turned into a target
distribution `y` by `label_targets`: class indices become one-hot rows, teacher probabilities are
used as they are and teacher logits go through a sigmoid (binary) or softmax (multi-class).

Example:

```python
from keras import ops
targets = label_targets(ops.convert_to_tensor([1, 0]), task="binary")   # (2, 1)
student_logits = ops.convert_to_tensor([[0.3], [-1.2]])
ta_logits = ops.convert_to_tensor([[1.1], [-2.0]])
student_loss(targets, student_logits, task="binary")   # (2,) per-example L_S
distillation_loss(student_logits, ta_logits, task="binary")   # (2,) per-example L_D
```
"""

from __future__ import annotations

from typing import Any

from keras import ops

from matta_tf._checks import check_choice

TASKS = ("binary", "multiclass")
REPRESENTATIONS = ("class_index", "probabilities", "logits")


def logit_width(task: str, num_classes: int) -> int:
    """Number of logits per example: 1 for a binary task (a sigmoid), `num_classes` otherwise."""
    return 1 if task == "binary" else num_classes


def label_targets(labels: Any, task: str, representation: str = "class_index", num_classes: int = 2) -> Any:
    """The target distribution `y` of eqs. (1) and (2) from labels as they are stored.

    Args:
        labels: Tensor of labels. Class indices: shape `(batch,)` or `(batch, 1)`. Teacher labels of a
            binary task: one float per example (the positive class), `(batch,)` or `(batch, 1)`; of a
            multi-class task: `(batch, num_classes)` floats.
        task: `"binary"` or `"multiclass"`.
        representation: `"class_index"` (default), `"probabilities"` or `"logits"`.
        num_classes: Number of classes of a multi-class task. Defaults to 2.

    Returns:
        float32 targets: `(batch, 1)` probability of the positive class (binary) or `(batch, C)` class
        probabilities (multi-class).
    """
    check_choice("task", task, TASKS)
    check_choice("representation", representation, REPRESENTATIONS)
    if task == "multiclass" and representation == "class_index":
        indices = ops.reshape(ops.cast(labels, "int32"), (-1,))
        return ops.one_hot(indices, num_classes, dtype="float32")
    width = logit_width(task, num_classes)
    values = ops.reshape(ops.cast(labels, "float32"), (-1, width))
    if representation == "logits":
        return probabilities(values, task)
    return values


def valid_label_rows(labels: Any, task: str, representation: str = "class_index", num_classes: int = 2) -> Any:
    """Which examples' labels are valid, `(batch,)` booleans: the label rule of `check_example`, in the graph.

    Class indices must be whole numbers in `[0, num_classes)` (`{0, 1}` for a binary task);
    probabilities must be finite and in `[0, 1]`; logits must be finite.

    Args:
        labels: Labels as `label_targets` takes them.
        task: `"binary"` or `"multiclass"`.
        representation: `"class_index"` (default), `"probabilities"` or `"logits"`.
        num_classes: Number of classes of a multi-class task. Defaults to 2.
    """
    check_choice("task", task, TASKS)
    check_choice("representation", representation, REPRESENTATIONS)
    width = 1 if representation == "class_index" else logit_width(task, num_classes)
    values = ops.reshape(ops.cast(labels, "float32"), (-1, width))
    valid = ops.isfinite(values)
    if representation == "class_index":
        valid = valid & ops.equal(values, ops.floor(values)) & (values >= 0.0) & (values < float(num_classes))
    elif representation == "probabilities":
        valid = valid & (values >= 0.0) & (values <= 1.0)
    return ops.all(valid, axis=-1)


def hard_targets(targets: Any, task: str) -> Any:
    """Hard 0/1 targets from a target distribution: `y >= 0.5` (binary), one-hot argmax (multi-class).

    AUROC and log loss metrics need a hard target; with event labels this is the label itself.
    """
    check_choice("task", task, TASKS)
    if task == "binary":
        return ops.cast(ops.greater_equal(targets, 0.5), "float32")
    return ops.one_hot(ops.argmax(targets, axis=-1), ops.shape(targets)[-1], dtype="float32")


def probabilities(logits: Any, task: str) -> Any:
    """Class probabilities from logits: `sigmoid` (binary, the positive class) or `softmax`."""
    check_choice("task", task, TASKS)
    logits = ops.cast(logits, "float32")
    return ops.sigmoid(logits) if task == "binary" else ops.softmax(logits, axis=-1)


def cross_entropy(targets: Any, logits: Any, task: str) -> Any:
    """Per-example `-sum_i t_i log p_i` with `p = sigmoid(logits)` (binary) or `softmax(logits)`.

    Binary: `-(t log sigmoid(z) + (1 - t) log sigmoid(-z))`, the 2-class cross-entropy.

    Args:
        targets: Target distribution, the shape of `logits`.
        logits: `(batch, 1)` (binary) or `(batch, C)` logits.
        task: `"binary"` or `"multiclass"`.

    Returns:
        float32 tensor of shape `(batch,)`.
    """
    check_choice("task", task, TASKS)
    logits = ops.cast(logits, "float32")
    targets = ops.cast(targets, "float32")
    if task == "binary":
        per_class = targets * ops.log_sigmoid(logits) + (1.0 - targets) * ops.log_sigmoid(-logits)
    else:
        per_class = targets * ops.log_softmax(logits, axis=-1)
    return -ops.sum(per_class, axis=-1)


def student_loss(targets: Any, student_logits: Any, task: str) -> Any:
    """Eq. (1): `L_S = -sum_i y_i log p_S,i` per example, shape `(batch,)`."""
    return cross_entropy(targets, student_logits, task)


def ta_loss(targets: Any, ta_logits: Any, task: str) -> Any:
    """Eq. (2): `L_TA = -sum_i y_i log p_TA,i` per example, shape `(batch,)`."""
    return cross_entropy(targets, ta_logits, task)


def distillation_loss(student_logits: Any, ta_logits: Any, task: str) -> Any:
    """Eq. (3): `L_D = -sum_i p_TA,i log p_S,i` per example, shape `(batch,)`.

    The TA's probabilities are a constant target (`stop_gradient`): L_D moves only the Student.
    For a binary task this is the 2-class cross-entropy with `p_TA = sigmoid(z_TA)` as soft target.
    """
    ta_probabilities = probabilities(ops.stop_gradient(ta_logits), task)
    return cross_entropy(ta_probabilities, student_logits, task)


def disagreement(student_logits: Any, ta_logits: Any, task: str) -> Any:
    """Per example 1.0 where Student and TA predict different classes (churn), else 0.0.

    Binary: the two sides of the 0.5 threshold (`z >= 0`); multi-class: the argmax.
    """
    check_choice("task", task, TASKS)
    if task == "binary":
        student_class = ops.greater_equal(ops.reshape(student_logits, (-1,)), 0.0)
        ta_class = ops.greater_equal(ops.reshape(ta_logits, (-1,)), 0.0)
    else:
        student_class = ops.argmax(student_logits, axis=-1)
        ta_class = ops.argmax(ta_logits, axis=-1)
    return ops.cast(ops.not_equal(student_class, ta_class), "float32")
