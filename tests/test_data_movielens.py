"""Tests for kmtl.data.movielens: both local layouts, tfds, splits, negatives, tasks, hostile files."""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import kmtl
from kmtl.data import data_dir, load_movielens, movielens_arrays, movielens_available, movielens_tasks
from kmtl.data import movielens as ml

# --- a tiny synthetic MovieLens, written in both layouts ---

UNKNOWN_YEAR_ITEM = "7"


def _synthetic():
    """Users, items and ratings; every user and item is rated (so tfds sees them all)."""
    users = [
        ("1", 24, "M", "technician", "85711"),
        ("2", 53, "F", "other", "94043"),
        ("3", 23, "M", "writer", "T8H1N"),
        ("10", 33, "F", "other", "12"),
        ("4", 40, "M", "student", "00000"),
        ("5", 30, "F", "none", "55105"),
    ]
    rng = np.random.default_rng(7)
    items = []
    for number in range(1, 31):
        year = None if str(number) == UNKNOWN_YEAR_ITEM else 1980 + number % 17
        if number == 1:
            genres = ["Animation", "Children's", "Comedy"]
        elif number == 2:
            genres = ["Action", "Adventure", "Crime", "Film-Noir", "Sci-Fi", "Western"]  # MAX_GENRES
        elif number == 3:
            genres = []
        elif number == 4:
            genres = ["unknown"]
        else:
            genres = sorted(
                rng.choice(ml.GENRES[1:], size=1 + number % 3, replace=False), key=ml.GENRES.index
            )
        title = "Misérables, Les" if number == 5 else f"Movie {number}"
        items.append((str(number), title, year, list(genres)))
    ratings = []
    plan = {
        "1": list(range(1, 26)),
        "2": [26, 27, 28, 29, 30, 1, 2],
        "3": [3, 4, 5, 6],
        "10": [8, 9, 10, 11, 12],
    }
    plan.update({"4": [13, 14, 15, 2, 7, 1], "5": [20]})
    for user, numbers in plan.items():
        for k, number in enumerate(numbers):
            timestamp = 880000000 + 1000 * (k // 2) + int(rng.integers(0, 3))  # a few ties
            ratings.append((user, str(number), int(rng.integers(1, 6)), timestamp))
    order = rng.permutation(len(ratings))  # interleave users, as in u.data
    ratings = [ratings[i] for i in order]
    assert {r[1] for r in ratings} == {i[0] for i in items}
    return {"users": users, "items": items, "ratings": ratings}


DATA = _synthetic()


def write_recbole(folder: Path, data=DATA):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in data["ratings"]]
    (folder / "ml-100k.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    lines += [f"{u}\t{a}\t{g}\t{o}\t{z}" for u, a, g, o, z in data["users"]]
    (folder / "ml-100k.user").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    lines += [f"{i}\t{t}\t{'unkonwn' if y is None else y}\t{' '.join(g)}" for i, t, y, g in data["items"]]
    (folder / "ml-100k.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_grouplens(folder: Path, data=DATA):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in data["ratings"]))
    (folder / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in data["users"]))
    lines = []
    for item, title, year, genres in data["items"]:
        flags = "|".join("1" if name in genres else "0" for name in ml.GENRES)
        date = "" if year is None else f"01-Jan-{year}"
        full_title = title if year is None else f"{title} ({year})"
        lines.append(f"{item}|{full_title}|{date}||http://example.invalid/{item}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return folder


@pytest.fixture
def recbole_root(tmp_path):
    write_recbole(tmp_path / "recbole" / "movielens-100k")
    return tmp_path / "recbole"


@pytest.fixture
def grouplens_root(tmp_path):
    write_grouplens(tmp_path / "grouplens" / "movielens-100k" / "ml-100k")
    return tmp_path / "grouplens"


def _assert_same(a: ml.MovieLens, b: ml.MovieLens):
    for field in dataclasses.fields(ml.MovieLens):
        if field.name != "origin":
            left, right = getattr(a, field.name), getattr(b, field.name)
            assert left.dtype.kind == right.dtype.kind and left.shape == right.shape, field.name
            np.testing.assert_array_equal(left, right, err_msg=field.name)


def _rows(features, labels):
    return list(zip(features["user_id"].tolist(), features["item_id"].tolist(), labels["rating"].tolist()))


# --- loading ---


def test_constants():
    assert len(ml.GENRES) == 19 and ml.GENRES[0] == "unknown" and ml.GENRES[4] == "Children's"
    assert ml.MAX_GENRES == 6
    assert (
        ml.TASKS
        == ml.MOVIELENS_TASKS
        == (
            "rating",
            "liked",
            "watched",
            "liked_given_watched",
            "watched_and_liked",
        )
    )
    assert ml.FEATURE_NAMES == (
        "user_id",
        "item_id",
        "age",
        "gender",
        "occupation",
        "zip_prefix",
        "year",
        "genres",
    )
    assert {"load_movielens", "movielens_arrays", "movielens_tasks", "movielens_available"} <= set(
        kmtl.data.__all__
    )


def test_both_layouts_give_the_same_arrays(recbole_root, grouplens_root, tmp_path):
    recbole = load_movielens("local", data_dir=recbole_root)
    grouplens = load_movielens("local", data_dir=grouplens_root)
    assert "RecBole" in recbole.origin and "GroupLens" in grouplens.origin
    _assert_same(recbole, grouplens)
    flat = tmp_path / "flat"
    write_grouplens(flat / "movielens-100k")  # GroupLens files directly in movielens-100k/
    _assert_same(recbole, load_movielens("auto", data_dir=flat))


def test_columns_and_decisions(recbole_root):
    data = load_movielens("local", data_dir=recbole_root)
    n = len(DATA["ratings"])
    assert (data.num_ratings, data.num_users, data.num_items, len(data)) == (n, 6, 30, n)
    assert data.users.tolist() == ["1", "2", "3", "4", "5", "10"]  # numeric order
    assert data.items.tolist() == [str(i) for i in range(1, 31)]
    first = DATA["ratings"][0]
    assert (data.user_id[0], data.item_id[0], data.rating[0], data.timestamp[0]) == first
    assert data.rating.dtype == np.float32 and data.timestamp.dtype == np.int64
    assert data.age.dtype == np.float32 and data.year.dtype == np.float32
    assert data.user_zip_prefix.tolist() == ["857", "940", "T8H", "000", "551", "12"]
    assert data.user_gender.tolist() == ["M", "F", "M", "M", "F", "F"]
    known = [y for _, _, y, _ in DATA["items"] if y is not None]
    assert data.item_year[6] == np.median(known) and data.items[6] == UNKNOWN_YEAR_ITEM
    assert data.item_genres.shape == (30, ml.MAX_GENRES) and data.item_genres.dtype.kind == "U"
    assert data.item_genres[0].tolist() == ["Animation", "Children's", "Comedy", "", "", ""]
    assert data.item_genres[1].tolist() == ["Action", "Adventure", "Crime", "Film-Noir", "Sci-Fi", "Western"]
    assert data.item_genres[2].tolist() == [""] * 6 and data.item_genres[3, 0] == "unknown"
    tables = {
        "user_id": "users",
        "age": "user_age",
        "gender": "user_gender",
        "occupation": "user_occupation",
        "zip_prefix": "user_zip_prefix",
        "item_id": "items",
        "year": "item_year",
        "genres": "item_genres",
    }
    for name, table in tables.items():
        index = data.user_index if table.startswith("user") else data.item_index
        np.testing.assert_array_equal(getattr(data, name), getattr(data, table)[index], err_msg=name)
    with pytest.raises(ValueError):
        data.rating[0] = 5.0  # read-only


def test_loads_are_cached_and_reread_after_a_change(recbole_root):
    first = load_movielens("local", data_dir=recbole_root)
    assert load_movielens("auto", data_dir=recbole_root) is first
    inter = recbole_root / "movielens-100k" / "ml-100k.inter"
    inter.write_text("\n".join(inter.read_text().splitlines()[:-1]) + "\n")
    assert load_movielens("local", data_dir=recbole_root).num_ratings == first.num_ratings - 1


def test_missing_files_name_both_layouts_and_tfds(tmp_path, monkeypatch):
    monkeypatch.setenv("KMTL_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ml, "_tfds_prepared", lambda tfds_data_dir: False)
    (tmp_path / "movielens-100k").mkdir()
    (tmp_path / "movielens-100k" / "u.data").write_text("1\t1\t3\t5\n")
    with pytest.raises(FileNotFoundError) as info:
        load_movielens(tfds_data_dir=tmp_path / "tfds")
    message = str(info.value)
    for part in (
        "ml-100k.inter",
        "u.data",
        "$KMTL_DATA_DIR",
        "movielens/100k-ratings",
        str(tmp_path / "tfds"),
    ):
        assert part in message
    assert "has u.data but not u.user, u.item" in message and "Received: source='auto'" in message
    with pytest.raises(FileNotFoundError, match="Received: source='local'"):
        load_movielens("local")
    assert not movielens_available(tfds_data_dir=tmp_path / "tfds")
    write_recbole(tmp_path / "movielens-100k")
    assert movielens_available()


def test_unknown_source():
    with pytest.raises(ValueError, match=r"\['auto', 'local', 'tfds'\]. Received: source='web'"):
        load_movielens("web")


# --- hostile files ---


def _field(index, value, separator="\t"):
    def edit(line):
        fields = line.split(separator)
        fields[index] = value
        return separator.join(fields)

    return edit


SEVEN_GENRES = "Action Adventure Crime Drama Film-Noir Sci-Fi Western"
MALFORMED = [
    ("recbole", "ml-100k.inter", 3, lambda line: line + "\t7", "expected 4 tab-separated fields"),
    ("recbole", "ml-100k.inter", 3, _field(2, "x"), "rating must be a number. Received: 'x'"),
    ("recbole", "ml-100k.inter", 3, _field(2, "nan"), "rating must be a finite number"),
    ("recbole", "ml-100k.inter", 4, _field(2, "6"), "rating must lie in 1..5. Received: '6'"),
    ("recbole", "ml-100k.inter", 3, _field(0, "99"), "user_id must be listed in .*ml-100k.user"),
    ("recbole", "ml-100k.inter", 3, _field(3, "soon"), "timestamp must be an integer"),
    ("recbole", "ml-100k.inter", 1, lambda line: "user_id\titem_id\trating\ttimestamp", "name:type"),
    (
        "recbole",
        "ml-100k.inter",
        1,
        lambda line: "user_id:token\tuser_id:token\trating:float\ttimestamp:float",
        r"repeated: \['user_id'\]",
    ),
    ("recbole", "ml-100k.inter", 3, lambda line: DATA_HEADER, "the header again"),
    ("recbole", "ml-100k.user", 1, lambda line: line.replace("zip_code", "zip"), r"missing \['zip_code'\]"),
    ("recbole", "ml-100k.user", 2, _field(1, "old"), "age must be a number"),
    ("recbole", "ml-100k.user", 3, _field(2, "X"), "gender must be 'M' or 'F'"),
    ("recbole", "ml-100k.user", 3, _field(0, "1"), r"each user_id must appear once \(first at line 2\)"),
    ("recbole", "ml-100k.item", 2, _field(3, "Action Cartoon"), "genres .* must be among"),
    ("recbole", "ml-100k.item", 2, _field(3, SEVEN_GENRES), "at most MAX_GENRES = 6 genres"),
    ("grouplens", "u.data", 2, lambda line: line.rsplit("\t", 1)[0], "expected 4 tab-separated fields"),
    ("grouplens", "u.data", 2, _field(2, "0"), "rating must lie in 1..5"),
    ("grouplens", "u.data", 5, _field(1, "999"), "item_id must be listed in .*u.item"),
    ("grouplens", "u.user", 1, lambda line: line.rsplit("|", 1)[0], "expected 5 '[|]'-separated fields"),
    ("grouplens", "u.item", 1, _field(6, "2", "|"), "genre flags must be 0 or 1"),
    ("grouplens", "u.item", 3, lambda line: "|".join(line.split("|")[:5] + ["1"] * 19), "at most MAX_GENRES"),
]
DATA_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


@pytest.mark.parametrize("layout, name, lineno, edit, message", MALFORMED)
def test_malformed_rows_name_file_and_line(tmp_path, layout, name, lineno, edit, message):
    folder = (write_recbole if layout == "recbole" else write_grouplens)(tmp_path / "movielens-100k")
    path = folder / name
    encoding = "latin-1"
    lines = path.read_text(encoding=encoding).split("\n")
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("\n".join(lines), encoding=encoding)
    with pytest.raises(ml.MovieLensError, match=re.escape(name) + f"' line {lineno}: .*" + message):
        load_movielens("local", data_dir=tmp_path)


def test_oversized_file_is_refused_before_reading(recbole_root, monkeypatch):
    inter = recbole_root / "movielens-100k" / "ml-100k.inter"
    with open(inter, "r+b") as file:
        file.truncate(ml.MAX_FILE_BYTES + 1)  # sparse: no disk used

    def no_reading(*args, **kwargs):
        raise AssertionError("the oversized file was opened")

    monkeypatch.setattr(ml, "open", no_reading, raising=False)
    with pytest.raises(
        ml.MovieLensError, match=r"ml-100k.inter' is too large .*Received: a file of 268435457"
    ):
        load_movielens("local", data_dir=recbole_root)


def test_size_bound_applies_to_every_file(recbole_root, monkeypatch):
    monkeypatch.setattr(ml, "MAX_FILE_BYTES", 100)
    with pytest.raises(ml.MovieLensError, match="too large"):
        load_movielens("local", data_dir=recbole_root)


# --- options ---


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": ["rating", "clicks"]}, r"Unknown task\(s\) \['clicks'\] for MovieLens"),
        ({"tasks": []}, "non-empty list"),
        ({"tasks": ["liked", "liked"]}, "Duplicate task names"),
        ({"split": "validation"}, r"\['train', 'test', 'all'\]. Received: split='validation'"),
        ({"split_scheme": "leave_one_out"}, "Received: split_scheme='leave_one_out'"),
        ({"test_fraction": 0.0}, "strictly between 0 and 1. Received: test_fraction=0.0"),
        ({"test_fraction": 1}, "Received: test_fraction=1"),
        ({"test_fraction": True}, "Received: test_fraction=True"),
        ({"test_fraction": "0.2"}, "Received: test_fraction='0.2'"),
        ({"negatives": -1}, "integer >= 0. Received: negatives=-1"),
        ({"negatives": 1.5}, "Received: negatives=1.5"),
        ({"seed": None}, "Received: seed=None"),
        ({"seed": -3}, "Received: seed=-3"),
        ({"source": "web"}, "Received: source='web'"),
    ],
)
def test_bad_options(recbole_root, kwargs, message):
    kwargs = {"tasks": ["rating", "watched"], "data_dir": recbole_root, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        movielens_arrays(**kwargs)
    assert "Received: " in str(info.value)


def test_bad_batch_size(recbole_root):
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        movielens_tasks(["rating"], batch_size=0, data_dir=recbole_root)


# --- splits ---


def test_random_split_sizes_determinism_and_cover(recbole_root):
    n = len(DATA["ratings"])
    train = _rows(*movielens_arrays(["rating"], "train", seed=3, data_dir=recbole_root)[:2])
    test = _rows(*movielens_arrays(["rating"], "test", seed=3, data_dir=recbole_root)[:2])
    assert len(test) == math.floor(0.2 * n + 0.5) and len(train) == n - len(test)
    everything = _rows(*movielens_arrays(["rating"], "all", seed=3, data_dir=recbole_root)[:2])
    assert sorted(train + test) == sorted(everything) and len(set(train + test)) == n
    assert _rows(*movielens_arrays(["rating"], "test", seed=3, data_dir=recbole_root)[:2]) == test
    assert _rows(*movielens_arrays(["rating"], "test", seed=4, data_dir=recbole_root)[:2]) != test
    # The split depends on neither the tasks nor the number of negatives.
    features, labels, weights = movielens_arrays(
        ["watched", "rating"], "test", seed=3, negatives=3, data_dir=recbole_root
    )
    observed = weights["rating"] == 1
    assert observed[: len(test)].all() and not observed[len(test) :].any()
    assert _rows(features, labels)[: len(test)] == test


@pytest.mark.parametrize("test_fraction", [0.25, 0.5])
def test_temporal_split_puts_each_users_latest_ratings_in_test(recbole_root, test_fraction):
    options = dict(split_scheme="temporal", test_fraction=test_fraction, data_dir=recbole_root)
    data = load_movielens("local", data_dir=recbole_root)
    stamps = {
        (u, i): t for u, i, t in zip(data.user_id.tolist(), data.item_id.tolist(), data.timestamp.tolist())
    }
    splits = {}
    for split in ("train", "test"):
        features, _, _ = movielens_arrays(["liked"], split, **options)
        splits[split] = list(zip(features["user_id"].tolist(), features["item_id"].tolist()))
    assert sorted(splits["train"] + splits["test"]) == sorted(stamps)
    for user in data.users.tolist():
        n = int((data.user_id == user).sum())
        train = [(stamps[(u, i)], int(i)) for u, i in splits["train"] if u == user]
        test = [(stamps[(u, i)], int(i)) for u, i in splits["test"] if u == user]
        expected = 0 if n < 2 else min(n - 1, max(1, math.ceil(test_fraction * n)))
        assert len(test) == expected, user
        if test:
            assert max(train) < min(test)  # by (timestamp, item id)
            assert max(t for t, _ in train) <= min(t for t, _ in test)
    assert movielens_arrays(["liked"], "test", **options)[0]["user_id"].tolist() == [
        u for u, _ in splits["test"]
    ]


# --- negatives and task labels ---


def test_negatives_are_unseen_deterministic_and_disjoint(recbole_root):
    data = load_movielens("local", data_dir=recbole_root)
    seen = set(zip(data.user_id.tolist(), data.item_id.tolist()))
    tasks = ["watched", "rating", "liked_given_watched"]

    def negatives(split, seed, tasks=tasks):
        features, labels, weights = movielens_arrays(
            tasks, split, negatives=2, seed=seed, data_dir=recbole_root
        )
        mask = labels["watched"] == 0
        return list(zip(features["user_id"][mask].tolist(), features["item_id"][mask].tolist()))

    test_first = negatives("test", 0)
    train = negatives("train", 0)
    # The same negatives whatever the tasks, their order, or the split asked for first.
    assert negatives("test", 0, tasks=["liked", "watched_and_liked", "watched"]) == test_first
    assert negatives("train", 0) == train and negatives("train", 1) != train
    assert not (set(train) | set(test_first)) & seen
    assert not set(train) & set(test_first)
    assert len(set(train)) == len(train) and len(set(test_first)) == len(test_first)
    assert sorted(negatives("all", 0)) == sorted(train + test_first)
    # User "1" rated 25 of 30 items: train and test share the 5 unseen ones instead of 2 per rating.
    unseen = {i for i in data.items.tolist() if ("1", i) not in seen}
    assert {i for u, i in train + test_first if u == "1"} == unseen
    # Everyone else gets 2 negatives per observed rating of the split.
    features, labels, _ = movielens_arrays(tasks, "train", negatives=2, data_dir=recbole_root)
    users = features["user_id"]
    for user in ("2", "3", "10", "4", "5"):
        observed = int(((users == user) & (labels["watched"] == 1)).sum())
        assert int(((users == user) & (labels["watched"] == 0)).sum()) == 2 * observed, user


def test_negatives_carry_user_and_item_features(recbole_root):
    data = load_movielens("local", data_dir=recbole_root)
    features, labels, _ = movielens_arrays(["watched"], "train", negatives=1, data_dir=recbole_root)
    negative = np.flatnonzero(labels["watched"] == 0)
    assert negative.size
    users = {u: k for k, u in enumerate(data.users.tolist())}
    items = {i: k for k, i in enumerate(data.items.tolist())}
    for row in negative:
        u, i = users[features["user_id"][row]], items[features["item_id"][row]]
        assert (
            features["age"][row] == data.user_age[u]
            and features["zip_prefix"][row] == data.user_zip_prefix[u]
        )
        assert features["gender"][row] == data.user_gender[u]
        assert features["occupation"][row] == data.user_occupation[u]
        assert features["year"][row] == data.item_year[i]
        np.testing.assert_array_equal(features["genres"][row], data.item_genres[i])


def test_labels_and_masks(recbole_root):
    features, labels, weights = movielens_arrays(list(ml.TASKS), "train", negatives=3, data_dir=recbole_root)
    assert list(labels) == list(ml.TASKS) == list(weights)
    assert set(features) == set(ml.FEATURE_NAMES)
    rows = len(features["user_id"])
    for value in list(labels.values()) + list(weights.values()):
        assert value.dtype == np.float32 and value.shape == (rows,)
    watched = labels["watched"]
    negative = watched == 0
    assert negative.any() and (~negative).any()
    for task in ("rating", "liked", "liked_given_watched"):
        np.testing.assert_array_equal(weights[task], (~negative).astype(np.float32), err_msg=task)
    for task in ("watched", "watched_and_liked"):
        assert (weights[task] == 1).all()
    observed = ~negative
    np.testing.assert_array_equal(
        labels["liked"][observed], (labels["rating"][observed] >= 4).astype(np.float32)
    )
    np.testing.assert_array_equal(labels["liked_given_watched"], labels["liked"])
    np.testing.assert_array_equal(labels["watched_and_liked"], watched * labels["liked"])
    assert ((labels["rating"] >= 1) & (labels["rating"] <= 5)).all() and set(np.unique(labels["liked"])) <= {
        0,
        1,
    }
    # Without an implicit task: observed ratings only, every weight 1.
    features, labels, weights = movielens_arrays(["liked", "rating"], "train", data_dir=recbole_root)
    assert list(labels) == ["liked", "rating"] and len(labels["rating"]) == int(observed.sum())
    assert all((value == 1).all() for value in weights.values())


# --- tf.data ---


def test_pipeline_matches_arrays(recbole_root):
    tasks = ["watched_and_liked", "rating"]
    features, labels, weights = movielens_arrays(tasks, "test", negatives=2, data_dir=recbole_root)
    pipeline = movielens_tasks(tasks, "test", batch_size=8, negatives=2, data_dir=recbole_root)
    x, y, w = pipeline.element_spec
    assert x["genres"].shape.as_list() == [None, ml.MAX_GENRES] and x["genres"].dtype == tf.string
    assert x["age"].dtype == tf.float32 and x["user_id"].shape.as_list() == [None]
    assert list(y) == tasks and y["rating"].shape.as_list() == [None] and w["rating"].dtype == tf.float32
    batches = list(pipeline.as_numpy_iterator())
    got = {name: np.concatenate([b[0][name] for b in batches]) for name in ml.FEATURE_NAMES}
    for name in ml.FEATURE_NAMES:
        expected = features[name]
        expected = np.char.encode(expected, "utf-8") if expected.dtype.kind == "U" else expected
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
    for task in tasks:
        np.testing.assert_array_equal(np.concatenate([b[1][task] for b in batches]), labels[task])
        np.testing.assert_array_equal(np.concatenate([b[2][task] for b in batches]), weights[task])


def test_pipeline_shuffle_structure_and_unbatched(recbole_root):
    options = dict(negatives=1, data_dir=recbole_root)
    pipeline = movielens_tasks(["watched", "watched_and_liked"], "train", batch_size=4, seed=5, **options)
    assert len(pipeline.element_spec) == 2  # no task is masked: no weights
    epoch = [b[0]["item_id"].tolist() for b in pipeline.as_numpy_iterator()]
    again = [b[0]["item_id"].tolist() for b in pipeline.as_numpy_iterator()]
    assert epoch != again  # reshuffled every epoch
    same_seed = movielens_tasks(["watched", "watched_and_liked"], "train", batch_size=4, seed=5, **options)
    assert [b[0]["item_id"].tolist() for b in same_seed.as_numpy_iterator()] == epoch
    rows = len(movielens_arrays(["watched"], "train", **options)[1]["watched"])
    unbatched = movielens_tasks(["liked", "watched"], "train", batch_size=None, **options)
    assert len(unbatched.element_spec) == 3 and unbatched.element_spec[0]["genres"].shape == (ml.MAX_GENRES,)
    assert unbatched.cardinality().numpy() == rows
    dropped = movielens_tasks(["rating"], "train", batch_size=7, drop_remainder=True, data_dir=recbole_root)
    assert all(b[1]["rating"].shape == (7,) for b in dropped.as_numpy_iterator())


def test_task_dataset_keeps_one_split_and_lets_the_seed_order_the_rows(recbole_root):
    import kmtl

    tasks = ["rating", "watched"]

    def rows(dataset, seed, split="train"):
        pipeline = kmtl.data.task_dataset(
            dataset, tasks, split=split, batch_size=5, seed=seed, data_dir=recbole_root
        )
        batches = list(pipeline.as_numpy_iterator())
        return [
            (u, i, w)
            for b in batches
            for u, i, w in zip(b[0]["user_id"], b[0]["item_id"], b[1]["watched"].tolist())
        ]

    first, second = rows("movielens", 0), rows("movielens", 1)
    assert first != second and sorted(first) == sorted(second)  # same rows and negatives, other order
    expected = movielens_arrays(tasks, "train", seed=0, data_dir=recbole_root)[0]
    assert len(first) == len(expected["user_id"])
    temporal = rows("movielens/temporal", 0, split="test")
    assert sorted(temporal) != sorted(rows("movielens", 0, split="test"))
    assert [h.kind for h in kmtl.data.task_heads("movielens", tasks)] == ["regression", "binary"]
    with pytest.raises(ValueError, match="a slice would cut the sampled negatives"):
        kmtl.data.task_dataset("movielens", tasks, split="train[:10]", data_dir=recbole_root)
    with pytest.raises(ValueError, match="raw feature inputs"):
        kmtl.data.input_shape("movielens")
    with pytest.raises(ValueError, match="shuffle_seed"):
        movielens_tasks(tasks, shuffle_seed=-1, data_dir=recbole_root)


# --- tfds ---


def _tfds_as_dataset(ratings=DATA["ratings"], data=DATA):
    users = {u[0]: u for u in data["users"]}
    items = {i[0]: i for i in data["items"]}

    def as_dataset(self, split, **kwargs):
        names = self.info.features["movie_genres"].feature.names
        tfds_name = {"Children's": "Children", "unknown": "Unknown"}
        examples = []
        for user, item, rating, timestamp in ratings:
            _, age, gender, occupation, zip_code = users[user]
            _, title, year, genres = items[item]
            examples.append(
                {
                    "user_id": user,
                    "movie_id": item,
                    "user_rating": np.float32(rating),
                    "timestamp": np.int64(timestamp),
                    "raw_user_age": np.float32(age),
                    "bucketized_user_age": np.float32(age),
                    "user_gender": gender == "M",
                    "user_occupation_text": occupation,
                    "user_occupation_label": np.int64(0),
                    "user_zip_code": zip_code,
                    "movie_title": title if year is None else f"{title} ({year})",
                    "movie_genres": np.array([names.index(tfds_name.get(g, g)) for g in genres], np.int64),
                }
            )
        signature = {
            key: tf.TensorSpec(shape, self.info.features.dtype[key])
            for key, shape in self.info.features.shape.items()
        }
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)

    return as_dataset


def test_tfds_source_matches_local_files(recbole_root):
    local = load_movielens("local", data_dir=recbole_root)
    with tfds.testing.mock_data(as_dataset_fn=_tfds_as_dataset()):
        mocked = load_movielens("tfds")
    assert "tfds" in mocked.origin
    _assert_same(local, mocked)


def test_auto_falls_back_to_prepared_tfds(tmp_path, monkeypatch):
    monkeypatch.setattr(ml, "_tfds_prepared", lambda tfds_data_dir: True)
    with tfds.testing.mock_data(as_dataset_fn=_tfds_as_dataset(DATA["ratings"][:10])):
        data = load_movielens(data_dir=tmp_path)
        features, labels = movielens_arrays(["rating"], "all", data_dir=tmp_path)[:2]
    assert data.num_ratings == 10 and len(labels["rating"]) == 10
    gender = {user: gender for user, _, gender, _, _ in DATA["users"]}
    assert data.gender.tolist() == [gender[user] for user, _, _, _ in DATA["ratings"][:10]]


def test_tfds_rejects_ratings_out_of_range():
    bad = [(u, i, 0, t) for u, i, _, t in DATA["ratings"][:3]]
    with tfds.testing.mock_data(as_dataset_fn=_tfds_as_dataset(bad)):
        with pytest.raises(ml.MovieLensError, match="example 0: user_rating must lie in 1..5. Received: 0.0"):
            load_movielens("tfds")


def test_tfds_not_prepared_does_not_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds has not prepared 'movielens/100k-ratings'.*Received: "):
        load_movielens("tfds", tfds_data_dir=tmp_path)


# --- real files ---


@pytest.fixture(scope="module")
def real_root():
    root = data_dir()
    if not (root / "movielens-100k" / "ml-100k.inter").is_file():
        pytest.skip(f"no MovieLens 100K files in {str(root / 'movielens-100k')!r} (set KMTL_DATA_DIR)")
    return root


def test_real_movielens_100k(real_root):
    data = load_movielens("local", data_dir=real_root)
    assert (data.num_ratings, data.num_users, data.num_items) == (100_000, 943, 1_682)
    values, counts = np.unique(data.rating, return_counts=True)
    assert values.tolist() == [1, 2, 3, 4, 5] and counts.tolist() == [6110, 11370, 27145, 34174, 21201]
    assert abs(float((data.rating >= 4).mean()) - 0.553) < 0.001
    assert (data.user_id[0], data.item_id[0], data.rating[0], data.timestamp[0]) == (
        "196",
        "242",
        3,
        881250949,
    )
    assert int((data.item_genres != "").sum(axis=1).max()) == ml.MAX_GENRES
    assert set(np.unique(data.item_genres)) - {""} == set(ml.GENRES)
    assert data.user_zip_prefix[0] == "857" and data.item_year[0] == 1995


def test_real_pipeline_element_spec(real_root):
    tasks = ["rating", "watched", "watched_and_liked"]
    pipeline = movielens_tasks(tasks, "train", batch_size=256, data_dir=real_root)
    x, y, w = pipeline.element_spec
    assert set(x) == set(ml.FEATURE_NAMES) and list(y) == tasks and list(w) == tasks
    for name in ml.FEATURE_NAMES:
        expected = tf.float32 if name in ("age", "year") else tf.string
        shape = [None, ml.MAX_GENRES] if name == "genres" else [None]
        assert x[name].dtype == expected and x[name].shape.as_list() == shape, name
    assert all(
        spec.shape.as_list() == [None] and spec.dtype == tf.float32 for spec in (*y.values(), *w.values())
    )
    features, labels, weights = next(iter(pipeline))
    assert features["genres"].shape == (256, ml.MAX_GENRES) and labels["rating"].shape == (256,)
