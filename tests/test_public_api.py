import kmtl


def test_public_names_import():
    for name in kmtl.__all__:
        assert hasattr(kmtl, name), name
    for module in (
        kmtl.heads,
        kmtl.trunks,
        kmtl.data,
        kmtl.weighting,
        kmtl.architectures,
        kmtl.export,
        kmtl.evaluation,
        kmtl.plots,
    ):
        for name in getattr(module, "__all__", []):
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_every_registered_strategy_constructs():
    for name in kmtl.weighting.names():
        strategy = kmtl.weighting.get(name)
        assert isinstance(strategy, kmtl.weighting.Weighting)


def _sources():
    from pathlib import Path

    root = Path(kmtl.__file__).parent
    return {path.relative_to(root.parent).as_posix(): path.read_text() for path in sorted(root.rglob("*.py"))}


def test_no_private_keras_api_anywhere_in_kmtl():
    import re

    # keras.src imports, and underscore attributes of objects kmtl does not own:
    # anything reached through keras, a model/optimizer/layer/metric/loss argument.
    forbidden = [
        re.compile(r"keras\.src\b|from keras\.src|import keras\.src"),
        re.compile(r"\b(?:keras|tf|tensorflow)(?:\.\w+)*\._[a-z]\w*"),
        re.compile(
            r"\b(?:model|optimizer|layer|metric|tracker|loss|compile_loss|strategy\.extended)\._[a-z]\w*"
        ),
        re.compile(
            r"\._(?:flat_losses|compile_config|compile_loss|compile_metrics|loss_tracker|tracker|layers)\b"
        ),
    ]
    offending = []
    for path, text in _sources().items():
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(pattern.search(code) for pattern in forbidden):
                offending.append(f"{path}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)


def test_tensorflow_is_imported_only_by_the_backend_and_the_tf_products():
    # The engine's TF code lives in kmtl/backend/tensorflow; kmtl.data builds
    # tf.data pipelines, kmtl.export writes SavedModels and kmtl.distributed
    # drives tf.distribute's multi-worker training, by contract.
    import re

    allowed = ("kmtl/backend/tensorflow/", "kmtl/data/", "kmtl/export.py", "kmtl/distributed.py")
    pattern = re.compile(r"^\s*(?:import tensorflow|from tensorflow)\b", re.MULTILINE)
    offending = [p for p, text in _sources().items() if pattern.search(text) and not p.startswith(allowed)]
    assert not offending, offending


def test_every_registered_class_is_registered_with_keras_on_import():
    import keras

    for kind in kmtl.registry.KINDS:
        for name, obj in kmtl.registry.entries(kind).items():
            if isinstance(obj, type):
                assert keras.saving.get_registered_object(f"kmtl>{obj.__name__}") is obj, (kind, name)
