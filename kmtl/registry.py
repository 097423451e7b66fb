"""One registry for kmtl's named building blocks: strategies, architectures, heads.

`register(kind, name)` is the one decorator: it files a class or builder
function under `name` in the registry of `kind`, and registers classes with
Keras's serialization (package `"kmtl"`), so that a saved model finds them
in any process that imported `kmtl`. Modules register when they are
imported, and `kmtl` imports every one of its modules eagerly: nothing a
saved file may name is left unregistered.

Example:

>>> from kmtl import registry
>>> registry.names("weighting")[:2]
['aligned_mtl', 'cagrad']
"""

from __future__ import annotations

from typing import Callable

KINDS = ("weighting", "architecture", "head")
_REGISTRY: dict[str, dict[str, object]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str) -> Callable:
    """Returns a decorator filing its argument under `name` in `kind`'s registry.

    Classes are also registered with `keras.saving.register_keras_serializable`
    (package `"kmtl"`), under their class name.

    Raises:
        ValueError: for an unknown kind or a name registered twice.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown registry kind; expected one of {KINDS}. Received: kind={kind!r}")

    def decorate(obj):
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"{kind} name {name!r} is already registered to {existing!r}. Received: {obj!r}")
        if isinstance(obj, type):
            import keras

            obj = keras.saving.register_keras_serializable(package="kmtl")(obj)
        _REGISTRY[kind][name] = obj
        return obj

    return decorate


def lookup(kind: str, name: str):
    """Returns what is registered as `name` in `kind`'s registry.

    Raises:
        KeyError: if nothing is registered under that name.
    """
    return _REGISTRY[kind][name]


def names(kind: str) -> list[str]:
    """Registered names of `kind`, in registration (= import) order."""
    return list(_REGISTRY[kind])


def entries(kind: str) -> dict:
    """A copy of `kind`'s registry: `{name: class or function}`."""
    return dict(_REGISTRY[kind])


__all__ = ["KINDS", "entries", "lookup", "names", "register"]
