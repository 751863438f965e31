"""How Shampoo cuts a parameter into blocks and which of its dimensions get a full factor.

A `PreconditionerLayout` is plain, static data decided once per parameter when the optimizer is
built: for every dimension, whether its Kronecker factor is a full matrix or only its diagonal
(dimensions larger than `diagonal_threshold`, e.g. the vocabulary of an embedding table), and how a
full dimension larger than `block_size` is cut into blocks. Each block is preconditioned as a tensor
of its own, with one factor per dimension, which bounds a full factor at `block_size ** 2` entries.

Blocks are numbered in row-major order over the block grid; `split_blocks` and `merge_blocks` move
between a tensor and its list of blocks with static slicing only (fine under XLA).
"""

import dataclasses
import itertools
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class PreconditionerLayout:
    """Static preconditioning plan for one parameter.

    Attributes:
        shape: the shape that is preconditioned (a scalar is treated as shape `(1,)`).
        diagonal: per dimension, whether its factor is kept as a diagonal (a vector).
        splits: per dimension, the sizes of its blocks (a single block when not cut).
    """

    shape: tuple[int, ...]
    diagonal: tuple[bool, ...]
    splits: tuple[tuple[int, ...], ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def num_blocks(self) -> int:
        return math.prod(len(s) for s in self.splits)

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        """Shape of every block, in row-major block order."""
        return [tuple(sizes) for sizes in itertools.product(*self.splits)]

    @property
    def is_blocked(self) -> bool:
        return self.num_blocks > 1


def _split_sizes(size: int, block_size: int) -> tuple[int, ...]:
    full, rest = divmod(size, block_size)
    return (block_size,) * full + ((rest,) if rest else ())


def plan_layout(
    shape: tuple[int, ...],
    block_size: int,
    diagonal_threshold: int,
    diagonal_rank1: bool = False,
    diagonal_first: bool = False,
) -> PreconditionerLayout:
    """Decides the factors and blocks of a parameter of the given shape.

    Args:
        shape: the parameter's static shape.
        block_size: full dimensions longer than this are cut into blocks of this size (the last
            block takes the remainder).
        diagonal_threshold: dimensions longer than this keep only the diagonal of their factor
            (and are not cut: a diagonal factor is cheap at any size).
        diagonal_rank1: keep the diagonal factor of rank-1 parameters (AdaGrad on biases).
        diagonal_first: keep the diagonal factor of the first dimension whatever its size (the
            vocabulary of an embedding table).
    """
    shape = tuple(int(d) for d in shape) or (1,)
    diagonal = tuple(
        d > diagonal_threshold or (diagonal_rank1 and len(shape) == 1) or (diagonal_first and axis == 0)
        for axis, d in enumerate(shape)
    )
    splits = tuple(
        (d,) if is_diagonal else _split_sizes(d, block_size) for d, is_diagonal in zip(shape, diagonal, strict=True)
    )
    return PreconditionerLayout(shape=shape, diagonal=diagonal, splits=splits)


def split_blocks(tensor: tf.Tensor, layout: PreconditionerLayout) -> list[tf.Tensor]:
    """Cuts `tensor` (of `layout.shape`) into its blocks, in row-major block order."""
    tensor = tf.reshape(tensor, layout.shape)
    if not layout.is_blocked:
        return [tensor]
    pieces = [tensor]
    for axis, sizes in enumerate(layout.splits):
        if len(sizes) > 1:
            pieces = [part for piece in pieces for part in tf.split(piece, list(sizes), axis=axis)]
    return pieces


def merge_blocks(blocks: list[tf.Tensor], layout: PreconditionerLayout) -> tf.Tensor:
    """Inverse of `split_blocks`: reassembles the blocks into a tensor of `layout.shape`."""
    if not layout.is_blocked:
        return tf.reshape(blocks[0], layout.shape)
    pieces = list(blocks)
    # Undo the splits from the last cut axis to the first.
    for axis in reversed(range(layout.rank)):
        count = len(layout.splits[axis])
        if count > 1:
            pieces = [tf.concat(pieces[start : start + count], axis=axis) for start in range(0, len(pieces), count)]
    return pieces[0]
