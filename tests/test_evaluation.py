import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads, trunks
from kmtl.evaluation import Report, delta_m, report_from_logs


def test_report_from_logs_splits_by_longest_task_name():
    logs = {
        "loss": 1.0,
        "digit_loss": 0.5,
        "digit_accuracy": 0.9,
        "digit_group_loss": 0.2,
        "weight_digit": 1.0,
    }
    report = report_from_logs(logs, ["digit", "digit_group"])
    assert report["digit"] == {"loss": 0.5, "accuracy": 0.9}
    assert report["digit_group"] == {"loss": 0.2}
    # Task weights (here kmtl 0.1's legacy key) are training logs, not metrics.
    assert report.overall == {"loss": 1.0}
    assert "| task | loss | accuracy |" in report.to_markdown()
    assert report.to_dict()["overall"]["loss"] == 1.0
    with pytest.raises(KeyError, match="No task 'x'"):
        report["x"]


def test_evaluate_returns_per_task_table():
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 3), heads.Regression("value")],
        trunk=trunks.dense((4,)),
        input_shape=(2,),
    )
    model.compile()
    x = np.zeros((8, 2), "float32")
    ds = tf.data.Dataset.from_tensor_slices(
        (x, {"digit": np.zeros(8, "int32"), "value": np.ones(8, "float32")})
    ).batch(4)
    report = kmtl.evaluate(model, ds)
    assert set(report) == {"digit", "value"} and "accuracy" in report["digit"] and "mae" in report["value"]
    assert "digit" in str(report)
    with pytest.raises(ValueError, match="compiled"):
        kmtl.evaluate(
            kmtl.build_model(heads=[heads.Binary("b")], trunk=trunks.dense((2,)), input_shape=(2,)), ds
        )


def test_delta_m_hand_computed():
    mtl = {"digit": {"accuracy": 0.99}, "value": {"mae": 0.5}}
    single = {"digit": {"accuracy": 0.90}, "value": {"mae": 1.0}}
    # Δm terms (positive = worse): digit -(0.99-0.90)/0.90 = -10%; value (lower is better) (0.5-1)/1 = -50%.
    # Δm = (-10 - 50) / 2 = -30%; Δp (positive = better, one metric per task) = (10 + 50) / 2 = +30%.
    result = delta_m(Report(mtl), Report(single))
    assert result.delta_m == pytest.approx(-30.0)
    assert result.delta_p == pytest.approx(30.0)
    with pytest.raises(ValueError, match="non-zero"):
        delta_m(mtl, {"digit": {"accuracy": 0.0}, "value": {"mae": 1.0}})
    with pytest.raises(ValueError, match="same tasks"):
        delta_m(mtl, {"parity": {"accuracy": 0.5}})
