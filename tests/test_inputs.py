"""Tabular feature inputs: `kmtl.inputs` specs, the `FeatureEncoder` layer and models on features.

One fresh subprocess checks the `.keras` file and the SavedModel on raw
inputs (importing TensorFlow costs seconds).
"""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads, inputs, trunks, weighting
from kmtl.backend.tensorflow.step import use_gram_engine

GENRES = ["action", "comedy", "drama", "horror", "romance", "scifi"]


def _table(n, seed=0):
    """Synthetic tabular data: raw columns and two learnable tasks."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, n)
    counts = rng.integers(0, 5, n)
    genres = np.array(
        [[GENRES[g] for g in rng.integers(0, len(GENRES), c)] + [""] * (4 - c) for c in counts], dtype=str
    )
    x = {
        "user_id": users.astype(str),
        "zip_prefix": rng.integers(0, 1000, n).astype(str),
        "age": rng.normal(40.0, 10.0, n),
        "year": rng.uniform(1950.0, 2020.0, n),
        "genres": genres,
    }
    click = ((users % 3 == 0) ^ (x["age"] > 40)).astype("float32")
    rating = (x["year"] - 1985.0) / 20.0 + (genres == "drama").sum(1) - 0.5 * (genres == "horror").sum(1)
    return x, {"click": click, "rating": rating.astype("float32")}


def _spec():
    return inputs.Features(
        [
            inputs.categorical("user_id", embedding_dim=4),
            inputs.hashed("zip_prefix", num_bins=16, embedding_dim=3),
            inputs.numeric("age"),
            inputs.bucketized("year", num_bins=4, embedding_dim=2),
            inputs.multi_categorical("genres", width=4, embedding_dim=5, combiner="mean"),
        ]
    )


def _heads():
    return [heads.Binary("click"), heads.Regression("rating")]


@pytest.fixture(scope="module")
def table():
    return _table(512)


@pytest.fixture(scope="module")
def spec(table):
    return _spec().adapt(table[0])


def _embeddings(model):
    return {v.path: np.array(v) for v in model.shared_variables if "embedding" in v.path}


# ----------------------------------------------------------------- the spec


def test_config_round_trip_keeps_the_adapted_state(table, spec):
    fresh = _spec()
    assert not fresh.adapted and fresh.names == ["user_id", "zip_prefix", "age", "year", "genres"]
    assert "not adapted" in repr(fresh) and fresh != spec
    assert spec.adapted and "not adapted" not in repr(spec)
    assert spec.input_specs() == {
        "user_id": ((), "string"),
        "zip_prefix": ((), "string"),
        "age": ((), "float32"),
        "year": ((), "float32"),
        "genres": ((4,), "string"),
    }
    assert spec.output_dim == 4 + 3 + 1 + 2 + 5

    config = json.loads(json.dumps(spec.get_config()))  # plain JSON, adapted state included
    states = {item["name"]: item["state"] for item in config["features"]}
    assert sorted(states["user_id"]["vocabulary"]) == sorted(set(table[0]["user_id"]))
    assert sorted(states["genres"]["vocabulary"]) == GENRES  # no "" padding
    assert set(states["age"]) == {"mean", "variance"} and len(states["year"]["bin_boundaries"]) == 3
    assert states["zip_prefix"] is None

    rebuilt = inputs.Features.from_config(config)
    assert rebuilt == spec and rebuilt.adapted
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(spec)) == spec
    assert keras.saving.get_registered_object("kmtl>FeatureEncoder") is inputs.FeatureEncoder
    assert keras.saving.get_registered_object("kmtl>Features") is inputs.Features

    # An identical encoder without data: same lookups, so the same output with the same tables.
    a = inputs.FeatureEncoder(spec)
    b = inputs.FeatureEncoder.from_config(json.loads(json.dumps(inputs.FeatureEncoder(rebuilt).get_config())))
    batch = spec.standardize({k: v[:16] for k, v in table[0].items()})
    first = a(batch)
    b(batch)
    b.set_weights(a.get_weights())
    np.testing.assert_array_equal(np.asarray(b(batch)), np.asarray(first))
    assert tuple(first.shape) == (16, spec.output_dim)

    # Re-adapting recomputes adapted state and keeps given values.
    given = inputs.Features([inputs.categorical("user_id", 2, vocabulary=["1", "2"]), inputs.numeric("age")])
    given.adapt({"user_id": np.array(["7", "7"]), "age": np.array([1.0, 3.0])})
    given.adapt({"user_id": np.array(["8", "9"]), "age": np.array([5.0, 7.0])})
    assert given["user_id"].values == ["1", "2"] and given["age"].moments == (6.0, 1.0)


def test_adapt_on_a_dict_and_on_tf_data_agree(table, spec):
    x, y = table
    batched = _spec().adapt(tf.data.Dataset.from_tensor_slices((x, y)).batch(50))  # (dict, labels)
    single = _spec().adapt(tf.data.Dataset.from_tensor_slices(x))  # unbatched dicts
    for other in (batched, single):
        assert other.adapted
        for name in ("user_id", "genres"):
            assert other[name].values == spec[name].values
        np.testing.assert_allclose(other["age"].moments, spec["age"].moments, rtol=1e-4)
        np.testing.assert_allclose(other["year"].boundaries, spec["year"].boundaries, rtol=2e-3)


def test_adapt_checks_columns_with_clear_errors(table):
    x = table[0]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['age'\]. Received: columns \{'user_id'"):
        _spec().adapt({k: v for k, v in x.items() if k != "age"})
    with pytest.raises(ValueError, match=r"feature 'user_id' expects strings .* float64. Received: columns"):
        _spec().adapt({**x, "user_id": np.arange(512.0)})
    with pytest.raises(
        ValueError, match=r"feature 'genres' expects strings \(str or bytes\) of shape \(batch, 4\)"
    ):
        _spec().adapt({**x, "genres": x["genres"][:, :2]})
    with pytest.raises(ValueError, match=r"feature 'age' expects numbers"):
        _spec().adapt(tf.data.Dataset.from_tensor_slices({**x, "age": x["user_id"]}).batch(8))
    with pytest.raises(ValueError, match=r"Feature 'age': adapt needs finite numbers"):
        _spec().adapt({**x, "age": np.full(512, np.nan)})
    with pytest.raises(ValueError, match="Received: data of type ndarray"):
        _spec().adapt(x["age"])
    with pytest.raises(ValueError, match="yields dicts"):
        _spec().adapt(tf.data.Dataset.from_tensor_slices(x["age"]))
    with pytest.raises(ValueError, match="names the model input"):
        inputs.numeric("zip-code")
    with pytest.raises(ValueError, match=r"repeated: \['age'\]"):
        inputs.Features([inputs.numeric("age"), inputs.numeric("age")])
    with pytest.raises(ValueError, match="the padding of a multi_categorical"):
        inputs.multi_categorical("genres", width=2, vocabulary=["a", ""])
    with pytest.raises(ValueError, match="num_bins=5, bin_boundaries"):
        inputs.bucketized("year", num_bins=5, bin_boundaries=[1.0, 2.0])


# ----------------------------------------------------------------- encodings


def _encode(features, batch):
    encoder = inputs.FeatureEncoder(inputs.Features(features))
    return encoder, np.asarray(encoder(inputs.Features(features).standardize(batch)))


def test_numeric_normalisation_matches_the_hand_computation(table, spec):
    age = table[0]["age"]
    mean, variance = spec["age"].moments
    np.testing.assert_allclose([mean, variance], [age.mean(), age.var()], rtol=1e-5)
    _, out = _encode([inputs.numeric("age", mean=4.0, variance=9.0)], {"age": np.array([1.0, 4.0, 10.0])})
    np.testing.assert_allclose(out[:, 0], [-1.0, 0.0, 2.0], rtol=1e-6)


def test_bucketized_bins_match_the_boundaries(table, spec):
    feature = inputs.bucketized("year", embedding_dim=3, bin_boundaries=[0.0, 10.0, 20.0])
    encoder, out = _encode([feature], {"year": np.array([-5.0, 0.0, 5.0, 10.0, 25.0])})
    table_rows = np.asarray(encoder.feature_layers["year_embedding"].embeddings)
    np.testing.assert_array_equal(out, table_rows[[0, 1, 1, 2, 3]])
    # Adapted boundaries are the quartiles (Discretization's approximate quantiles).
    year = table[0]["year"]
    below = [np.mean(year < b) for b in spec["year"].boundaries]
    np.testing.assert_allclose(below, [0.25, 0.5, 0.75], atol=0.03)


@pytest.mark.parametrize("combiner", ["mean", "sum"])
def test_multi_categorical_pools_the_present_values_only(combiner):
    feature = inputs.multi_categorical(
        "g", width=3, embedding_dim=4, combiner=combiner, vocabulary=["a", "b", "c"]
    )
    rows = np.array([["a", "", ""], ["a", "b", ""], ["", "", ""], ["c", "zz", ""]])
    encoder, out = _encode([feature], {"g": rows})
    E = np.asarray(encoder.feature_layers["g_embedding"].embeddings)  # 0: padding, 1: OOV, then a, b, c
    a, b, c, oov = E[2], E[3], E[4], E[1]
    scale = (lambda k: 1.0 / k) if combiner == "mean" else (lambda k: 1.0)
    expected = [a, (a + b) * scale(2), np.zeros(4), (c + oov) * scale(2)]
    np.testing.assert_allclose(out, np.stack(expected), rtol=1e-6, atol=1e-7)


def test_hashing_is_stable_and_needs_no_adapt():
    feature = inputs.hashed("zip", num_bins=64, embedding_dim=2)
    assert feature.adapted and not feature.needs_adapt
    values = np.array(["75001", "10115", "75001", "94110"])
    encoder, out = _encode([feature], {"zip": values})
    bins = tf.strings.to_hash_bucket_fast(values, 64).numpy()  # FarmHash64 fingerprint mod num_bins
    np.testing.assert_array_equal(out, np.asarray(encoder.feature_layers["zip_embedding"].embeddings)[bins])
    again = inputs.FeatureEncoder(inputs.Features([feature]))
    np.testing.assert_array_equal(np.asarray(again.feature_layers["zip_hashing"](values)), bins)


def test_categorical_lookup_and_oov_embeddings():
    feature = inputs.categorical("c", embedding_dim=3, vocabulary=["x", "y"])
    encoder, out = _encode([feature], {"c": np.array(["x", "y", "unseen", "other"])})
    E = np.asarray(encoder.feature_layers["c_embedding"].embeddings)  # 0: OOV, then x, y
    np.testing.assert_array_equal(out, E[[1, 2, 0, 0]])
    ids = inputs.categorical("i", embedding_dim=2, vocabulary=[10, 20], dtype="int64")
    encoder, out = _encode([ids], {"i": np.array([20, 10, 99])})
    np.testing.assert_array_equal(
        out, np.asarray(encoder.feature_layers["i_embedding"].embeddings)[[2, 1, 0]]
    )
    strict = inputs.Features(
        [inputs.categorical("c", embedding_dim=3, vocabulary=["x", "y"], num_oov_indices=0)]
    )
    with pytest.raises(Exception, match="num_oov_indices=0"):
        inputs.FeatureEncoder(strict)(strict.standardize({"c": np.array(["x", "unseen"])}))


# ----------------------------------------------------------------- models on features


@pytest.fixture(scope="module")
def trained(table, spec):
    """A hard-sharing model trained on the raw columns, and its loss per epoch."""
    x, y = table
    model = kmtl.build_model(heads=_heads(), trunk=trunks.dense((32, 16)), features=spec)
    model.compile(optimizer=keras.optimizers.Adam(0.02))
    history = model.fit(x, y, epochs=4, batch_size=64, verbose=0)
    return model, history.history["loss"]


def test_hard_sharing_trains_on_raw_columns_and_on_tf_data(table, spec, trained):
    model, losses = trained
    assert losses[-1] < 0.7 * losses[0], losses
    assert {k: (tuple(t.shape), t.dtype) for k, t in model.input.items()} == {
        "user_id": ((None,), "string"),
        "zip_prefix": ((None,), "string"),
        "age": ((None,), "float32"),
        "year": ((None,), "float32"),
        "genres": ((None, 4), "string"),
    }
    shared = {v.path for v in model.shared_variables}
    tables = {
        f"feature_encoder/{n}_embedding/embeddings" for n in ("user_id", "zip_prefix", "year", "genres")
    }
    assert tables <= shared
    assert not any(v.path in tables for vs in model.task_variables.values() for v in vs)
    assert model.features == spec and model.features is not spec  # the model keeps its own copy

    x, y = table
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
    model.fit(dataset, epochs=1, verbose=0, validation_data=dataset)
    from_arrays = model.evaluate(x, y, verbose=0, return_dict=True)
    from_dataset = model.evaluate(dataset, verbose=0, return_dict=True)
    np.testing.assert_allclose(from_arrays["loss"], from_dataset["loss"], rtol=1e-4)
    predicted = model.predict(x, verbose=0)
    streamed = model.predict(dataset.map(lambda features, labels: features), verbose=0)
    for name in ("click", "rating"):
        np.testing.assert_allclose(predicted[name], streamed[name], rtol=1e-5, atol=1e-6)


def test_mmoe_trains_on_raw_columns(table, spec):
    x, y = table
    model = kmtl.build_model(
        heads=_heads(), trunk=trunks.dense((16,)), features=spec, architecture="mmoe", num_experts=3
    )
    assert any("genres_embedding" in v.path for v in model.shared_variables)
    model.compile(optimizer=keras.optimizers.Adam(0.02))
    losses = model.fit(x, y, epochs=4, batch_size=64, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    "strategy",
    [lambda: weighting.PCGrad(engine="gram"), lambda: weighting.MGDA(mode="representation")],
    ids=["pcgrad-gram-engine", "mgda-representation"],
)
def test_gradient_strategies_update_the_embeddings(table, spec, strategy):
    x, y = table
    model = kmtl.build_model(heads=_heads(), trunk=trunks.dense((16,)), features=spec)
    strategy = strategy()
    model.compile(optimizer=keras.optimizers.SGD(0.5), weighting=strategy)
    if strategy.mode == "parameters":
        assert use_gram_engine(model, strategy)  # the feature encoder is the chain's first stage
    before = _embeddings(model)
    model.fit({k: v[:64] for k, v in x.items()}, {k: v[:64] for k, v in y.items()}, batch_size=64, verbose=0)
    after = _embeddings(model)
    assert int(model.optimizer.iterations) == 1
    assert all(not np.array_equal(before[p], after[p]) for p in before), sorted(before)


def test_architectures_on_features_build_or_explain(table, spec):
    x = {k: v[:8] for k, v in table[0].items()}
    for architecture in ("cgc", "ple", "cross_stitch"):
        model = kmtl.build_model(
            heads=_heads(), trunk=trunks.dense((8, 8)), features=spec, architecture=architecture
        )
        assert set(model.predict(x, verbose=0)) == {"click", "rating"}
        assert any("user_id_embedding" in v.path for v in model.shared_variables)
    esmm = kmtl.architectures.options("esmm")
    model = kmtl.build_model(
        heads=[heads.Binary(esmm[k]) for k in ("ctr", "cvr", "ctcvr")],
        trunk=trunks.dense((8,)),
        features=spec,
        architecture="esmm",
    )
    assert set(model.predict(x, verbose=0)) == {esmm["ctr"], esmm["cvr"], esmm["ctcvr"]}
    for architecture in ("mtan", "task_routed"):
        with pytest.raises(ValueError, match=f"Architecture '{architecture}' cannot take `features`"):
            kmtl.build_model(heads=_heads(), features=spec, architecture=architecture)
    with pytest.raises(ValueError, match="use a dense trunk"):
        kmtl.build_model(heads=_heads(), trunk=trunks.conv(), features=spec)
    with pytest.raises(ValueError, match="give it instead of `input_shape` and `inputs`"):
        kmtl.build_model(heads=_heads(), features=spec, input_shape=(3,))
    with pytest.raises(
        ValueError, match=r"\['user_id', 'age', 'year', 'genres'\] need data.*call `features.adapt"
    ):
        kmtl.build_model(heads=_heads(), features=_spec())
    # A feature named like a head: its input layer is renamed, the dict key stays.
    clash = inputs.Features([inputs.numeric("click", 0.0, 1.0), inputs.hashed("rating", 8, 2)])
    model = kmtl.build_model(heads=_heads(), trunk=trunks.dense((4,)), features=clash)
    out = model.predict({"click": np.array([0.5, 1.0]), "rating": np.array(["a", "b"])}, verbose=0)
    assert out["click"].shape == (2, 1)


def test_bad_raw_inputs_give_clear_errors(table):
    x, y = table
    spec = inputs.Features(
        [
            inputs.categorical("user_id", embedding_dim=4, num_oov_indices=0),
            inputs.numeric("age"),
            inputs.multi_categorical("genres", width=4, embedding_dim=3, num_oov_indices=0),
        ]
    ).adapt(x)
    model = kmtl.build_model(heads=_heads(), trunk=trunks.dense((8,)), features=spec)
    model.compile()
    rows = {k: x[k][:4] for k in spec.names}
    labels = {k: v[:4] for k, v in y.items()}
    cases = [
        ({**rows, "occupation": np.ones(4)}, r"unknown feature\(s\) \['occupation'\]. Received: columns"),
        ({k: v for k, v in rows.items() if k != "age"}, r"missing column\(s\) \['age'\]"),
        ({**rows, "user_id": np.ones(4)}, r"feature 'user_id' expects strings .* dtype float64"),
        ({**rows, "age": rows["user_id"]}, r"feature 'age' expects numbers .* dtype <U"),
        (
            {**rows, "age": np.ones((4, 1))},
            r"feature 'age' expects numbers \(floats or ints\) of shape \(batch,\)",
        ),
        ({**rows, "age": np.ones(3)}, r"same number of rows. Received: rows"),
        (np.ones((4, 3)), r"takes a dict with one column per feature"),
    ]
    for raw, message in cases:
        with pytest.raises(ValueError, match=message):
            model.predict(raw, verbose=0)
        with pytest.raises(ValueError, match=message):
            model.evaluate(raw, labels, verbose=0)
        with pytest.raises(ValueError, match=message):
            model.fit(x=raw, y=labels, verbose=0)
    unbatched = tf.data.Dataset.from_tensor_slices((rows, labels))
    with pytest.raises(ValueError, match=r"yields single examples; batch it"):
        model.fit(unbatched, verbose=0)
    with pytest.raises(ValueError, match=r"feature 'user_id' expects strings .* tensor of shape \(None,\)"):
        model.evaluate(tf.data.Dataset.from_tensor_slices(({**rows, "user_id": np.ones(4)}, labels)).batch(2))
    with pytest.raises(ValueError, match=r"validation_data\): the inputs must be a dict .* unknown feature"):
        model.fit(rows, labels, verbose=0, validation_data=({**rows, "extra": np.ones(4)}, labels))
    # Unseen values: an error with num_oov_indices=0, naming the feature (the default 1 maps them to OOV).
    with pytest.raises(
        ValueError, match=r"Feature 'user_id' received a value outside its vocabulary.*\"never\""
    ):
        model.predict({**rows, "user_id": np.array(["never", "1", "2", "3"])}, verbose=0)
    padded = np.array([["drama", "never", "", ""]] * 4)
    with pytest.raises(ValueError, match=r"Feature 'genres' received a value outside its vocabulary"):
        model.fit({**rows, "genres": padded}, labels, verbose=0)
    assert model.predict(rows, verbose=0)["click"].shape == (4, 1)  # the model still works


# ----------------------------------------------------------------- files, in a fresh process

LOAD = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import kmtl

    root = sys.argv[1]
    raw = dict(np.load(f"{root}/raw.npz"))
    expected = dict(np.load(f"{root}/expected.npz"))
    report = {}
    model = kmtl.export.load_keras(f"{root}/model.keras")
    got = model.predict(raw, verbose=0)
    report["keras"] = {k: float(np.abs(got[k] - expected[k]).max()) for k in expected}
    report["keras_features"] = model.features.get_config()

    loaded = tf.saved_model.load(f"{root}/served")
    signature = loaded.signatures["serving_default"]
    spec = signature.structured_input_signature[1]
    report["signature"] = {k: [list(s.shape), s.dtype.name] for k, s in spec.items()}
    tensors = {k: tf.constant(v, dtype=spec[k].dtype) for k, v in raw.items()}
    out = signature(**tensors)
    report["outputs"] = sorted(out)
    report["saved_model"] = {k: float(np.abs(out[k].numpy() - expected[k]).max()) for k in expected}
    served = kmtl.export.load(f"{root}/served")(raw)
    report["served"] = {k: float(np.abs(served[k] - expected[k]).max()) for k in expected}
    print("REPORT " + json.dumps(report))
    """
)


