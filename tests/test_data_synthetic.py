"""kmtl.data.synthetic: Ma et al.'s tasks of a set relatedness."""

import numpy as np
import pytest

from kmtl.data import synthetic


def _weights(num_tasks, correlation, input_dim=100, scale=1.0):
    weights, _, _, _ = synthetic._task_parameters(num_tasks, input_dim, correlation, scale, 10, 0)
    return weights


@pytest.mark.parametrize("correlation", [-1.0, -0.3, 0.0, 0.5, 0.999, 1.0])
def test_the_weight_vectors_have_the_set_cosine_and_norm(correlation):
    w = _weights(2, correlation, scale=3.0)
    norms = np.linalg.norm(w, axis=1)
    np.testing.assert_allclose(norms, 3.0, rtol=1e-12)
    np.testing.assert_allclose(w[0] @ w[1] / (norms[0] * norms[1]), correlation, atol=1e-12)


def test_two_tasks_are_ma_et_al_construction():
    # w_1 = c u_1, w_2 = c (p u_1 + sqrt(1 - p^2) u_2) with u_1 ⟂ u_2 unit vectors.
    p, c = 0.6, 2.0
    w = _weights(2, p, scale=c)
    u1 = w[0] / c
    u2 = (w[1] / c - p * u1) / np.sqrt(1 - p * p)
    np.testing.assert_allclose([u1 @ u1, u2 @ u2, u1 @ u2], [1.0, 1.0, 0.0], atol=1e-12)


def test_a_cosine_matrix_and_a_semidefinite_one():
    cosines = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    w = _weights(3, cosines)
    np.testing.assert_allclose(w @ w.T, cosines, atol=1e-12)
    # Every pair at -1/(T-1) (the vertices of a simplex) and every pair at 1 are singular.
    for p in (-0.5, 1.0):
        w = _weights(3, p)
        gram = w @ w.T
        np.testing.assert_allclose(gram, (1 - p) * np.eye(3) + p, atol=1e-12)


def test_measured_label_correlation_matches_the_quadrature():
    # The relation documented in the module: rho(p) <= p on [0, 1], rho(0) = 0, rho(1) ~ 1.
    expected = [synthetic.expected_label_correlation(p) for p in (0.0, 0.5, 0.9, 1.0)]
    assert expected[0] == pytest.approx(0.0, abs=1e-12)
    assert 0 < expected[1] < 0.5 and expected[1] < expected[2] < 0.9 < expected[3] <= 1.0
    for p, rho in zip((0.0, 0.5, 0.9, 1.0), expected):
        _, y = synthetic.synthetic_tasks(2, p, num_examples=100_000, seed=7)
        measured = synthetic.label_correlation(y)[("task_0", "task_1")]
        # The standard error of a sample correlation is about (1 - rho^2) / sqrt(n).
        assert measured == pytest.approx(rho, abs=4 * (1 - rho**2) / np.sqrt(100_000) + 1e-3), p


def test_a_linear_task_has_the_cosine_as_label_correlation():
    # With no sinusoids and no noise, f is linear and the correlation is the cosine itself.
    for p in (-0.7, 0.3, 0.8):
        assert synthetic.expected_label_correlation(p, num_sinusoids=0, noise=0.0) == pytest.approx(
            p, abs=1e-12
        )


def test_the_task_seed_fixes_the_tasks_and_the_seed_the_examples():
    x_train, y_train = synthetic.synthetic_tasks(2, 0.5, 500, input_dim=8, seed=1, noise=0.0)
    x_test, y_test = synthetic.synthetic_tasks(2, 0.5, 500, input_dim=8, seed=2, noise=0.0)
    assert not np.allclose(x_train, x_test)
    # The same labelling function on both: a linear fit of y on (x w, sinusoids) is exact on each,
    # which we check by recomputing the labels from the task parameters.
    w, alpha, beta, _ = synthetic._task_parameters(2, 8, 0.5, 1.0, 10, 0)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        labels = synthetic._labels(x.astype(np.float64) @ w.T, alpha, beta)
        np.testing.assert_allclose(labels[:, 1], y["task_1"], rtol=1e-5, atol=1e-5)
    _, other = synthetic.synthetic_tasks(2, 0.5, 500, input_dim=8, seed=1, noise=0.0, task_seed=5)
    assert not np.allclose(other["task_0"], y_train["task_0"])
    # Same seeds, same arrays.
    again = synthetic.synthetic_tasks(2, 0.5, 500, input_dim=8, seed=1, noise=0.0)
    np.testing.assert_array_equal(again[0], x_train)


def test_shapes_names_and_dataset():
    x, y = synthetic.synthetic_tasks(3, 0.2, 64, input_dim=5)
    assert x.shape == (64, 5) and x.dtype == np.float32
    assert list(y) == synthetic.synthetic_task_names(3) == ["task_0", "task_1", "task_2"]
    assert all(v.shape == (64,) and v.dtype == np.float32 for v in y.values())
    assert [h.name for h in synthetic.synthetic_heads(3)] == list(y)
    batches = list(synthetic.synthetic_task_dataset(3, 0.2, 64, input_dim=5, batch_size=32, shuffle=False))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0][0].numpy(), x[:32])
    np.testing.assert_array_equal(batches[1][1]["task_2"].numpy(), y["task_2"][32:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=2.0), "num_tasks"),
        (dict(num_tasks=3, correlation=-0.6), "correlation"),
        (dict(correlation=1.5), "correlation"),
        (dict(correlation=float("nan")), "correlation"),
        (dict(correlation=[[1.0, 0.5], [0.4, 1.0]]), "symmetric"),
        (dict(correlation=[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]), "2x2"),
        (dict(num_tasks=3, correlation=[[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]]), "semidefinite"),
        (dict(num_tasks=4, input_dim=3), "input_dim"),
        (dict(num_examples=0), "num_examples"),
        (dict(noise=-0.1), "noise"),
        (dict(scale=0.0), "scale"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        synthetic.synthetic_tasks(**kwargs)
    assert "Received" in str(error.value)
