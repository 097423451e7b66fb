"""MirroredStrategy over two logical CPU devices (in a subprocess: the devices
must be configured before TensorFlow starts).

Every fit runs under a new MirroredStrategy object, in one process, as a
notebook user would: kmtl's own sums over replicas use no collective keys, so
fits with different strategies no longer collide (TensorFlow numbers every new
strategy's collectives from the same start). A strategy with trainable
variables changes the size of Keras's own gradient all-reduce: it runs under
the documented workaround, `cross_device_ops=ReductionToOneDevice()`, in
tests/test_distribute_every.py, which runs every strategy on every
architecture; this file covers the engine's paths (parameters, Gram,
representation, `update_every`) under the default cross-device ops.
"""

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

    def run(make_strategy, make_weighting):
        scope = make_strategy()
        with scope.scope():
            keras.utils.set_random_seed(3)
            model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Binary("parity")],
                                     trunk=trunks.dense((16,)), input_shape=(8, 8, 1))
            model.compile(optimizer=keras.optimizers.SGD(0.1), weighting=make_weighting())
        ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(32)
        history = model.fit(ds, epochs=2, verbose=0, validation_data=ds)
        return model.get_weights(), history.history

    single = lambda: tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored = lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # a new one every fit
    cases = [
        ("static", lambda: None, mirrored),
        ("normalized-parameters", lambda: NormalizedSum(mode="parameters"), mirrored),
        ("normalized-gram", lambda: NormalizedSum(engine="gram"), mirrored),
        ("normalized-representation", lambda: NormalizedSum(mode="representation"), mirrored),
        ("mgda-representation", lambda: kmtl.weighting.MGDA(mode="representation"), mirrored),
        ("graddrop-parameters", lambda: kmtl.weighting.GradDrop(seed=1, mode="parameters"), mirrored),
        ("normalized-update-every", lambda: NormalizedSum(update_every=2), mirrored),
    ]
    for name, make_weighting, distributed in cases:
        w1, h1 = run(single, make_weighting)
        w2, h2 = run(distributed, make_weighting)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(w1, w2))
        print(name, diff, h1["loss"][-1], h2["loss"][-1], h1["val_loss"][-1], h2["val_loss"][-1], flush=True)
        assert diff < 1e-5, (name, diff)
        for key in ("loss", "digit_loss", "parity_loss", "val_loss", "val_parity_loss", "val_parity_accuracy"):
            assert abs(h1[key][-1] - h2[key][-1]) < 1e-4, (name, key, h1[key][-1], h2[key][-1])
    print("OK")
    '''
)


def test_mirrored_strategy_matches_single_device():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]