def test_keras_file_and_saved_model_give_the_same_predictions_in_a_fresh_process(spec, trained, tmp_path):
    model, _ = trained
    raw, _ = _table(12, seed=7)
    raw["user_id"][:2] = ["never_seen", "another_unseen"]  # OOV embedding
    raw["genres"][2] = ["drama", "unseen_genre", "", ""]
    raw["genres"][3] = ["", "", "", ""]
    raw = {k: v.astype("float32") if v.dtype.kind == "f" else v for k, v in raw.items()}
    expected = model.predict(raw, verbose=0)
    np.savez(tmp_path / "raw.npz", **raw)
    np.savez(tmp_path / "expected.npz", **expected)
    kmtl.export.save_keras(model, tmp_path / "model.keras")
    kmtl.export.saved_model(model, tmp_path / "served")  # verifies on `spec.example()` in-process

    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, timeout=240
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["keras_features"] == spec.get_config()
    assert report["signature"] == {
        "user_id": [[None], "string"],
        "zip_prefix": [[None], "string"],
        "age": [[None], "float32"],
        "year": [[None], "float32"],
        "genres": [[None, 4], "string"],
    }
    assert report["outputs"] == ["click", "rating"]
    for key in ("keras", "saved_model", "served"):
        assert max(report[key].values()) < 1e-5, (key, report[key])
