"""The contract every architecture builder follows.

An architecture builder is a function

    build(inputs, trunk, heads, **options) -> Parts

that creates fresh layers and returns the model split in two:

* `encoder`: a `keras.Model` from the model inputs to the *shared
  representation* (a tensor, or a list/dict of tensors). Its trainable
  variables are the model's **shared** variables: gradient-level weighting
  strategies combine the per-task gradients of exactly these.
* `decoders`: `{task: keras.Model}`, each from the representation (same
  structure as the encoder output) to that task's output. A decoder's
  trainable variables are **task-specific**: they receive their own task's
  gradient only. No variable may belong to two decoders or to the encoder and
  a decoder. Name each decoder model exactly as its head (`name=head.name`):
  Keras takes the model's output names from it.

`supports_representation` says whether every decoder reads the whole
representation, so that gradient strategies may work on the gradients of the
representation (MGDA-UB style) instead of the shared parameters. In that
case no representation tensor may be computed from another one (hand a
tensor that feeds another to the decoders through a separate copy):
otherwise a task's representation gradient counts that path twice.

`untrained` (optional): heads that get no loss by default because they
learn through another head's output (ESMM's conversion head).

`stages` (optional): when the encoder is a chain, the layers whose
successive application to the input is the encoder, holding every shared
variable. The parameters-mode Gram engine (`kmtl.backend.tensorflow.gram`)
walks it backwards, one stage at a time.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import tree


@dataclasses.dataclass
class Parts:
    """What an architecture builder returns (see the module docstring)."""

    encoder: keras.Model
    decoders: dict
    supports_representation: bool = True
    #: One sentence naming which parameters count as shared, for docs/reports.
    shared_description: str = ""
    #: The encoder as a chain of layers (see the module docstring), or None.
    stages: list | None = None
    #: Heads trained through another head's output only (ESMM's pCVR): they get
    #: no loss unless `compile(loss=...)` gives them one.
    untrained: tuple = ()


def decoder_inputs(representation, prefix: str):
    """Fresh `keras.Input`s with the structure and shapes of `representation`."""
    counter = iter(range(10**6))

    def make(t):
        return keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype, name=f"{prefix}_in_{next(counter)}")

    return tree.map_structure(make, representation)
