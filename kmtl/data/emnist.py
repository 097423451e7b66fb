"""EMNIST splits: label ranges, character mapping and derived labels.

EMNIST (Cohen et al., 2017) converts the NIST Special Database 19
characters to 28x28 MNIST-style images. It comes in six splits:

| split      | train   | test    | labels in the files | classes (`char`) |
|------------|---------|---------|---------------------|------------------|
| `byclass`  | 697,932 | 116,323 | 0..61               | 62: `0-9`, `A-Z`, `a-z` |
| `bymerge`  | 697,932 | 116,323 | 0..46               | 47: `0-9`, `A-Z`, `a b d e f g h n q r t` |
| `balanced` | 112,800 |  18,800 | 0..46               | 47: as `bymerge`, balanced per class |
| `letters`  | 124,800 |  20,800 | 1..26               | 26: `A`..`Z`, upper and lower case merged |
| `digits`   | 240,000 |  40,000 | 0..9                | 10 digits |
| `mnist`    |  60,000 |  10,000 | 0..9                | 10 digits |

In `bymerge`/`balanced` the 15 letters whose two cases look alike
(C I J K L M O P S U V W X Y Z) have a single class, listed under the
upper-case letter; the other 11 letters have a class per case.

Orientation: the official files (and `tfds`, which copies them unchanged)
store every image transposed, i.e. mirrored and rotated 90 degrees.
`kmtl.data.load_arrays` transposes them back, so images from both sources
are upright like MNIST. Labels are returned as stored (`letters` keeps
1..26); the `char` task maps them to 0-based classes.

References:
    Cohen, G., Afshar, S., Tapson, J. and van Schaik, A. "EMNIST: an
    extension of MNIST to handwritten letters." arXiv:1702.05373, 2017.
"""

from __future__ import annotations

import string

import numpy as np

__all__ = ["EMNIST_SPLITS", "emnist_char_names", "emnist_derived_labels"]

_MERGED_LOWER = "abdefghnqrt"  # lower-case letters with their own bymerge/balanced class

# split name -> (number of `char` classes, smallest label stored in the files)
EMNIST_SPLITS: dict[str, tuple[int, int]] = {
    "balanced": (47, 0),
    "byclass": (62, 0),
    "bymerge": (47, 0),
    "digits": (10, 0),
    "letters": (26, 1),
    "mnist": (10, 0),
}


def emnist_char_names(split_name: str) -> list[str]:
    """Returns the character of each `char` class of an EMNIST split.

    Args:
        split_name: one of `EMNIST_SPLITS`.

    Returns:
        A list of one-character strings, index = class, e.g. 47 entries
        `["0", ..., "9", "A", ..., "Z", "a", "b", "d", ...]` for `balanced`.

    Raises:
        ValueError: for an unknown split name.

    Example:

    >>> kmtl.data.emnist.emnist_char_names("letters")[:3]
    ['A', 'B', 'C']
    """
    _check_split_name(split_name)
    digits, upper, lower = string.digits, string.ascii_uppercase, string.ascii_lowercase
    names = {
        "byclass": digits + upper + lower,
        "bymerge": digits + upper + _MERGED_LOWER,
        "balanced": digits + upper + _MERGED_LOWER,
        "letters": upper,
        "digits": digits,
        "mnist": digits,
    }[split_name]
    return list(names)


def _check_split_name(split_name) -> str:
    if split_name not in EMNIST_SPLITS:
        raise ValueError(
            f"Unknown EMNIST split; expected one of {sorted(EMNIST_SPLITS)}. "
            f"Received: split_name={split_name!r}"
        )
    return split_name


def _class_tables(split_name: str) -> dict[str, np.ndarray]:
    """Per-class lookup tables: is_letter, case (1 = lower) and case_defined."""
    names = emnist_char_names(split_name)
    is_letter = np.array([name.isalpha() for name in names], np.float32)
    case = np.array([name.islower() for name in names], np.float32)
    if split_name == "byclass":
        case_defined = is_letter.copy()
    elif split_name in ("bymerge", "balanced"):
        # An upper-case class holds one case only when the lower case has its own class.
        case_defined = np.array(
            [name.islower() or (name.isupper() and name.lower() in _MERGED_LOWER) for name in names],
            np.float32,
        )
    else:  # letters merge both cases; digit splits have no case.
        case_defined = np.zeros(len(names), np.float32)
    return {"is_letter": is_letter, "case": case, "case_defined": case_defined}


def emnist_derived_labels(split_name: str, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Derives the EMNIST task labels from the labels stored in the files.

    Args:
        split_name: one of `EMNIST_SPLITS`.
        labels: integer labels as returned by `kmtl.data.load_arrays`.

    Returns:
        A dict with `char` (int32 class, 0-based), `is_letter` (float32,
        1 = letter), `case` (float32, 1 = lower case, 0 = upper case or
        undefined) and `case_weight` (float32, 1 where the class has a single
        case, 0 for digits and for merged-case classes).

    Raises:
        ValueError: if a label lies outside the split's range.
    """
    num_classes, offset = EMNIST_SPLITS[_check_split_name(split_name)]
    labels = np.asarray(labels)
    if labels.size and (labels.min() < offset or labels.max() >= offset + num_classes):
        raise ValueError(
            f"EMNIST {split_name!r} labels must lie in {offset}..{offset + num_classes - 1}. "
            f"Received: labels in {labels.min()}..{labels.max()}"
        )
    char = (labels - offset).astype(np.int32)
    tables = _class_tables(split_name)
    return {
        "char": char,
        "is_letter": tables["is_letter"][char],
        "case": tables["case"][char],
        "case_weight": tables["case_defined"][char],
    }
