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
