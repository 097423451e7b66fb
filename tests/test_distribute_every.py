"""Every strategy and every architecture under `MirroredStrategy` (two logical
CPUs, one subprocess): a distributed fit equals the single-device fit on the
same global batches, weights and logged losses, masked labels included.

The strategies are paired with the architectures round robin (as in
tests/test_saved_models.py), so every architecture trains under several
strategies of both families, all in one process. Strategies and models of
different sizes follow each other, so every fit runs under a new strategy
created with `cross_device_ops=tf.distribute.ReductionToOneDevice()`, the
workaround the README documents for TensorFlow's collective-key collision
(see `kmtl.backend.tensorflow.distribute`); tests/test_distribute.py covers
the default cross-device ops.
"""

import json
import subprocess
import sys
import textwrap

from test_saved_models import COMMON, PAIRS

SCRIPT = (
    textwrap.dedent(
        r"""
    import sys, json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    """
    )
    + COMMON
    + textwrap.dedent(
        r"""
    def run(make_scope, strategy, architecture):
        x, y = data(architecture, n=32)
        mask = {k: np.ones(32, "float32") for k in y}
        masked = SECOND.get(architecture, "parity")
        mask[masked] = (np.arange(32) % 4 != 0).astype("float32")  # a quarter of its labels missing
        with make_scope().scope():
            keras.utils.set_random_seed(3)
            model, weighting = model_and_weighting(strategy, architecture)
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss_weights={masked: 0.5}, weighting=weighting)
        ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(16)
        history = model.fit(ds, epochs=2, verbose=0)
        return model.get_weights(), history.history, masked

    single = lambda: tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored = lambda: tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    for strategy, architecture in json.loads(sys.argv[1]):
        w1, h1, masked = run(single, strategy, architecture)
        w2, h2, _ = run(mirrored, strategy, architecture)
        scale = max(float(np.abs(a).max()) for a in w1)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))
        name = f"{strategy}-{architecture}"
        print(name, diff / scale, flush=True)
        assert diff <= 1e-5 * max(scale, 1.0), (name, diff, scale)
        for key in ("loss", f"{masked}_loss"):
            assert abs(h1[key][-1] - h2[key][-1]) <= 1e-4 * max(1.0, abs(h1[key][-1])), (name, key, h1[key], h2[key])
        assert h1["loss"][-1] < h1["loss"][0] or strategy in ("rlw",), (name, h1["loss"])
    print("OK")
    """
    )
)


def test_every_strategy_and_architecture_matches_single_device_under_mirrored():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(PAIRS)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]
