"""ESMM: the product of its towers, the entire-space losses, its checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads, trunks

ROLES = ("watched", "liked_given_watched", "watched_and_liked")


def _heads(*extra, cvr_hidden=(8,)):
    return [
        heads.Binary("watched"),
        heads.Binary("liked_given_watched", hidden_units=cvr_hidden),
        heads.Binary("watched_and_liked"),
        *extra,
    ]


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    watched = (x[:, 0] > 0).astype("float32")
    liked = (x[:, 1] > 0).astype("float32")
    y = {"watched": watched, "liked_given_watched": liked, "watched_and_liked": watched * liked}
    weights = {
        "watched": np.ones(n, "float32"),
        "liked_given_watched": watched,
        "watched_and_liked": np.ones(n, "float32"),
    }
    return x, y, weights


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = kmtl.build_model(heads=_heads(), trunk=trunks.dense((16,)), input_shape=(6,), architecture="esmm")
    m.compile(optimizer=keras.optimizers.Adam(0.01))
    return m


def test_ctcvr_is_the_product_of_the_two_towers(model):
    x, _, _ = _data()
    representation = model.encoder(x)
    sigmoid = lambda t: 1.0 / (1.0 + np.exp(-np.asarray(t, "float64")))  # noqa: E731
    out = model.predict(x, verbose=0)
    np.testing.assert_allclose(out["watched"], sigmoid(representation["ctr_logit"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["liked_given_watched"], sigmoid(representation["cvr_logit"]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        out["watched_and_liked"], out["watched"] * out["liked_given_watched"], rtol=1e-5
    )
    # Every variable is shared (the towers); the three decoders have none.
    assert all(not v for v in model.task_variables.values())
    assert model.untrained_heads == ("liked_given_watched",) and not model.supports_representation


def test_losses_are_the_entire_space_ones(model):
    x, y, weights = _data()
    assert model.objective.task_names == ["watched", "watched_and_liked"]
    logs = model.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)
    out = model.predict(x, verbose=0)

    def bce(label, p):
        p = np.clip(np.asarray(p, "float64").ravel(), 1e-7, 1 - 1e-7)
        return float(np.mean(-(label * np.log(p) + (1 - label) * np.log(1 - p))))

    # Over every example (the entire space), not only the watched ones.
    expected = bce(y["watched"], out["watched"]) + bce(y["watched_and_liked"], out["watched_and_liked"])
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)
    # The conversion tower learns only through the product: the click loss
    # gives it no gradient, the joint loss does.
    cvr_variables = [v for v in model.shared_variables if v.path.startswith("cvr_")]
    assert cvr_variables
    with tf.GradientTape(persistent=True) as tape:
        pred = model(x, training=True)
        ctr_loss = keras.losses.binary_crossentropy(y["watched"][:, None], pred["watched"])
        ctcvr_loss = keras.losses.binary_crossentropy(
            y["watched_and_liked"][:, None], pred["watched_and_liked"]
        )
    assert all(g is None for g in tape.gradient(ctr_loss, cvr_variables))
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in tape.gradient(ctcvr_loss, cvr_variables))
    # Its metrics read the masked labels: the watched examples only.
    keep = weights["liked_given_watched"] > 0
    accuracy = np.mean((out["liked_given_watched"].ravel()[keep] > 0.5) == y["liked_given_watched"][keep])
    assert logs["liked_given_watched_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_training_lowers_both_entire_space_losses_also_with_a_gradient_strategy():
    x, y, weights = _data(256)
    for weighting in (None, kmtl.weighting.get("pcgrad")):
        keras.utils.set_random_seed(1)
        m = kmtl.build_model(heads=_heads(), trunk=trunks.dense((16,)), input_shape=(6,), architecture="esmm")
        m.compile(optimizer=keras.optimizers.Adam(0.02), weighting=weighting)
        history = m.fit(x, y, sample_weight=weights, epochs=8, batch_size=64, verbose=0).history
        for task in ("watched", "watched_and_liked"):
            assert history[f"{task}_loss"][-1] < 0.8 * history[f"{task}_loss"][0], (weighting, task, history)


def test_a_loss_for_the_conversion_head_and_further_heads_are_accepted():
    keras.utils.set_random_seed(2)
    m = kmtl.build_model(
        heads=_heads(heads.Regression("rating")),
        trunk=trunks.dense((8,)),
        input_shape=(6,),
        architecture="esmm",
    )
    assert len(m.task_variables["rating"]) == 4  # its own trunk copy and output layer
    m.compile(loss={"liked_given_watched": heads.Binary("liked_given_watched").loss()})
    assert m.objective.task_names == ["watched", "liked_given_watched", "watched_and_liked", "rating"]


@pytest.mark.parametrize(
    "hs, options, message",
    [
        (_heads()[:2], {}, "no head is named ctcvr='watched_and_liked'"),
        ([heads.Classification("watched", 3), *_heads()[1:]], {}, "must be a kmtl.heads.Binary head"),
        (_heads(), {"cvr": "watched"}, "three different heads"),
        ([*_heads()[:2], heads.Binary("watched_and_liked", hidden_units=(4,))], {}, "has no tower"),
    ],
)
def test_bad_configurations_are_clear_errors(hs, options, message):
    with pytest.raises(ValueError, match=message):
        kmtl.build_model(heads=hs, trunk=trunks.dense((8,)), input_shape=(6,), architecture="esmm", **options)
