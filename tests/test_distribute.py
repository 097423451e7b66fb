"""MirroredStrategy over two logical CPU devices (in a subprocess: the devices
must be configured before TensorFlow starts)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    r'''
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from keras import ops
    import kmtl
    from kmtl import heads, trunks

    class SumOfGradients(kmtl.weighting.Weighting):
        level = "gradient"
        gram_based = True
        def weights_from_gram(self, gram, values, present, step, state):
            return ops.cast(present, "float32"), {}

    class NormalizedSum(kmtl.weighting.Weighting):
        """Non-linear in the gradients: catches a missing all-reduce."""
        level = "gradient"
        gram_based = True
        def weights_from_gram(self, gram, values, present, step, state):
            return 1.0 / ops.sqrt(ops.diagonal(gram) + 1e-12), {}

    rng = np.random.default_rng(0)
    digit = rng.integers(0, 10, 64)
    x = rng.random((64, 8, 8, 1)).astype("float32")
    y = {"digit": digit, "parity": (digit % 2).astype("float32")}
    mask = {"digit": np.ones(64, "float32"), "parity": (np.arange(64) < 40).astype("float32")}

    def run(make_strategy, weighting, mode="parameters"):
        scope = make_strategy()
        with scope.scope():
            keras.utils.set_random_seed(3)
            model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Binary("parity")],
                                     trunk=trunks.dense((16,)), input_shape=(8, 8, 1))
            w = None if weighting is None else weighting(mode=mode) if mode else weighting()
            model.compile(optimizer=keras.optimizers.SGD(0.1), weighting=w)
        ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(32)
        history = model.fit(ds, epochs=2, verbose=0)
        return model.get_weights(), history.history

    # One strategy object each: collective keys of several MirroredStrategy
    # objects in one process collide.
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    two_devices = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = lambda: one_device
    mirrored = lambda: two_devices
    for weighting, mode in [(None, None), (kmtl.weighting.Equal, ""),
                            (SumOfGradients, "parameters"), (SumOfGradients, "representation"),
                            (NormalizedSum, "parameters"), (NormalizedSum, "representation")]:
        w1, h1 = run(single, weighting, mode)
        w2, h2 = run(mirrored, weighting, mode)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))
        name = getattr(weighting, "__name__", "static")
        print(name, mode, diff, h1["loss"][-1], h2["loss"][-1])
        assert diff < 1e-5, (name, mode, diff)
        assert abs(h1["loss"][-1] - h2["loss"][-1]) < 1e-4
    print("OK")
    '''
)


def test_mirrored_strategy_matches_single_device():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]
