"""MovieLens 100K: ratings with user and item features, and multi-task pipelines.

`load_movielens(source, data_dir, tfds_data_dir)` returns a `MovieLens`
(read-only NumPy arrays, one row per rating, in the order of the source).
`movielens_arrays(tasks, split, ...)` derives `(features, labels, weights)`
for the tasks below, with sampled negatives for the implicit-feedback
tasks; `movielens_tasks(tasks, split, ...)` is the same as a `tf.data`
pipeline.

Sources:

- `"local"`: the folder `movielens-100k/` under the data directory
  (`kmtl.data.data_dir()`: the `data_dir` argument, else `$KMTL_DATA_DIR`,
  else `~/.kmtl/data`), in either layout, also accepted in a `ml-100k/`
  subfolder (where the GroupLens zip extracts to):

  - RecBole atomic files `ml-100k.inter`, `ml-100k.user`, `ml-100k.item`:
    tab-separated, a typed header line (`user_id:token`, ...), columns
    found by name (`user_id item_id rating timestamp`; `user_id age
    gender occupation zip_code`; `item_id release_year class`, the genres
    space-separated; other columns are ignored). UTF-8, read as Latin-1 when
    it does not decode.
  - GroupLens files `u.data` (tab: user, item, rating, timestamp),
    `u.user` (`|`: id, age, gender, occupation, zip code) and `u.item`
    (`|`, Latin-1: id, title, release date `dd-Mon-yyyy`, video date, URL,
    the 19 genre flags in the order of `GENRES`).

- `"tfds"`: tfds `movielens/100k-ratings` (its only split, `train`),
  which must already be prepared: nothing is downloaded. `user_gender` is
  `True` for male (as the tfds feature documentation says); the tfds genre
  names `Children` and `Unknown` become `Children's` and `unknown`, and
  `(no genres listed)` means no genre; the release year is the last
  `(yyyy)` in `movie_title`.
- `"auto"`: local files when a complete layout is present, else tfds when
  prepared, else `FileNotFoundError` naming both places.

Columns and decisions:

- Ids are strings as written. The user and item tables (`MovieLens.users`,
  `MovieLens.items`) are sorted by id, numerically when every id is a
  decimal number; local sources list every user/item of the user/item
  file, tfds the ones that appear in a rating.
- `zip_prefix`: the first 3 characters of the zip code as written (so
  `"857"` for `"85711"`, `"T8H"` for the Canadian `"T8H1N"`; a shorter code
  is kept whole).
- `year`: the release year (`release_year`, the year of `u.item`'s release
  date, or the tfds title's `(yyyy)`); an item without a 4-digit year gets
  the median year of the items that have one (`numpy.median`; 1995.0 for
  ML-100K, where the RecBole files give no year for items 267 and 1412).
- `genres`: `[MAX_GENRES]` genre names per item in the order of `GENRES`
  (each name once), padded on the right with `""`. The same strings in
  every source.
- Strings are NumPy unicode arrays (`numpy.str_`, dtype kind `"U"`):
  `tf.constant`/`tf.data.Dataset.from_tensor_slices` turn them into
  `tf.string`, the dtype of `keras.Input(shape=(), dtype="string")`. Keras
  3's NumPy input adapter accepts no string arrays (neither `str`, `object`
  nor `bytes`), so train string features through `tf.data`
  (`movielens_tasks`).

Hostile files: a file larger than `MAX_FILE_BYTES` (256 MiB) is refused
before it is read; malformed rows raise `MovieLensError` (a `ValueError`)
naming the file and line: wrong number of fields, a bad header, a
non-numeric or out-of-range rating, age or timestamp, an unknown gender or
genre, more than `MAX_GENRES` genres, a duplicate user/item id or a rating
of a user or item missing from its file. Sizes are never taken from the
file's contents.

Parsed data is cached in this process per source and location (local files
also by size and modification time, see `clear_cache`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from kmtl.data import sources as _sources
from kmtl.data._checks import check_batch_size, check_task_names

__all__ = [
    "FEATURE_NAMES",
    "GENRES",
    "MAX_FILE_BYTES",
    "MAX_GENRES",
    "MOVIELENS_TASKS",
    "MovieLens",
    "MovieLensError",
    "SPLITS",
    "SPLIT_SCHEMES",
    "TASKS",
    "clear_cache",
    "load_movielens",
    "movielens_arrays",
    "movielens_available",
    "movielens_features",
    "movielens_tasks",
]

#: The 19 genres of ML-100K in the order of `u.item`'s flags (and `u.genre`).
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
#: The most genres a movie of ML-100K has (measured: 6); a file with more is refused.
MAX_GENRES = 6
#: Task names of `movielens_arrays` / `movielens_tasks`.
TASKS = ("rating", "liked", "watched", "liked_given_watched", "watched_and_liked")
MOVIELENS_TASKS = TASKS
#: Feature names of `movielens_arrays` / `movielens_tasks`, in order.
FEATURE_NAMES = ("user_id", "item_id", "age", "gender", "occupation", "zip_prefix", "year", "genres")
SOURCES = ("auto", "local", "tfds")
SPLITS = ("train", "test", "all")
SPLIT_SCHEMES = ("random", "temporal")
#: Largest MovieLens file read (bytes); the ML-100K files are about 2 MB.
MAX_FILE_BYTES = 256 * 1024 * 1024
#: `liked` means a rating of at least this.
LIKED_THRESHOLD = 4.0
TFDS_NAME = "movielens/100k-ratings"
FOLDER = "movielens-100k"
SUBFOLDER = "ml-100k"
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
GROUPLENS_FILES = ("u.data", "u.user", "u.item")

_IMPLICIT_TASKS = ("watched", "liked_given_watched", "watched_and_liked")
_MASKED_ON_NEGATIVES = ("rating", "liked", "liked_given_watched")
_GENRE_DTYPE = f"<U{max(len(name) for name in GENRES)}"
_GENRE_NAMES = np.array(GENRES, dtype=_GENRE_DTYPE)
_GENRE_INDEX = {name: index for index, name in enumerate(GENRES)}
# tfds's `movie_genres` names that differ from GENRES; None: not a genre (no genre listed).
_TFDS_GENRES = {"Children": "Children's", "Unknown": "unknown", "(no genres listed)": None}
_TFDS_FEATURES = (
    "user_id",
    "movie_id",
    "user_rating",
    "timestamp",
    "raw_user_age",
    "user_gender",
    "user_occupation_text",
    "user_zip_code",
    "movie_genres",
    "movie_title",
)
_RECBOLE_COLUMNS = {
    "ml-100k.inter": ("user_id", "item_id", "rating", "timestamp"),
    "ml-100k.user": ("user_id", "age", "gender", "occupation", "zip_code"),
    "ml-100k.item": ("item_id", "release_year", "class"),
}
_SPLIT_STREAM, _NEGATIVE_STREAM = 0, 1  # seed streams of the split and of the negatives
_UNBATCHED_BLOCK = 1024
_SHOWN = 200  # characters of an offending line shown in an error


class MovieLensError(ValueError):
    """A malformed MovieLens file (or tfds data); the message names the file and line."""


@dataclasses.dataclass(frozen=True, eq=False)
class MovieLens:
    """MovieLens ratings with user and item features (read-only NumPy arrays).

    Per rating (`[N]`, in the order of the source): `user_id`, `item_id`
    (str), `rating` (float32, 1..5), `timestamp` (int64, seconds since
    1970), `age` (float32), `gender` (str `"M"`/`"F"`), `occupation` (str),
    `zip_prefix` (str, first 3 characters of the zip code), `year` (float32
    release year; unknown: the median), `genres` (str `[N, MAX_GENRES]`,
    padded with `""`), and `user_index` / `item_index` (int64 rows of the
    tables below).

    Per user (`[num_users]`, sorted by id): `users` (ids), `user_age`,
    `user_gender`, `user_occupation`, `user_zip_prefix`. Per item
    (`[num_items]`, sorted by id): `items`, `item_year`, `item_genres`
    (`[num_items, MAX_GENRES]`). `users[user_index]` equals `user_id`, and
    so on: negative samples take their features from these tables.

    `origin` says where the data was read from.
    """

    user_id: np.ndarray
    item_id: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    zip_prefix: np.ndarray
    year: np.ndarray
    genres: np.ndarray
    user_index: np.ndarray
    item_index: np.ndarray
    users: np.ndarray
    user_age: np.ndarray
    user_gender: np.ndarray
    user_occupation: np.ndarray
    user_zip_prefix: np.ndarray
    items: np.ndarray
    item_year: np.ndarray
    item_genres: np.ndarray
    origin: str

    @property
    def num_ratings(self) -> int:
        return len(self.rating)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.rating)

    def __repr__(self) -> str:
        return (
            f"MovieLens(num_ratings={self.num_ratings}, num_users={self.num_users}, "
            f"num_items={self.num_items}, origin={self.origin!r})"
        )


# --- reading files ---


def _shown(line: str) -> str:
    return repr(line if len(line) <= _SHOWN else line[:_SHOWN] + "...")


def _row_error(path: Path, lineno: int, expected: str, received: str) -> MovieLensError:
    return MovieLensError(f"{str(path)!r} line {lineno}: {expected}. Received: {received}")


def _read_lines(path: Path, encoding: str) -> list[tuple[int, str]]:
    """The non-blank lines of a text file as `(line number, line)`, after the size check."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise MovieLensError(
            f"{str(path)!r} is too large for a MovieLens file: at most MAX_FILE_BYTES = "
            f"{MAX_FILE_BYTES} bytes are read. Received: a file of {size} bytes"
        )
    with open(path, "rb") as file:
        raw = file.read(MAX_FILE_BYTES + 1)  # a file growing (or a device) is cut off too
    if len(raw) > MAX_FILE_BYTES:
        raise MovieLensError(
            f"{str(path)!r} is too large for a MovieLens file: at most MAX_FILE_BYTES = "
            f"{MAX_FILE_BYTES} bytes are read. Received: more than {MAX_FILE_BYTES} bytes"
        )
    if encoding == "utf-8":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    else:
        text = raw.decode(encoding)
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            lines.append((lineno, line))
    return lines


