"""Inverse p-th roots against numpy: exact cases, ill-conditioned spectra, degenerate and broken inputs."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from matta_tf.optimizers import matrix_functions as mf


def numpy_inverse_root(matrix, root, epsilon=0.0, relative=False):
    """(A + eps I)^(-1/root) in float64 by numpy's eigh (the oracle)."""
    matrix = np.asarray(matrix, np.float64)
    eigenvalues, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    eigenvalues = np.maximum(eigenvalues, 0.0)
    damping = epsilon * eigenvalues.max() if relative else epsilon
    return (vectors * (eigenvalues + damping) ** (-1.0 / root)) @ vectors.T


def known_spectrum(eigenvalues, seed=0):
    """A symmetric matrix with the given eigenvalues and a random orthogonal basis (float64)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return (basis * np.asarray(eigenvalues)) @ basis.T, basis


def relative_error(actual, expected):
    return np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)


@pytest.mark.parametrize("root", [1, 2, 4, 6])
def test_diagonal_matrices_are_exact(root):
    diagonal = np.array([4.0, 1.0, 0.25, 9.0, 1e-3])
    expected = np.diag((diagonal + 1e-4) ** (-1.0 / root))
    eigh = mf.inverse_root_eigh(tf.constant(np.diag(diagonal)), root, epsilon=1e-4)
    np.testing.assert_allclose(eigh.numpy(), expected, rtol=1e-12, atol=1e-14)
    newton, error = mf.inverse_root_newton(tf.constant(np.diag(diagonal)), root, epsilon=1e-4, tolerance=1e-12)
    np.testing.assert_allclose(newton.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert float(error) < 1e-9
    vector = mf.inverse_root_diagonal(tf.constant(diagonal), root, epsilon=1e-4)
    np.testing.assert_allclose(vector.numpy(), np.diag(expected), rtol=1e-12)


@pytest.mark.parametrize("root", [2, 4])
def test_known_spectrum_float64(root):
    eigenvalues = np.array([10.0, 3.0, 1.0, 0.5, 0.1, 0.01])
    matrix, basis = known_spectrum(eigenvalues)
    expected = (basis * eigenvalues ** (-1.0 / root)) @ basis.T
    eigh = mf.inverse_root_eigh(tf.constant(matrix), root)
    assert relative_error(eigh, expected) < 1e-12
    newton, _ = mf.inverse_root_newton(tf.constant(matrix), root, tolerance=1e-12)
    assert relative_error(newton, expected) < 1e-9


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("condition", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("root", [2, 4])
def test_ill_conditioned_float32_error_below_tenth(method, condition, root):
    eigenvalues = np.logspace(0.0, -np.log10(condition), 32)
    matrix, basis = known_spectrum(eigenvalues, seed=int(np.log10(condition)))
    expected = (basis * eigenvalues ** (-1.0 / root)) @ basis.T
    result = mf.matrix_inverse_root(
        tf.constant(matrix, tf.float32), root, epsilon=0.0, method=method, retry_float64=False
    )
    assert bool(result.ok)
    assert relative_error(result.root, expected) < 0.1


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("relative", [False, True])
def test_rank_deficient_matrix_is_damped_not_nan(method, relative):
    rng = np.random.default_rng(1)
    factor = rng.normal(size=(16, 3))
    matrix = factor @ factor.T  # rank 3 of 16
    epsilon = 1e-3 if relative else 1e-2
    expected = numpy_inverse_root(matrix, 4, epsilon, relative)
    result = mf.matrix_inverse_root(tf.constant(matrix, tf.float32), 4, epsilon, relative, method=method)
    assert bool(result.ok)
    assert relative_error(result.root, expected) < 1e-2


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_zero_matrix(method):
    zero = tf.zeros((5, 5), tf.float32)
    absolute = mf.matrix_inverse_root(zero, 4, epsilon=1e-4, method=method)
    assert bool(absolute.ok)
    np.testing.assert_allclose(absolute.root.numpy(), np.eye(5) * 1e-4 ** (-0.25), rtol=1e-5)
    relative = mf.matrix_inverse_root(zero, 4, epsilon=1e-4, relative_epsilon=True, method=method)
    assert bool(relative.ok)
    np.testing.assert_allclose(relative.root.numpy(), np.eye(5), atol=1e-6)
    undamped = mf.matrix_inverse_root(zero, 4, epsilon=0.0, method=method)
    assert not bool(undamped.ok)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_fail_without_raising(method, bad):
    matrices = np.stack([np.eye(4), np.eye(4)]).astype(np.float32)
    matrices[1, 0, 1] = matrices[1, 1, 0] = bad
    result = mf.matrix_inverse_root(tf.constant(matrices), 2, epsilon=1e-6, method=method)
    np.testing.assert_array_equal(result.ok.numpy(), [True, False])
    np.testing.assert_allclose(result.root.numpy()[0], np.eye(4), rtol=1e-5)
    assert np.all(np.isfinite(result.root.numpy()))


def test_newton_error_threshold_marks_failure():
    matrix, _ = known_spectrum(np.logspace(0, -6, 16))
    strict = mf.matrix_inverse_root(tf.constant(matrix, tf.float32), 4, method="newton", error_threshold=1e-12)
    assert not bool(strict.ok)


def test_relative_epsilon_matches_numpy():
    matrix, _ = known_spectrum(np.array([100.0, 1.0, 1e-6, 0.0]))
    expected = numpy_inverse_root(matrix, 4, 1e-3, relative=True)
    eigh = mf.inverse_root_eigh(tf.constant(matrix), 4, 1e-3, relative_epsilon=True)
    assert relative_error(eigh, expected) < 1e-10
    newton, _ = mf.inverse_root_newton(tf.constant(matrix), 4, 1e-3, relative_epsilon=True, tolerance=1e-12)
    assert relative_error(newton, expected) < 1e-6


def test_batched_roots_equal_one_at_a_time():
    rng = np.random.default_rng(2)
    factors = rng.normal(size=(3, 6, 8))
    matrices = factors @ np.swapaxes(factors, 1, 2)
    # Newton stops at its tolerance (1e-6 on max|M - I|), eigh is exact up to rounding.
    for method, tolerance in (("eigh", 1e-12), ("newton", 1e-6)):
        batched = mf.matrix_inverse_root(tf.constant(matrices), 4, 1e-3, method=method).root.numpy()
        for i in range(3):
            assert relative_error(batched[i], numpy_inverse_root(matrices[i], 4, 1e-3)) < tolerance


def test_largest_eigenvalue_matches_numpy():
    matrix, _ = known_spectrum(np.array([5.0, 4.0, 1.0, 0.1]))
    assert abs(float(mf.largest_eigenvalue(tf.constant(matrix))) - 5.0) < 1e-3


def test_float64_retry_repairs_float32_failure():
    # float32 cannot represent eps = 1e-50: the damped zero eigenvalue underflows and the float32
    # root is inf; float64 can, so the retry returns a finite root.
    matrix = tf.constant(np.diag([1.0, 0.0]), tf.float32)
    result = mf.matrix_inverse_root(matrix, 2, epsilon=1e-50, retry_float64=True)
    assert bool(result.ok)
    np.testing.assert_allclose(result.root.numpy(), np.diag([1.0, np.float32(1e25)]), rtol=1e-5)
    no_retry = mf.matrix_inverse_root(matrix, 2, epsilon=1e-50, retry_float64=False)
    assert not bool(no_retry.ok)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_roots_compile_with_xla(method):
    matrix, _ = known_spectrum(np.array([4.0, 2.0, 1.0]))
    compiled = tf.function(
        lambda m: mf.matrix_inverse_root(m, 2, 1e-6, method=method, retry_float64=False), jit_compile=True
    )
    result = compiled(tf.constant(matrix, tf.float32))
    assert bool(result.ok)
    assert relative_error(result.root, numpy_inverse_root(matrix, 2, 1e-6)) < 1e-4


@settings(max_examples=20, deadline=None)
@given(
    size=st.integers(1, 8),
    rank=st.integers(1, 8),
    root=st.sampled_from([1, 2, 4, 6]),
    seed=st.integers(0, 2**16),
)
def test_root_inverts_the_damped_matrix(size, rank, root, seed):
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, rank))
    matrix = factor @ factor.T
    epsilon = 1e-2
    result = mf.inverse_root_eigh(tf.constant(matrix), root, epsilon).numpy()
    # X^(-root) must give back A + eps I (A is PSD, so no clamping happens beyond rounding).
    power = np.linalg.matrix_power(np.linalg.inv(result), root)
    np.testing.assert_allclose(power, matrix + epsilon * np.eye(size), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# The stored basis refreshed by orthogonal iteration (`method="qr"`, Shampoo's XLA default).
# ---------------------------------------------------------------------------------------------
def test_qr_refresh_from_the_eigenbasis_is_exact():
    matrix, basis = known_spectrum([1e-3, 0.1, 1.0, 2.0, 5.0, 9.0], seed=3)
    result = mf.matrix_inverse_root(
        tf.constant(matrix), 4, 1e-6, method="qr", eigenvectors=tf.constant(basis), return_eigenvectors=True
    )
    np.testing.assert_allclose(result.root.numpy(), numpy_inverse_root(matrix, 4, 1e-6), rtol=1e-9, atol=1e-12)
    refreshed = result.eigenvectors.numpy()
    np.testing.assert_allclose(refreshed.T @ refreshed, np.eye(6), atol=1e-12)
    # An eigenbasis stays one: each new column is parallel to an old one.
    np.testing.assert_allclose(np.abs(np.sum(refreshed * basis, axis=0)), 1.0, rtol=1e-9)


def test_one_qr_refresh_is_numpys_qr_of_the_product():
    rng = np.random.default_rng(4)
    factor = rng.normal(size=(5, 9))
    matrix = factor @ factor.T
    start = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    refreshed = mf.orthogonal_iteration(tf.constant(matrix), tf.constant(start)).numpy()
    expected = np.linalg.qr(matrix @ start)[0]
    np.testing.assert_allclose(np.abs(np.sum(refreshed * expected, axis=0)), 1.0, rtol=1e-9)  # up to signs
    np.testing.assert_allclose(refreshed.T @ refreshed, np.eye(5), atol=1e-12)


def test_orthogonal_iteration_converges_to_the_inverse_root():
    # Distinct eigenvalues, ratio 2 between neighbours: each step shrinks the error by about half.
    matrix, _ = known_spectrum(2.0 ** -np.arange(6), seed=5)
    basis = tf.constant(np.linalg.qr(np.random.default_rng(6).normal(size=(6, 6)))[0])
    first = None
    for _ in range(60):
        result = mf.matrix_inverse_root(
            tf.constant(matrix), 2, 1e-9, method="qr", eigenvectors=basis, return_eigenvectors=True
        )
        basis = result.eigenvectors
        error = relative_error(result.root.numpy(), numpy_inverse_root(matrix, 2, 1e-9))
        first = error if first is None else first
    assert first > 1e-2 and error < 1e-9


def test_qr_refresh_of_a_non_finite_matrix_fails_without_raising():
    matrices = np.stack([np.eye(4), np.eye(4)])
    matrices[1, 0, 1] = matrices[1, 1, 0] = np.nan
    result = mf.matrix_inverse_root(
        tf.constant(matrices), 2, 1e-6, method="qr", eigenvectors=tf.constant(np.stack([np.eye(4)] * 2)),
        return_eigenvectors=True,
    )
    np.testing.assert_array_equal(result.ok.numpy(), [True, False])
    assert np.all(np.isfinite(result.root.numpy())) and np.all(np.isfinite(result.eigenvectors.numpy()))
    with pytest.raises(ValueError, match="eigenvectors"):
        mf.matrix_inverse_root(tf.constant(matrices), 2, method="qr")
