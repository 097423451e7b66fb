"""Entire Space Multi-task Model (ESMM): conversion learned over every impression.

A conversion (here: *liked*) is only observed after a click (*watched*), so a
conversion model trained on clicked examples alone learns from a
selection-biased subset and is then applied to every impression. ESMM (Ma et
al. 2018) models the two probabilities with two towers on shared inputs,

    pCTR   = P(click | x)                 (the `ctr` head)
    pCVR   = P(conversion | click, x)     (the `cvr` head)
    pCTCVR = P(click and conversion | x) = pCTR * pCVR   (the `ctcvr` head)

and trains on the entire space only: `L = BCE(click, pCTR) + BCE(click *
conversion, pCTCVR)` over every impression. pCVR has no loss of its own; it
learns through the product. `kmtl.build_model` therefore gives the `cvr` head
no loss by default (`compile(loss={cvr: ...})` can still set one), and its
metrics, fed the masked `liked_given_watched` labels, report the conversion
model on the clicked examples only.

Split of the parameters: the two towers and their logits are the encoder
(each loss reaches the CTR tower, the CTCVR loss also the CVR tower, so both
are shared in the gradient sense); the three decoders have no variables:
sigmoid, sigmoid and their product. Embeddings of tabular features
(`kmtl.inputs`) sit before the towers and are shared, as in the paper. Any
further head gets its own copy of the trunk on the shared input.

References:
    Ma, X., Zhao, L., Huang, G., Wang, Z., Hu, Z., Zhu, X. & Gai, K. (2018).
    Entire Space Multi-Task Model: An Effective Approach for Estimating
    Post-Click Conversion Rate. SIGIR.
"""

from __future__ import annotations

import keras

from kmtl import heads as heads_module
from kmtl.architectures import _common
from kmtl.architectures.base import Parts
from kmtl.registry import register


def _tower(trunk, head, name: str, x):
    """A fresh copy of the trunk, the head's own tower layers, one logit."""
    x = _common.expert(trunk, f"{name}_tower", 0, len(trunk.stages("probe")), x)
    logit = keras.layers.Dense(1, name=f"{name}_logit", dtype=heads_module.output_dtype())
    return logit(head.tower(x, prefix=f"{name}_tower"))


def _check_heads(heads, roles: dict) -> dict:
    by_name = {h.name: h for h in heads}
    if len(set(roles.values())) != 3:
        raise ValueError(f"esmm: `ctr`, `cvr` and `ctcvr` must name three different heads. Received: {roles}")
    missing = [f"{role}={name!r}" for role, name in roles.items() if name not in by_name]
    if missing:
        raise ValueError(
            f"esmm needs a binary head for each of ctr, cvr and ctcvr; no head is named "
            f"{', '.join(missing)}. Heads: {sorted(by_name)}. Received: {roles}"
        )
    for role, name in roles.items():
        if by_name[name].kind != "binary":
            raise ValueError(
                f"esmm: the {role} head {name!r} must be a kmtl.heads.Binary head (a probability). "
                f"Received: a {by_name[name].kind} head"
            )
    if by_name[roles["ctcvr"]].hidden_units:
        raise ValueError(
            f"esmm: the ctcvr head {roles['ctcvr']!r} is the product pCTR * pCVR and has no tower; give "
            f"`hidden_units` to the ctr and cvr heads. Received: hidden_units="
            f"{by_name[roles['ctcvr']].hidden_units}"
        )
    return by_name


@register("architecture", "esmm")
def build_esmm(
    inputs,
    trunk,
    heads,
    ctr: str = "watched",
    cvr: str = "liked_given_watched",
    ctcvr: str = "watched_and_liked",
) -> Parts:
    """ESMM: pCTCVR = pCTR x pCVR, trained over the entire space.

    The `ctr` and `cvr` heads get a tower each (a fresh copy of the trunk,
    then the head's `hidden_units`, then one logit); the `ctcvr` head outputs
    the product of the two probabilities. The `cvr` head is left without a
    loss by default (see the module docstring). Other heads read the input
    through their own copy of the trunk.

    Args:
        inputs: a single `keras.Input` (with `kmtl.inputs` features: their
            encoded, shared vector).
        trunk: a `kmtl.trunks.Trunk` copied into each tower.
        heads: the `kmtl.heads.Binary` heads named by `ctr`, `cvr` and
            `ctcvr`, and any others.
        ctr: the head of the click (here: watched) probability.
        cvr: the head of the conversion probability given a click (liked
            given watched).
        ctcvr: the head of the joint probability (watched and liked).

    Returns:
        A `Parts` whose `untrained` names the `cvr` head.

    Raises:
        ValueError: for a dict of inputs, a missing or non-binary head, a
            repeated role, or a `ctcvr` head with `hidden_units`.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Binary("watched"), heads.Binary("liked_given_watched"),
    ...            heads.Binary("watched_and_liked")],
    ...     trunk=trunks.dense((16,)), input_shape=(8,), architecture="esmm")
    >>> model.untrained_heads
    ('liked_given_watched',)
    """
    # === Config ===
    _common.single_input(inputs, "esmm")
    _common.check_trunk_input(trunk, inputs, "esmm")
    roles = {"ctr": ctr, "cvr": cvr, "ctcvr": ctcvr}
    by_name = _check_heads(heads, roles)
    others = [h for h in heads if h.name not in roles.values()]

    # === Layers and encoder ===
    representation = {
        "ctr_logit": _tower(trunk, by_name[ctr], "ctr", inputs),
        "cvr_logit": _tower(trunk, by_name[cvr], "cvr", inputs),
    }
    if others:
        representation["input"] = _common.branch(inputs, "input_branch")
    encoder = keras.Model(inputs, representation, name="encoder")

    # === Decoders (no variables for the three ESMM heads) ===
    decoders = {}
    probability_dtype = heads_module.output_dtype()  # float32 under mixed precision
    for role in ("ctr", "cvr", "ctcvr"):
        name = roles[role]
        rep = _common.representation_inputs(representation, name)
        probability = {
            key: keras.layers.Activation(
                "sigmoid", name=f"{name}_{key}_probability", dtype=probability_dtype
            )(rep[f"{key}_logit"])
            for key in (("ctr", "cvr") if role == "ctcvr" else (role,))
        }
        if role == "ctcvr":
            output = keras.layers.Multiply(name=f"{name}_product", dtype=probability_dtype)(
                [probability["ctr"], probability["cvr"]]
            )
        else:
            output = probability[role]
        decoders[name] = keras.Model(rep, output, name=name)
    for head in others:
        rep = _common.representation_inputs(representation, head.name)
        features = _common.expert(trunk, f"{head.name}_trunk", 0, len(trunk.stages("probe")), rep["input"])
        decoders[head.name] = keras.Model(rep, head(features), name=head.name)
    return Parts(
        encoder=encoder,
        decoders=decoders,
        supports_representation=False,
        shared_description="both towers and their logits (and the feature embeddings)",
        untrained=(cvr,),
    )