def _split_fields(path: Path, lines, separator: str, count: int, what: str):
    """Splits lines into `count` fields each; returns (line numbers, rows)."""
    rows = [line.split(separator) for _, line in lines]
    for (lineno, line), fields in zip(lines, rows):
        if len(fields) != count:
            name = "tab" if separator == "\t" else repr(separator)
            raise _row_error(
                path,
                lineno,
                f"expected {count} {name}-separated fields ({what})",
                f"{len(fields)} fields in {_shown(line)}",
            )
    return [lineno for lineno, _ in lines], rows


def _column(rows, index: int) -> list[str]:
    return [row[index].strip() for row in rows]


def _numbers(path: Path, name: str, values: list[str], linenos: list[int]) -> np.ndarray:
    """float64 values; names the line of the first one that is not a finite number."""
    try:
        array = np.array(values, dtype=np.float64)
    except ValueError:
        array = None
    if array is None:
        converted = []
        for value, lineno in zip(values, linenos):
            try:
                converted.append(float(value))
            except ValueError:
                raise _row_error(path, lineno, f"{name} must be a number", repr(value)) from None
        array = np.array(converted, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise _row_error(path, linenos[bad[0]], f"{name} must be a finite number", repr(values[bad[0]]))
    return array


def _integers(path: Path, name: str, values: list[str], linenos: list[int]) -> np.ndarray:
    """int64 values; `881250949.0` is accepted (RecBole's `float` type)."""
    try:
        return np.array(values, dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    converted = []
    for value, lineno in zip(values, linenos):
        try:
            number = int(value)
        except ValueError:
            try:
                real = float(value)
            except ValueError:
                real = math.nan
            if not (math.isfinite(real) and real.is_integer()):
                raise _row_error(path, lineno, f"{name} must be an integer", repr(value)) from None
            number = int(real)
        if not -(2**63) <= number < 2**63:
            raise _row_error(path, lineno, f"{name} must fit in int64", repr(value))
        converted.append(number)
    return np.array(converted, dtype=np.int64)


def _ids(path: Path, name: str, values: list[str], linenos: list[int]) -> list[str]:
    for value, lineno in zip(values, linenos):
        if not value:
            raise _row_error(path, lineno, f"{name} must not be empty", repr(value))
    return values


def _unique_positions(path: Path, name: str, ids: list[str], linenos: list[int]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for position, (value, lineno) in enumerate(zip(ids, linenos)):
        first = positions.setdefault(value, position)
        if first != position:
            raise _row_error(
                path,
                lineno,
                f"each {name} must appear once (first at line {linenos[first]})",
                f"{name}={value!r} again",
            )
    return positions


def _lookup(path: Path, name: str, values: list[str], linenos, table: dict[str, int], table_path: Path):
    index = np.array([table.get(value, -1) for value in values], dtype=np.int64)
    missing = np.flatnonzero(index < 0)
    if missing.size:
        first = int(missing[0])
        raise _row_error(
            path,
            linenos[first],
            f"every rating's {name} must be listed in {str(table_path)!r}",
            f"{name}={values[first]!r}",
        )
    return index


def _date_year(value: str) -> float:
    """The year of a `dd-Mon-yyyy` release date; NaN when there is none."""
    match = re.search(r"(\d{4})\s*$", value)
    return float(match.group(1)) if match else math.nan


def _read_recbole(folder: Path):
    tables = {}
    for name, required in _RECBOLE_COLUMNS.items():
        path = folder / name
        lines = _read_lines(path, "utf-8")
        if not lines:
            raise MovieLensError(
                f"{str(path)!r} is empty; expected a RecBole header line of tab-separated name:type "
                f"fields with {list(required)}. Received: no lines"
            )
        lineno, header = lines[0]
        names = []
        for field in header.split("\t"):
            column, colon, kind = field.strip().partition(":")
            if not colon or not column or not kind:
                raise _row_error(
                    path,
                    lineno,
                    "expected a RecBole header of tab-separated name:type fields (e.g. 'user_id:token')",
                    _shown(header),
                )
            names.append(column)
        duplicates = sorted(column for column, count in collections.Counter(names).items() if count > 1)
        if duplicates:
            raise _row_error(
                path, lineno, f"header columns must be unique; repeated: {duplicates}", _shown(header)
            )
        missing = [column for column in required if column not in names]
        if missing:
            raise _row_error(
                path,
                lineno,
                f"the header must name the columns {list(required)}; missing {missing}",
                _shown(header),
            )
        body = lines[1:]
        for row_lineno, line in body:
            if line == header:
                raise _row_error(
                    path, row_lineno, "one header line, at the top of the file", "the header again"
                )
        linenos, rows = _split_fields(path, body, "\t", len(names), " ".join(names))
        tables[name] = (path, linenos, {column: _column(rows, names.index(column)) for column in required})

    item_path, item_lines, item = tables["ml-100k.item"]
    flags = np.zeros((len(item_lines), len(GENRES)), bool)
    for row, (value, lineno) in enumerate(zip(item["class"], item_lines)):
        for genre in value.split():
            index = _GENRE_INDEX.get(genre)
            if index is None:
                raise _row_error(
                    item_path, lineno, f"genres (class) must be among {list(GENRES)}", repr(genre)
                )
            flags[row, index] = True
    years = np.array(
        [float(value) if re.fullmatch(r"\d{4}", value) else math.nan for value in item["release_year"]]
    )
    user_path, user_lines, user = tables["ml-100k.user"]
    inter_path, inter_lines, inter = tables["ml-100k.inter"]
    return (
        (inter_path, inter_lines, inter["user_id"], inter["item_id"], inter["rating"], inter["timestamp"]),
        (
            user_path,
            user_lines,
            user["user_id"],
            user["age"],
            user["gender"],
            user["occupation"],
            user["zip_code"],
        ),
        (item_path, item_lines, item["item_id"], years, flags),
    )


def _read_grouplens(folder: Path):
    inter_path, user_path, item_path = (folder / name for name in GROUPLENS_FILES)
    inter_lines, rows = _split_fields(
        inter_path, _read_lines(inter_path, "latin-1"), "\t", 4, "user id, item id, rating, timestamp"
    )
    inter = [_column(rows, index) for index in range(4)]
    user_lines, rows = _split_fields(
        user_path, _read_lines(user_path, "latin-1"), "|", 5, "user id|age|gender|occupation|zip code"
    )
    user = [_column(rows, index) for index in range(5)]
    item_lines, rows = _split_fields(
        item_path,
        _read_lines(item_path, "latin-1"),
        "|",
        5 + len(GENRES),
        "item id|title|release date|video release date|URL|19 genre flags",
    )
    flags = np.zeros((len(rows), len(GENRES)), bool)
    for row, (fields, lineno) in enumerate(zip(rows, item_lines)):
        for index, flag in enumerate(fields[5:]):
            flag = flag.strip()
            if flag not in ("0", "1"):
                raise _row_error(
                    item_path,
                    lineno,
                    f"genre flags must be 0 or 1 (flag {index + 1}, {GENRES[index]})",
                    repr(flag),
                )
            flags[row, index] = flag == "1"
    years = np.array([_date_year(value) for value in _column(rows, 2)])
    return (
        (inter_path, inter_lines, *inter),
        (user_path, user_lines, *user),
        (item_path, item_lines, _column(rows, 0), years, flags),
    )


def _natural_order(ids: Sequence[str]) -> np.ndarray:
    """Indices sorting ids numerically when all are decimal numbers, else as strings."""
    if all(value.isascii() and value.isdigit() for value in ids):
        # Compared as digit strings (not int): a hostile 10,000-digit id is fine too.
        return np.array(
            sorted(range(len(ids)), key=lambda i: (len(ids[i].lstrip("0")), ids[i].lstrip("0"), ids[i])),
            dtype=np.int64,
        )
    return np.array(sorted(range(len(ids)), key=lambda i: ids[i]), dtype=np.int64)


def _parse_local(folder: Path, layout: str) -> MovieLens:
    inter, user, item = (_read_recbole if layout == "recbole" else _read_grouplens)(folder)
    user_path, user_lines, user_ids, ages, genders, occupations, zips = user
    _ids(user_path, "user_id", user_ids, user_lines)
    _unique_positions(user_path, "user_id", user_ids, user_lines)
    age = _numbers(user_path, "age", ages, user_lines)
    bad = np.flatnonzero(age < 0)
    if bad.size:
        raise _row_error(user_path, user_lines[bad[0]], "age must not be negative", repr(ages[bad[0]]))
    for value, lineno in zip(genders, user_lines):
        if value not in ("M", "F"):
            raise _row_error(user_path, lineno, "gender must be 'M' or 'F'", repr(value))
    item_path, item_lines, item_ids, years, flags = item
    _ids(item_path, "item_id", item_ids, item_lines)
    _unique_positions(item_path, "item_id", item_ids, item_lines)
    counts = flags.sum(axis=1)
    bad = np.flatnonzero(counts > MAX_GENRES)
    if bad.size:
        raise _row_error(
            item_path,
            item_lines[bad[0]],
            f"at most MAX_GENRES = {MAX_GENRES} genres per movie",
            f"{counts[bad[0]]}",
        )

    user_order, item_order = _natural_order(user_ids), _natural_order(item_ids)
    users = np.array(user_ids, dtype=str)[user_order] if user_ids else np.zeros(0, "<U1")
    items = np.array(item_ids, dtype=str)[item_order] if item_ids else np.zeros(0, "<U1")
    user_table = {value: position for position, value in enumerate(users.tolist())}
    item_table = {value: position for position, value in enumerate(items.tolist())}

    inter_path, inter_lines, rating_users, rating_items, ratings, timestamps = inter
    user_index = _lookup(inter_path, "user_id", rating_users, inter_lines, user_table, user_path)
    item_index = _lookup(inter_path, "item_id", rating_items, inter_lines, item_table, item_path)
    rating = _numbers(inter_path, "rating", ratings, inter_lines)
    bad = np.flatnonzero((rating < 1) | (rating > 5))
    if bad.size:
        raise _row_error(inter_path, inter_lines[bad[0]], "rating must lie in 1..5", repr(ratings[bad[0]]))
    timestamp = _integers(inter_path, "timestamp", timestamps, inter_lines)
    return _assemble(
        users=users,
        user_age=age[user_order],
        user_gender=np.array(genders, dtype=str)[user_order] if genders else np.zeros(0, "<U1"),
        user_occupation=np.array(occupations, dtype=str)[user_order] if occupations else np.zeros(0, "<U1"),
        user_zip=[zips[i] for i in user_order],
        items=items,
        item_year=years[item_order],
        item_flags=flags[item_order],
        user_index=user_index,
        item_index=item_index,
        rating=rating,
        timestamp=timestamp,
        origin=f"{str(folder)!r} ({'RecBole atomic files' if layout == 'recbole' else 'GroupLens files'})",
        where=str(item_path),
    )


def _genre_matrix(flags: np.ndarray) -> np.ndarray:
    """`[n, 19]` flags -> `[n, MAX_GENRES]` names in GENRES order, padded with ""."""
    names = np.full((len(flags), MAX_GENRES), "", dtype=_GENRE_DTYPE)
    rows, genres = np.nonzero(flags)
    slots = np.cumsum(flags, axis=1)[rows, genres] - 1
    names[rows, slots] = _GENRE_NAMES[genres]
    return names


def _assemble(
    *,
    users,
    user_age,
    user_gender,
    user_occupation,
    user_zip,
    items,
    item_year,
    item_flags,
    user_index,
    item_index,
    rating,
    timestamp,
    origin,
    where,
) -> MovieLens:
    if len(rating) == 0:
        raise MovieLensError(
            f"MovieLens data from {origin} holds no ratings; expected at least one. Received: 0"
        )
    known = ~np.isnan(item_year)
    if not known.any():
        raise MovieLensError(
            f"No item of {where} has a release year, so unknown years cannot be filled with the median; "
            f"expected at least one 4-digit year. Received: {len(item_year)} items without one"
        )
    item_year = np.where(known, item_year, np.median(item_year[known])).astype(np.float32)
    zip_prefix = (
        np.array([value[:3] for value in user_zip], dtype=str) if len(user_zip) else np.zeros(0, "<U1")
    )
    item_genres = _genre_matrix(item_flags)
    user_age = np.asarray(user_age, np.float32)
    data = MovieLens(
        user_id=users[user_index],
        item_id=items[item_index],
        rating=np.asarray(rating, np.float32),
        timestamp=np.asarray(timestamp, np.int64),
        age=user_age[user_index],
        gender=user_gender[user_index],
        occupation=user_occupation[user_index],
        zip_prefix=zip_prefix[user_index],
        year=item_year[item_index],
        genres=item_genres[item_index],
        user_index=np.asarray(user_index, np.int64),
        item_index=np.asarray(item_index, np.int64),
        users=users,
        user_age=user_age,
        user_gender=user_gender,
        user_occupation=user_occupation,
        user_zip_prefix=zip_prefix,
        items=items,
        item_year=item_year,
        item_genres=item_genres,
        origin=origin,
    )
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return data


# --- tfds ---


def _tfds_prepared(tfds_data_dir) -> bool:
    return _sources._tfds_prepared(TFDS_NAME, tfds_data_dir)


def _tfds_where(tfds_data_dir) -> str:
    return os.fspath(tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _decode(values, what: str) -> np.ndarray:
    try:
        return np.array([value.decode("utf-8") for value in values], dtype=str)
    except UnicodeDecodeError as error:
        raise MovieLensError(f"tfds {TFDS_NAME!r} {what} must be UTF-8. Received: {error}") from None


def _tfds_error(example: int, expected: str, received: str) -> MovieLensError:
    return MovieLensError(f"tfds {TFDS_NAME!r} example {example}: {expected}. Received: {received}")


def _read_tfds(tfds_data_dir) -> MovieLens:
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(TFDS_NAME, split="train", data_dir=tfds_data_dir, download=False, with_info=True)
    except AssertionError as error:  # tfds's "could not find data" when not prepared
        raise FileNotFoundError(
            f"tfds has not prepared {TFDS_NAME!r} in {_tfds_where(tfds_data_dir)!r}; kmtl does not download it "
            f"(prepare it with tfds.builder({TFDS_NAME!r}).download_and_prepare(), or use local files). "
            f"Received: tfds_data_dir={tfds_data_dir!r}"
        ) from error
    missing = [name for name in _TFDS_FEATURES if name not in ds.element_spec]
    if missing:
        raise MovieLensError(
            f"tfds {TFDS_NAME!r} should have the features {list(_TFDS_FEATURES)}. Received: no {missing}"
        )
    tfds_names = list(info.features["movie_genres"].feature.names)
    to_genre = np.full(len(tfds_names), -2, np.int64)  # -2: not a genre of ML-100K, -1: no genre
    for label, name in enumerate(tfds_names):
        name = _TFDS_GENRES.get(name, name)
        to_genre[label] = -1 if name is None else _GENRE_INDEX.get(name, -2)

    def select(example):
        return {name: example[name] for name in _TFDS_FEATURES}

    def pad(batch):
        return dict(batch, movie_genres=batch["movie_genres"].to_tensor(default_value=-1))

    ds = ds.map(select).ragged_batch(8192).map(pad)
    columns: dict[str, list] = {name: [] for name in _TFDS_FEATURES}
    flag_blocks = []
    offset = 0
    for batch in tfds.as_numpy(ds):
        labels = np.asarray(batch["movie_genres"], np.int64).reshape(len(batch["user_id"]), -1)
        flags = np.zeros((len(labels), len(GENRES)), bool)
        if labels.size:
            present = labels >= 0
            bad = np.argwhere(present & (labels >= len(tfds_names)))
            if bad.size:
                raise _tfds_error(
                    offset + int(bad[0, 0]),
                    f"genre labels must lie in 0..{len(tfds_names) - 1}",
                    str(labels[tuple(bad[0])]),
                )
            genre = np.where(present, to_genre[np.where(present, labels, 0)], -1)
            bad = np.argwhere(genre == -2)
            if bad.size:
                name = tfds_names[labels[tuple(bad[0])]]
                raise _tfds_error(offset + int(bad[0, 0]), f"genres must be among {list(GENRES)}", repr(name))
            rows, slots = np.nonzero(genre >= 0)
            flags[rows, genre[rows, slots]] = True
        flag_blocks.append(flags)
        for name in _TFDS_FEATURES:
            if name != "movie_genres":
                columns[name].append(np.asarray(batch[name]))
        offset += len(labels)
    if offset == 0:
        raise MovieLensError(
            f"tfds {TFDS_NAME!r} holds no ratings; expected at least one. Received: 0 examples"
        )
    column = {name: np.concatenate(values) for name, values in columns.items() if values}
    flags = np.concatenate(flag_blocks)
    counts = flags.sum(axis=1)
    bad = np.flatnonzero(counts > MAX_GENRES)
    if bad.size:
        raise _tfds_error(
            int(bad[0]), f"at most MAX_GENRES = {MAX_GENRES} genres per movie", str(counts[bad[0]])
        )
    rating = column["user_rating"].astype(np.float32)
    bad = np.flatnonzero(~((rating >= 1) & (rating <= 5)))
    if bad.size:
        raise _tfds_error(int(bad[0]), "user_rating must lie in 1..5", str(rating[bad[0]]))
    age = column["raw_user_age"].astype(np.float32)
    bad = np.flatnonzero(~(np.isfinite(age) & (age >= 0)))
    if bad.size:
        raise _tfds_error(int(bad[0]), "raw_user_age must be a finite number >= 0", str(age[bad[0]]))

    user_id, item_id = _decode(column["user_id"], "user ids"), _decode(column["movie_id"], "movie ids")
    row_user = {
        "age": age,
        "gender": np.where(column["user_gender"].astype(bool), "M", "F"),
        "occupation": _decode(column["user_occupation_text"], "occupations"),
        "zip code": _decode(column["user_zip_code"], "zip codes"),
    }
    titles = _decode(column["movie_title"], "titles")
    users, user_index, user_first = _table(user_id)
    items, item_index, item_first = _table(item_id)
    for name, values in row_user.items():
        _check_constant(values, user_index, user_first, user_id, "user", name)
    _check_constant(titles, item_index, item_first, item_id, "movie", "movie_title")
    _check_constant(flags, item_index, item_first, item_id, "movie", "movie_genres")
    years = []
    for title in titles[item_first]:
        found = re.findall(r"\((\d{4})\)", title)
        years.append(float(found[-1]) if found else math.nan)
    return _assemble(
        users=users,
        user_age=age[user_first],
        user_gender=row_user["gender"][user_first],
        user_occupation=row_user["occupation"][user_first],
        user_zip=row_user["zip code"][user_first].tolist(),
        items=items,
        item_year=np.array(years, np.float64),
        item_flags=flags[item_first],
        user_index=user_index,
        item_index=item_index,
        rating=rating,
        timestamp=column["timestamp"].astype(np.int64),
        origin=f"tfds {TFDS_NAME!r} in {_tfds_where(tfds_data_dir)!r}",
        where=f"tfds {TFDS_NAME!r}",
    )


def _table(ids: np.ndarray):
    """(ids sorted naturally, each row's index into them, each id's first row)."""
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = _natural_order(unique.tolist())
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return unique[order], rank[inverse.reshape(-1)], first[order]


def _check_constant(values, index, first, ids, owner: str, name: str):
    """Checks that a per-rating tfds column is the same on every row of a user (movie)."""
    expected = values[first][index]
    differs = expected != values
    if differs.ndim > 1:
        differs = differs.any(axis=tuple(range(1, differs.ndim)))
    bad = np.flatnonzero(differs)
    if bad.size:
        row = int(bad[0])
        raise _tfds_error(
            row,
            f"every rating of a {owner} has the same {name} ({owner} {ids[row]!r} has "
            f"{expected[row]!r} at example {first[index][row]})",
            repr(values[row]),
        )


# --- locating and caching ---


def _find_local(root: Path):
    """The first complete layout under `root/movielens-100k`: (folder, layout), or None."""
    base = root / FOLDER
    for folder in (base, base / SUBFOLDER):
        for layout, names in (("recbole", RECBOLE_FILES), ("grouplens", GROUPLENS_FILES)):
            if all((folder / name).is_file() for name in names):
                return folder, layout
    return None


def _missing_local(root: Path, explicit: bool, tfds_note: str, received: str) -> FileNotFoundError:
    base = root / FOLDER
    origin = (
        "the data_dir argument"
        if explicit
        else ("$KMTL_DATA_DIR" if os.environ.get("KMTL_DATA_DIR") else "the default, ~/.kmtl/data")
    )
    partial = []
    for folder in (base, base / SUBFOLDER):
        for names in (RECBOLE_FILES, GROUPLENS_FILES):
            present = [name for name in names if (folder / name).is_file()]
            if present and len(present) < len(names):
                absent = [name for name in names if name not in present]
                partial.append(f"{str(folder)!r} has {', '.join(present)} but not {', '.join(absent)}")
    partial_note = f" Incomplete: {'; '.join(partial)}." if partial else ""
    return FileNotFoundError(
        f"No local MovieLens 100K files: looked in {str(base)!r} and {str(base / SUBFOLDER)!r} for the RecBole "
        f"atomic files ({', '.join(RECBOLE_FILES)}) or the GroupLens files ({', '.join(GROUPLENS_FILES)}) "
        f"(data directory from {origin}).{partial_note}{tfds_note} To get the data, set KMTL_DATA_DIR (or pass "
        f"data_dir) to a folder holding {FOLDER}/ with either set of files, or prepare tfds {TFDS_NAME!r} "
        f"and use source='tfds'. Received: {received}"
    )


def _stamp(folder: Path, layout: str):
    names = RECBOLE_FILES if layout == "recbole" else GROUPLENS_FILES
    stats = [(folder / name).stat() for name in names]
    return tuple((stat.st_size, stat.st_mtime_ns) for stat in stats)


@functools.lru_cache(maxsize=4)
def _load_cached(source: str, location: str, layout, stamp) -> MovieLens:
    del stamp  # part of the cache key only
    if source == "local":
        return _parse_local(Path(location), layout)
    return _read_tfds(None if location is None else location)


def clear_cache() -> None:
    """Forgets the MovieLens data `load_movielens` keeps in memory."""
    _load_cached.cache_clear()


def movielens_available(data_dir: str | os.PathLike | None = None, tfds_data_dir=None) -> bool:
    """Whether `load_movielens(source="auto")` would find MovieLens 100K without downloading.

    Args:
        data_dir: root of the local files; default `kmtl.data.data_dir()`.
        tfds_data_dir: where tfds keeps prepared datasets; default tfds's.

    Returns:
        True when a complete local layout is present or tfds has prepared
        `movielens/100k-ratings`. Nothing is read or downloaded.
    """
    if _find_local(_sources.data_dir(data_dir)) is not None:
        return True
    return _tfds_prepared(tfds_data_dir)


def load_movielens(
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
) -> MovieLens:
    """Loads MovieLens 100K: one row per rating with user and item features.

    See the module docstring for sources, layouts and column decisions.

    Args:
        source: `"auto"`, `"local"` or `"tfds"`.
        data_dir: root of the local files (holding `movielens-100k/`);
            default `kmtl.data.data_dir()` (`$KMTL_DATA_DIR`).
        tfds_data_dir: where tfds keeps prepared datasets; default tfds's.

    Returns:
        A `MovieLens` of read-only arrays (cached in this process).

    Raises:
        ValueError: for an unknown source.
        FileNotFoundError: when the data is not found (for `"auto"`: neither
            locally nor prepared by tfds); the message says where it looked.
        MovieLensError: for a malformed or oversized file, naming the file
            and line (or the tfds example).

    Example:

    >>> data = kmtl.data.load_movielens()
    >>> data.num_ratings, data.num_users, data.num_items
    (100000, 943, 1682)
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown source; expected one of {list(SOURCES)}. Received: source={source!r}")
    root = _sources.data_dir(data_dir)
    found = _find_local(root) if source in ("auto", "local") else None
    received = f"source={source!r}, data_dir={data_dir!r}, tfds_data_dir={tfds_data_dir!r}"
    if source == "auto":
        if found is not None:
            source = "local"
        elif _tfds_prepared(tfds_data_dir):
            source = "tfds"
        else:
            note = f" tfds has not prepared {TFDS_NAME!r} either in {_tfds_where(tfds_data_dir)!r}."
            raise _missing_local(root, data_dir is not None, note, received)
    if source == "local":
        if found is None:
            raise _missing_local(root, data_dir is not None, "", received)
        folder, layout = found
        return _load_cached("local", str(folder.resolve()), layout, _stamp(folder, layout))
    import tensorflow_datasets as tfds

    # As in kmtl.data.sources: the key holds `as_dataset` itself, which `tfds.testing.mock_data`
    # replaces, so mocked data is never served outside its context.
    location = None if tfds_data_dir is None else os.fspath(tfds_data_dir)
    return _load_cached("tfds", location, None, tfds.core.DatasetBuilder.as_dataset)


# --- splits, negatives, tasks ---


def _check_tasks(tasks) -> list[str]:
    return check_task_names(tasks, TASKS, "MovieLens")


def _check_options(split, split_scheme, test_fraction, negatives, seed):
    if split not in SPLITS:
        raise ValueError(f"Unknown split; expected one of {list(SPLITS)}. Received: split={split!r}")
    if split_scheme not in SPLIT_SCHEMES:
        raise ValueError(
            f"Unknown split_scheme; expected one of {list(SPLIT_SCHEMES)}. Received: split_scheme={split_scheme!r}"
        )
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, numbers.Real)
        or not 0 < float(test_fraction) < 1
    ):
        raise ValueError(
            f"`test_fraction` must be a number strictly between 0 and 1. Received: test_fraction={test_fraction!r}"
        )
    if isinstance(negatives, bool) or not isinstance(negatives, numbers.Integral) or negatives < 0:
        raise ValueError(
            f"`negatives` (negatives per observed rating) must be an integer >= 0. Received: negatives={negatives!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(
            "`seed` must be an integer >= 0: it fixes the train/test split and the negatives, so that "
            f"train and test never overlap. Received: seed={seed!r}"
        )
    return float(test_fraction), int(negatives), int(seed)


def _test_mask(data: MovieLens, split_scheme: str, test_fraction: float, seed: int) -> np.ndarray:
    """Which ratings are in the test split (independent of tasks and negatives)."""
    num = data.num_ratings
    test = np.zeros(num, bool)
    if split_scheme == "random":
        order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num)
        num_test = int(math.floor(test_fraction * num + 0.5))
        test[order[num - num_test :]] = True
        return test
    # temporal: per user by (timestamp, item id, row); the latest ceil(f * n_u) go to test.
    order = np.lexsort((np.arange(num), data.item_index, data.timestamp, data.user_index))
    counts = np.bincount(data.user_index, minlength=data.num_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    user = data.user_index[order]
    rank = np.arange(num) - starts[user]  # 0 = the user's earliest rating
    wanted = np.ceil(test_fraction * counts - 1e-9).astype(np.int64)
    wanted = np.where(counts >= 2, np.clip(wanted, 1, counts - 1), 0)
    test[order[rank >= counts[user] - wanted[user]]] = True
    return test


def _negatives(data: MovieLens, test: np.ndarray, negatives: int, seed: int):
    """Per user, `negatives` unseen items per observed rating of each split.

    Returns `(train_users, train_items, test_users, test_items)`.
    """
    empty = np.zeros(0, np.int64)
    if negatives == 0:
        return empty, empty, empty, empty
    num_users = data.num_users
    train_counts = np.bincount(data.user_index[~test], minlength=num_users)
    test_counts = np.bincount(data.user_index[test], minlength=num_users)
    order = np.argsort(data.user_index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(data.user_index, minlength=num_users))])
    seen = np.zeros(data.num_items, bool)
    parts: dict[str, list] = {"train_users": [], "train_items": [], "test_users": [], "test_items": []}
    for user in range(num_users):
        need_train, need_test = negatives * int(train_counts[user]), negatives * int(test_counts[user])
        need = need_train + need_test
        if need == 0:
            continue
        rated = data.item_index[order[starts[user] : starts[user + 1]]]
        seen[rated] = True
        pool = np.flatnonzero(~seen)
        seen[rated] = False
        if need > len(pool):  # too few unseen items: all of them, shared in proportion
            need_train = (len(pool) * need_train + need // 2) // need
            need_test = len(pool) - need_train
        shuffled = np.random.default_rng([seed, _NEGATIVE_STREAM, user]).permutation(pool)
        # Train takes the front, test the back: disjoint, and each grows with `negatives`.
        picks = {"train": shuffled[:need_train], "test": shuffled[len(shuffled) - need_test :]}
        for name, items in picks.items():
            parts[f"{name}_users"].append(np.full(len(items), user, np.int64))
            parts[f"{name}_items"].append(items.astype(np.int64))
    return tuple(np.concatenate(parts[key]) if parts[key] else empty for key in parts)


@dataclasses.dataclass(frozen=True)
class _Rows:
    data: MovieLens
    user_index: np.ndarray
    item_index: np.ndarray
    labels: dict
    weights: dict
    masked: bool  # whether some task's weight is 0 on the negative rows


def _rows(
    tasks, split, split_scheme, test_fraction, negatives, seed, source, data_dir, tfds_data_dir
) -> _Rows:
    tasks = _check_tasks(tasks)
    test_fraction, negatives, seed = _check_options(split, split_scheme, test_fraction, negatives, seed)
    data = load_movielens(source, data_dir, tfds_data_dir)
    test = _test_mask(data, split_scheme, test_fraction, seed)
    observed = np.flatnonzero({"train": ~test, "test": test, "all": np.ones_like(test)}[split])
    implicit = any(task in _IMPLICIT_TASKS for task in tasks)
    if implicit:
        train_users, train_items, test_users, test_items = _negatives(data, test, negatives, seed)
        negative_users = {
            "train": train_users,
            "test": test_users,
            "all": np.concatenate([train_users, test_users]),
        }
        negative_items = {
            "train": train_items,
            "test": test_items,
            "all": np.concatenate([train_items, test_items]),
        }
        negative_users, negative_items = negative_users[split], negative_items[split]
    else:
        negative_users = negative_items = np.zeros(0, np.int64)
    num_observed, num_negative = len(observed), len(negative_users)
    is_observed = np.concatenate([np.ones(num_observed, bool), np.zeros(num_negative, bool)])
    rating = np.concatenate([data.rating[observed], np.ones(num_negative, np.float32)])
    liked = (is_observed & (rating >= LIKED_THRESHOLD)).astype(np.float32)
    watched = is_observed.astype(np.float32)
    ones = np.ones(len(rating), np.float32)
    labels = {
        "rating": (rating.astype(np.float32), watched),
        "liked": (liked, watched),
        "watched": (watched, ones),
        "liked_given_watched": (liked, watched),
        "watched_and_liked": (liked, ones),  # = watched * liked: negatives are not liked
    }
    return _Rows(
        data=data,
        user_index=np.concatenate([data.user_index[observed], negative_users]),
        item_index=np.concatenate([data.item_index[observed], negative_items]),
        labels={task: labels[task][0].copy() for task in tasks},
        weights={task: labels[task][1].copy() for task in tasks},
        masked=implicit and negatives > 0 and any(task in _MASKED_ON_NEGATIVES for task in tasks),
    )


def movielens_arrays(
    tasks: Sequence[str],
    split: str = "train",
    split_scheme: str = "random",
    test_fraction: float = 0.2,
    negatives: int = 4,
    seed: int = 0,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MovieLens 100K features, task labels and sample weights as NumPy arrays.

    Tasks (`TASKS`; labels float32, a weight of 0 marks an undefined label):

    - `"rating"`: the rating, 1..5 (regression).
    - `"liked"`: 1 when the rating is at least 4, else 0.
    - `"watched"`: implicit feedback: 1 on observed ratings, 0 on negatives.
    - `"liked_given_watched"`: `liked`, defined on observed ratings only.
    - `"watched_and_liked"`: 1 iff observed and liked (ESMM's pCTCVR label,
      `watched * liked`), defined on every row.

    Rows: when a task of `watched`, `liked_given_watched`,
    `watched_and_liked` is asked for, the split's observed ratings (in the
    order of the source) followed by its sampled negatives (user by user;
    `"all"`: the train negatives, then the test negatives); on negatives
    `rating`, `liked` and `liked_given_watched` have weight 0 and the
    harmless labels 1.0, 0 and 0. Otherwise the observed ratings only, every
    weight 1.

    Splits (`split_scheme`, never dependent on `tasks` or `negatives`):

    - `"random"`: a permutation of the ratings drawn from `seed`; the last
      `round(test_fraction * N)` are the test split, the rest train.
    - `"temporal"`: per user, the ratings sorted by (timestamp, item id); the
      latest `ceil(test_fraction * n_u)` go to test, but at least 1 and at
      most `n_u - 1` when the user has 2 or more ratings (a user with a
      single rating keeps it in train).

    Negatives: for each user, `negatives` items per observed rating of that
    user in the split, drawn without replacement from the items the user
    never rated (in either split) with a generator seeded by `(seed,
    user)`: the same `seed` gives the same negatives whatever the tasks or
    the order in which splits are asked for; train and test negatives are
    disjoint. A user with fewer unseen items than train and test need
    together gets all of them, shared between train and test in proportion
    to the numbers needed (ML-100K, `negatives=4`: 34 users). Negatives
    carry the user's and the item's features like any row.

    Args:
        tasks: task names from `TASKS`; the label dicts keep their order.
        split: `"train"`, `"test"` or `"all"` (train and test together).
        split_scheme: `"random"` or `"temporal"`.
        test_fraction: share of the ratings in the test split, in (0, 1).
        negatives: sampled negatives per observed rating, an integer >= 0.
        seed: seeds the split and the negatives (integer >= 0); use the same
            seed for the train and the test split.
        source, data_dir, tfds_data_dir: as in `load_movielens`.

    Returns:
        `(features, labels, weights)`: `features` maps `FEATURE_NAMES` to
        arrays of `R` rows (`user_id`, `item_id`, `gender`, `occupation`,
        `zip_prefix`: `numpy.str_` `[R]`; `age`, `year`: float32 `[R]`;
        `genres`: `numpy.str_` `[R, MAX_GENRES]`, padded with `""`);
        `labels` and `weights` map each task to float32 `[R]`.

    Raises:
        ValueError: for unknown or duplicate tasks, an unknown split,
            split_scheme or source, or a bad test_fraction, negatives or seed.
        FileNotFoundError, MovieLensError: as `load_movielens`.

    Example:

    >>> features, labels, weights = kmtl.data.movielens_arrays(["watched", "liked_given_watched"])
    >>> features["genres"].shape[1], sorted(labels)
    (6, ['liked_given_watched', 'watched'])
    """
    rows = _rows(tasks, split, split_scheme, test_fraction, negatives, seed, source, data_dir, tfds_data_dir)
    data, users, items = rows.data, rows.user_index, rows.item_index
    features = {
        "user_id": data.users[users],
        "item_id": data.items[items],
        "age": data.user_age[users],
        "gender": data.user_gender[users],
        "occupation": data.user_occupation[users],
        "zip_prefix": data.user_zip_prefix[users],
        "year": data.item_year[items],
        "genres": data.item_genres[items],
    }
    return features, rows.labels, rows.weights


def movielens_tasks(
    tasks: Sequence[str],
    split: str = "train",
    batch_size: int | None = 256,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_remainder: bool = False,
    split_scheme: str = "random",
    test_fraction: float = 0.2,
    negatives: int = 4,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    shuffle_seed: int | None = None,
    *,
    epochs: tuple[int, int] | None = None,
    skip_batches: int = 0,
):
    """MovieLens 100K multi-task `tf.data` pipeline (the rows of `movielens_arrays`).

    The user and item tables stay in memory as tensors and each batch
    gathers its rows' features; shuffling follows `kmtl.data.task_dataset`
    (reshuffled every epoch, the same sequence of epochs for the same seed).

    Args:
        tasks: task names from `TASKS`; the label dict keeps their order.
        split: `"train"`, `"test"` or `"all"`.
        batch_size: rows per batch, or `None` for unbatched rows.
        shuffle: shuffle (again every epoch); default `True` except for
            `"test"`.
        seed: seeds the split, the negatives and (unless `shuffle_seed` is
            given) the shuffle order.
        drop_remainder: drop the last partial batch.
        split_scheme, test_fraction, negatives, source, data_dir,
            tfds_data_dir: as in `movielens_arrays`.
        shuffle_seed: seeds the shuffle order alone (default: `seed`), so
            that runs with different training seeds share one split and one
            set of negatives (what `kmtl.data.task_dataset("movielens", ...)`
            does: split seed 0).
        epochs, skip_batches: one stream of the batches of epochs
            `first..stop-1`, each epoch's order a function of the shuffle
            seed and the epoch alone, as in `kmtl.data.task_dataset`.

    Returns:
        A dataset of `(features, {task: label})`, or of `(features, {task:
        label}, {task: weight})` when a requested task is masked on the
        negatives (`rating`, `liked` or `liked_given_watched` together with
        an implicit task and `negatives > 0`). Features are `tf.string`
        (`user_id`, `item_id`, `gender`, `occupation`, `zip_prefix`,
        `genres` `[B, MAX_GENRES]`) and float32 (`age`, `year`) with shape
        `[B]` unless noted; labels and weights are float32 `[B]`.

    Raises:
        ValueError: as `movielens_arrays`, or for a bad `batch_size`.
        FileNotFoundError, MovieLensError: as `load_movielens`.

    Example:

    >>> train = kmtl.data.movielens_tasks(["watched", "watched_and_liked"], batch_size=512)
    """
    import tensorflow as tf

    batch_size = check_batch_size(batch_size)
    if shuffle_seed is not None and (
        isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, (int, np.integer)) or shuffle_seed < 0
    ):
        raise ValueError(
            f"`shuffle_seed` must be an integer >= 0 or None. Received: shuffle_seed={shuffle_seed!r}"
        )
    from kmtl.data import _order

    order_seed = seed if shuffle_seed is None else shuffle_seed
    span = _order.check(epochs, skip_batches, order_seed, batch_size)
    rows = _rows(tasks, split, split_scheme, test_fraction, negatives, seed, source, data_dir, tfds_data_dir)
    if shuffle is None:
        shuffle = split != "test"
    data = rows.data
    user_columns = {
        "user_id": data.users,
        "age": data.user_age,
        "gender": data.user_gender,
        "occupation": data.user_occupation,
        "zip_prefix": data.user_zip_prefix,
    }
    item_columns = {"item_id": data.items, "year": data.item_year, "genres": data.item_genres}
    tables = {name: tf.constant(value) for name, value in {**user_columns, **item_columns}.items()}
    row_users, row_items = tf.constant(rows.user_index), tf.constant(rows.item_index)
    labels = {task: tf.constant(value) for task, value in rows.labels.items()}
    weights = {task: tf.constant(value) for task, value in rows.weights.items()} if rows.masked else None

    def take(index):
        users, items = tf.gather(row_users, index), tf.gather(row_items, index)
        features = {
            name: tf.gather(tables[name], users if name in user_columns else items) for name in FEATURE_NAMES
        }
        example = (features, {task: tf.gather(value, index) for task, value in labels.items()})
        if weights is not None:
            example += ({task: tf.gather(value, index) for task, value in weights.items()},)
        return example

    num_rows = len(rows.user_index)
    if span is not None:
        pipeline = _order.index_batches(
            num_rows, batch_size, drop_remainder, shuffle, order_seed, span, int(skip_batches)
        )
        pipeline = pipeline.map(take, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return pipeline.prefetch(tf.data.AUTOTUNE)
    pipeline = tf.data.Dataset.range(num_rows)
    if shuffle and num_rows > 1:
        pipeline = pipeline.shuffle(num_rows, seed=order_seed, reshuffle_each_iteration=True)
    block = batch_size if batch_size is not None else _UNBATCHED_BLOCK
    pipeline = pipeline.batch(block, drop_remainder=drop_remainder and batch_size is not None)
    pipeline = pipeline.map(take, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if batch_size is None:
        pipeline = pipeline.unbatch().apply(tf.data.experimental.assert_cardinality(num_rows))
    return pipeline.prefetch(tf.data.AUTOTUNE)


def movielens_features(
    embedding_dim: int = 16,
    adapt: bool = True,
    split_scheme: str = "random",
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
):
    """The `kmtl.inputs.Features` of the MovieLens columns (`FEATURE_NAMES`).

    | column       | encoding                                                        |
    |--------------|-----------------------------------------------------------------|
    | `user_id`    | `categorical`, `embedding_dim` (one OOV embedding)              |
    | `item_id`    | `categorical`, `embedding_dim` (one OOV embedding)              |
    | `age`        | `numeric` (normalised)                                          |
    | `gender`     | `categorical`, 2                                                |
    | `occupation` | `categorical`, 4                                                |
    | `zip_prefix` | `hashed` into 128 bins, 4                                       |
    | `year`       | `bucketized` into 10 quantile bins, 4                           |
    | `genres`     | `multi_categorical` (width `MAX_GENRES`), 8, mean of the genres |

    With `adapt`, the vocabularies and statistics come from the observed
    ratings of the training split (split seed 0, `split_scheme`): an item
    rated only in the test split is out of vocabulary, as a new item is in
    production, and nothing is learned from the test split.

    Args:
        embedding_dim: width of the user and item embeddings.
        adapt: adapt on the training ratings (else return the spec unadapted).
        split_scheme, source, data_dir, tfds_data_dir: as in `movielens_arrays`.

    Returns:
        A `kmtl.inputs.Features` (adapted when `adapt`).

    Example:

    >>> features = kmtl.data.movielens_features()  # doctest: +SKIP
    >>> model = kmtl.build_model(heads=kmtl.data.task_heads("movielens", ["rating", "watched"]),
    ...                          trunk="dense:64,32", features=features)  # doctest: +SKIP
    """
    from kmtl import inputs

    spec = inputs.Features(
        [
            inputs.categorical("user_id", embedding_dim=embedding_dim),
            inputs.categorical("item_id", embedding_dim=embedding_dim),
            inputs.numeric("age"),
            inputs.categorical("gender", embedding_dim=2),
            inputs.categorical("occupation", embedding_dim=4),
            inputs.hashed("zip_prefix", num_bins=128, embedding_dim=4),
            inputs.bucketized("year", num_bins=10, embedding_dim=4),
            inputs.multi_categorical("genres", width=MAX_GENRES, embedding_dim=8, combiner="mean"),
        ]
    )
    if adapt:
        features, _, _ = movielens_arrays(
            ["rating"],
            "train",
            split_scheme=split_scheme,
            seed=0,
            source=source,
            data_dir=data_dir,
            tfds_data_dir=tfds_data_dir,
        )
        spec.adapt(features)
    return spec
