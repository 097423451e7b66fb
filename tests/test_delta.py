import dataclasses
import math
import re

import pytest

import kmtl
from kmtl.evaluation import HIGHER_IS_BETTER, LOWER_IS_BETTER, Delta, Report, delta_m

BASELINES = {"digit": {"accuracy": 0.90, "auc": 0.80}, "value": {"mae": 1.0}}
RESULTS = {"digit": {"accuracy": 0.99, "auc": 0.72}, "value": {"mae": 0.75}}


def _raises(match, *args, **kwargs):
    """Calls `delta_m` expecting a Keras-style ValueError matching `match`."""
    with pytest.raises(ValueError, match=match) as info:
        delta_m(*args, **kwargs)
    assert re.search(r"Received: .+$", str(info.value)), str(info.value)
    return str(info.value)


def test_hand_computed_values_and_the_two_conventions_differ():
    d = delta_m(RESULTS, BASELINES)
    # Terms of Δm, (-1)^δ (M - B) / B * 100, δ = 1 when higher is better (positive = worse):
    #   digit/accuracy: -(0.99 - 0.90) / 0.90 = -10
    #   digit/auc:      -(0.72 - 0.80) / 0.80 = +10
    #   value/mae (lower is better): +(0.75 - 1.0) / 1.0 = -25
    # Δm = (-10 + 10 - 25) / 3 = -8.333...
    # Δp = mean over tasks of the mean improvement: digit (10 - 10) / 2 = 0, value +25 -> (0 + 25) / 2 = 12.5
    assert isinstance(d, Delta)
    assert d.terms == pytest.approx(
        {("digit", "accuracy"): -10.0, ("digit", "auc"): 10.0, ("value", "mae"): -25.0}
    )
    assert list(d.terms) == [("digit", "accuracy"), ("digit", "auc"), ("value", "mae")]
    assert d.delta_m == pytest.approx(-25.0 / 3.0)
    assert d.delta_p == pytest.approx(12.5)
    assert d.compared == 3 and d.tasks == ("digit", "value")
    assert dict(d.higher_is_better) == {
        ("digit", "accuracy"): True,
        ("digit", "auc"): True,
        ("value", "mae"): False,
    }
    assert str(d) == (
        "Δm = -8.33% (lower is better) · Δp = +12.50% (higher is better) over 3 metrics of 2 tasks"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.delta_m = 0.0


def test_matches_libmtl_count_improvement_docstring_example():
    # LibMTL's count_improvement example: base A=[96, 98], B=[0.2]; new A=[93, 99], B=[0.5];
    # weight A=[1, 0] (1 = higher is better), B=[1].
    # A: ((93 - 96) / 96 + -(99 - 98) / 98) / 2 = (-0.03125 - 0.0102041) / 2 = -0.0207270
    # B: (0.5 - 0.2) / 0.2 = 1.5.  LibMTL: (1.5 - 0.0207270) / 2 = 0.7396365 (a fraction) -> 73.96365%.
    # Δm terms: +3.125, +1.0204082, -150 -> Δm = -145.8545918 / 3 = -48.6181973.
    d = delta_m(
        {"A": {"m1": 93, "m2": 99}, "B": {"m": 0.5}},
        {"A": {"m1": 96, "m2": 98}, "B": {"m": 0.2}},
        higher_is_better={"A/m1": True, "A/m2": False, "B/m": True},
    )
    assert d.delta_p == pytest.approx(73.96365, abs=1e-4)
    assert d.delta_m == pytest.approx(-48.6181973, abs=1e-6)


@pytest.mark.parametrize(
    "results",
    [
        {"digit": {"accuracy": 0.95, "auc": 0.85}, "value": {"mae": 0.5}},  # better everywhere
        {"digit": {"accuracy": 0.91, "auc": 0.81}, "value": {"mae": 0.99}},  # slightly better
    ],
)
def test_a_strictly_better_model_has_negative_delta_m_and_positive_delta_p(results):
    better = delta_m(results, BASELINES)
    assert better.delta_m < 0 < better.delta_p
    assert all(term < 0 for term in better.terms.values())
    worse = delta_m(BASELINES, results)  # swap the roles: the baseline is now worse than the "results"
    assert worse.delta_m > 0 > worse.delta_p
    same = delta_m(BASELINES, BASELINES)
    assert same.delta_m == 0.0 and same.delta_p == 0.0


def test_one_metric_per_task_gives_delta_p_equal_to_minus_delta_m():
    d = delta_m(
        {"digit": {"accuracy": 0.99}, "value": {"mae": 0.5}},
        {"digit": {"accuracy": 0.90}, "value": {"mae": 1.0}},
    )
    # digit: -10, value: (0.5 - 1) / 1 = -50 -> Δm = -30; Δp = (10 + 50) / 2 = +30.
    assert d.delta_m == pytest.approx(-30.0) and d.delta_p == pytest.approx(30.0)
    assert str(d).endswith("over 2 metrics of 2 tasks")


def test_default_tables_and_suffix_matching():
    assert "accuracy" in HIGHER_IS_BETTER and "mae" in LOWER_IS_BETTER
    names = {
        "sparse_top_k_categorical_accuracy": True,
        "macro_f1": True,
        "f1_score": True,
        "precision": True,
        "recall": True,
        "root_mean_squared_error": False,
        "binary_crossentropy": False,
        "mse": False,
        "rmse": False,
        "mean_absolute_error": False,
    }
    results = {"t": {name: 2.0 for name in names}}
    baselines = {"t": {name: 1.0 for name in names}}
    d = delta_m(results, baselines)
    assert {m: d.higher_is_better[("t", m)] for m in names} == names
    # Doubling a higher-is-better metric is -100 (better); a lower-is-better one +100 (worse).
    assert all(d.terms[("t", m)] == pytest.approx(-100.0 if up else 100.0) for m, up in names.items())


def test_loss_is_left_out_by_default_and_compared_when_asked():
    results = {"digit": {"accuracy": 0.99, "loss": 0.5}}
    baselines = {"digit": {"accuracy": 0.90, "loss": 1.0}}
    assert list(delta_m(results, baselines).terms) == [("digit", "accuracy")]
    d = delta_m(results, baselines, metrics={"digit": ["loss"]})
    # loss: lower is better, (0.5 - 1.0) / 1.0 = -50%.
    assert d.terms == pytest.approx({("digit", "loss"): -50.0})


def test_task_metric_override_key_wins_over_the_bare_metric_key():
    results = {"a": {"score": 2.0}, "b": {"score": 2.0}, "value": {"mae": 0.5}}
    baselines = {"a": {"score": 1.0}, "b": {"score": 1.0}, "value": {"mae": 1.0}}
    d = delta_m(results, baselines, higher_is_better={"score": True, "b/score": False, "value/mae": True})
    # a/score: higher is better, (2 - 1) / 1 -> -100; b/score: lower is better -> +100;
    # value/mae overridden to higher is better: -(0.5 - 1) / 1 -> +50.
    assert d.terms == pytest.approx({("a", "score"): -100.0, ("b", "score"): 100.0, ("value", "mae"): 50.0})
    assert d.higher_is_better[("b", "score")] is False
    assert d.delta_m == pytest.approx(50.0 / 3.0)


def test_reports_work_as_inputs_and_overall_rows_are_skipped():
    results = Report(RESULTS, {"loss": 0.3})
    baselines = Report(BASELINES, {"loss": 0.4})
    from_reports = delta_m(results, baselines)
    assert from_reports == delta_m(RESULTS, BASELINES)
    assert from_reports.delta_p == pytest.approx(12.5)
    # A plain "overall" row (as in `Report.to_dict()`) is skipped too, even when only one side has it.
    assert delta_m(results.to_dict(), BASELINES).delta_m == pytest.approx(-25.0 / 3.0)
    assert kmtl.delta_m is delta_m


def test_metrics_restricts_tasks_and_extra_tasks_are_then_ignored():
    results = {**RESULTS, "extra": {"accuracy": 0.5}}
    baselines = {**BASELINES, "other": {"mae": 3.0}}
    d = delta_m(results, baselines, metrics={"digit": ["accuracy"], "value": ["mae"]})
    # digit/accuracy -10, value/mae -25 -> Δm -17.5, Δp (10 + 25) / 2 = 17.5.
    assert d.delta_m == pytest.approx(-17.5) and d.delta_p == pytest.approx(17.5)
    assert d.tasks == ("digit", "value")


def test_task_on_one_side_only_is_an_error_without_metrics():
    message = _raises("same tasks", RESULTS, {**BASELINES, "parity": {"accuracy": 0.5}})
    assert "only in baselines=['parity']" in message
    message = _raises("same tasks", {**RESULTS, "parity": {"accuracy": 0.5}}, BASELINES)
    assert "only in results=['parity']" in message


def test_missing_task_or_metric_named_by_metrics_is_an_error():
    _raises(
        "Task 'parity' of `metrics` is not in `results`", RESULTS, BASELINES, metrics={"parity": ["accuracy"]}
    )
    _raises(
        "Task 'parity' of `metrics` is not in `baselines`",
        {**RESULTS, "parity": {"accuracy": 0.5}},
        BASELINES,
        metrics={"parity": ["accuracy"]},
    )
    _raises(
        "Metric 'auc' of task 'digit' is missing from `results`",
        {"digit": {"accuracy": 0.99}},
        BASELINES,
        metrics={"digit": ["auc"]},
    )
    _raises(
        "Metric 'f1' of task 'digit' is missing from `baselines`",
        {"digit": {"f1": 0.5}},
        BASELINES,
        metrics={"digit": ["f1"]},
    )
    _raises("non-empty list of metric names", RESULTS, BASELINES, metrics={"digit": "accuracy"})
    _raises("non-empty list of metric names", RESULTS, BASELINES, metrics={"digit": []})


def test_task_sharing_no_metric_is_an_error():
    _raises(
        "Task 'digit' has no metric other than `loss`", {"digit": {"loss": 0.1}}, {"digit": {"loss": 0.2}}
    )


@pytest.mark.parametrize("base", [0.0, math.nan, math.inf])
def test_zero_or_non_finite_baseline_is_an_error(base):
    _raises("Baseline digit/accuracy must be", {"digit": {"accuracy": 0.9}}, {"digit": {"accuracy": base}})


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_non_finite_result_is_an_error(value):
    _raises(
        "Result digit/accuracy must be finite", {"digit": {"accuracy": value}}, {"digit": {"accuracy": 0.9}}
    )


def test_non_numeric_value_is_an_error():
    _raises(
        "Result digit/accuracy must be a number", {"digit": {"accuracy": None}}, {"digit": {"accuracy": 0.9}}
    )


def test_nothing_to_compare_is_an_error():
    _raises("Nothing to compare", {}, {})
    _raises("Nothing to compare", {"overall": {"loss": 1.0}}, Report({}, {"loss": 1.0}))
    _raises("Nothing to compare", RESULTS, BASELINES, metrics={})


def test_higher_is_better_values_must_be_bools_and_keys_must_name_compared_metrics():
    message = _raises("must be True or False", RESULTS, BASELINES, higher_is_better={"accuracy": 1})
    assert "'accuracy': 1" in message
    _raises("must be True or False", RESULTS, BASELINES, higher_is_better={"digit/auc": "yes"})
    _raises("key 'acuracy' names no compared metric", RESULTS, BASELINES, higher_is_better={"acuracy": True})
    _raises(
        "key 'value/accuracy' names no compared metric",
        RESULTS,
        BASELINES,
        higher_is_better={"value/accuracy": True},
    )
    _raises("must be a mapping", RESULTS, BASELINES, higher_is_better=[("accuracy", True)])


def test_unknown_metric_direction_is_an_error_that_says_what_to_pass():
    message = _raises(
        "Cannot tell whether a higher or a lower 'score' is better",
        {"a": {"score": 2.0}},
        {"a": {"score": 1.0}},
    )
    assert 'higher_is_better={"score": True|False}' in message and '"a/score"' in message


def test_inputs_must_be_mappings_of_mappings():
    _raises("`results` must be a mapping", [("digit", {})], BASELINES)
    _raises("Each task of `baselines` must map metric names", RESULTS, {"digit": 0.9, "value": {"mae": 1.0}})
