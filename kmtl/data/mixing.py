"""Mixing single-task datasets into one masked multi-task training stream.

`mix({task: dataset})` takes *unbatched* datasets, each yielding
`(x, {task: y})` for its own task (for example MNIST digits and
Fashion-MNIST items), and returns batches `(x, {task: y}, {task: mask})` in
which every task key is present: `mask[task]` is 1.0 for the examples that
come from that task's dataset and 0.0 elsewhere, and `y[task]` holds a dummy
0 where masked. Keras uses the mask dict as the per-output `sample_weight`;
with `reduction="mean_with_sample_weight"` on each task's loss, a task's loss
is the mean over its own examples only, so it is not shrunk by its share of
the batch (and a batch without the task contributes zero loss).

Samplers (the task of each example, or of each batch for `round_robin`):

- `"uniform"`: each task with probability 1/K.
- `"proportional"`: `p_t ∝ n_t ** (1 / temperature)` with `n_t` the size of
  task t's dataset; `temperature=1` is proportional to size, larger values
  move towards uniform (Arivazhagan et al., 2019).
- `"annealed"`: the exponent anneals linearly over `num_epochs` epochs,
  `alpha_e = 1 - (1 - 1 / temperature) * e / (num_epochs - 1)` for epochs
  `e = 0 .. num_epochs - 1` and `p_t ∝ n_t ** alpha_e`: epoch 0 samples in
  proportion to size and the last epoch with temperature `temperature`
  (default 5, giving Stickland & Murray's final exponent 0.2).
- `"round_robin"`: whole batches alternate between tasks in the dict's order
  (batch j is drawn from task j mod K only), so each step trains one task,
  as in MT-DNN's task-per-batch training but cycling instead of sampling.

Epoch length: `epoch_length` examples per epoch (rounded up to whole batches
for `annealed` and `round_robin`); by default the total size of all the
datasets, so with proportional sampling at temperature 1 an epoch visits
each example once in expectation. Each task's dataset is repeated as needed,
so small tasks recycle their examples; shuffle them (as `mnist_tasks` does for
the train split) so that each pass sees a new order.

References:
    Stickland, A. C. and Murray, I. "BERT and PALs: Projected Attention
    Layers for Efficient Adaptation in Multi-Task Learning." ICML 2019.
    Liu, X., He, P., Chen, W. and Gao, J. "Multi-Task Deep Neural Networks
    for Natural Language Understanding." ACL 2019.
    Arivazhagan, N. et al. "Massively Multilingual Neural Machine
    Translation in the Wild: Findings and Challenges." arXiv:1907.05019.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import numpy as np
import tensorflow as tf

SAMPLERS = ("uniform", "proportional", "annealed", "round_robin")
_DEFAULT_TEMPERATURE = {"proportional": 1.0, "annealed": 5.0}
# Examples per block when converting a task's examples to the mixed structure.
_BLOCK = 64
# tf.data's counts and seeds are int64.
_INT64_LIMIT = 2**63


def _spec_text(spec) -> str:
    return str(tf.nest.map_structure(lambda s: (tuple(s.shape), s.dtype.name), spec))


def _check_dataset(task, dataset):
    """Returns `(x_spec, y_spec)` of one task's dataset, or raises."""
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"mix() expects a tf.data.Dataset for task {task!r}. Received: {type(dataset).__name__}"
        )
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict)):
        raise ValueError(
            f"The dataset of task {task!r} must yield `(x, {{{task!r}: y}})` pairs. "
            f"Received: element_spec={_spec_text(spec)}"
        )
    x_spec, labels = spec
    if list(labels) != [task]:
        raise ValueError(
            f"The dataset registered under task {task!r} must yield labels keyed by "
            f"that task only, i.e. {{{task!r}: y}}. Received: label keys {sorted(labels)}"
        )
    for leaf in tf.nest.flatten((x_spec, labels[task])):
        if any(dim is None for dim in leaf.shape):
            raise ValueError(
                f"mix() takes unbatched datasets with fully known element shapes, but "
                f"task {task!r} yields a shape with an unknown dimension (is it "
                "already batched? build it with `batch_size=None`). "
                f"Received: element_spec={_spec_text(spec)}"
            )
    return x_spec, labels[task]


def _check_sizes(sizes, tasks) -> dict[str, int] | None:
    """Returns `sizes` as `{task: int}` after checking its keys and values, or raises."""
    if sizes is None:
        return None
    if not isinstance(sizes, Mapping):
        raise ValueError(f"`sizes` must be a dict `{{task: number of examples}}`. Received: sizes={sizes!r}")
    unknown = [task for task in sizes if task not in tasks]
    if unknown:
        raise ValueError(
            f"`sizes` may only name tasks of `datasets` ({tasks}). Received: unknown task(s) {unknown} "
            f"in sizes={dict(sizes)!r}"
        )
    checked = {}
    for task, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(
                f"`sizes[{task!r}]` must be a positive integer, the number of examples of task "
                f"{task!r}. Received: sizes[{task!r}]={size!r}"
            )
        checked[task] = int(size)
    return checked


def _dataset_size(task, dataset, sizes) -> int:
    if sizes is not None and task in sizes:
        return sizes[task]
    count = int(dataset.cardinality())
    if count < 0:
        raise ValueError(
            f"The size of task {task!r}'s dataset is unknown or infinite; pass it as "
            f"`sizes={{{task!r}: n}}`. Received: cardinality={count}"
        )
    if count == 0:
        raise ValueError(f"The dataset of task {task!r} is empty. Received: cardinality=0")
    return count


def _probabilities(sizes, exponent) -> np.ndarray:
    # In log space: `n ** exponent` overflows to inf (and the ratio to NaN) for a large exponent.
    logits = exponent * np.log(np.asarray(sizes, np.float64))
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def annealed_probabilities(sizes, num_epochs: int, temperature: float = 5.0) -> np.ndarray:
    """Per-epoch task probabilities of the `annealed` sampler.

    Args:
        sizes: dataset size of each task.
        num_epochs: number of epochs of the schedule.
        temperature: temperature of the last epoch (the first has 1).

    Returns:
        float64 `[num_epochs, K]`, each row summing to 1.

    Example:

    >>> annealed_probabilities([100, 25], num_epochs=2, temperature=2.0).round(2)
    array([[0.8 , 0.2 ],
           [0.67, 0.33]])
    """
    rows = []
    for epoch in range(num_epochs):
        fraction = epoch / (num_epochs - 1) if num_epochs > 1 else 0.0
        rows.append(_probabilities(sizes, 1.0 - (1.0 - 1.0 / temperature) * fraction))
    return np.stack(rows)


def _positive_int(value, argument, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{argument}` must be a positive integer. Received: {argument}={value!r}")
    return int(value)


def mix(
    datasets: Mapping[str, tf.data.Dataset],
    sampler: str = "uniform",
    batch_size: int = 256,
    seed: int = 0,
    temperature: float | None = None,
    epoch_length: int | None = None,
    num_epochs: int | None = None,
    routed: bool = False,
    sizes: Mapping[str, int] | None = None,
) -> tf.data.Dataset:
    """Mixes unbatched single-task datasets into masked multi-task batches.

    See the module docstring for the samplers, the epoch length and why the
    masks pair with `reduction="mean_with_sample_weight"`.

    Args:
        datasets: `{task: dataset}`; each dataset is unbatched and yields
            `(x, {task: y})` with the key it is registered under.
        sampler: `"uniform"`, `"proportional"`, `"annealed"` or `"round_robin"`.
        batch_size: examples per batch.
        seed: seed of the task choices (the per-task datasets keep their own
            shuffling seeds). Each new pass over the result draws new choices,
            deterministically from `seed`.
        temperature: for `proportional`, `p_t ∝ n_t ** (1 / temperature)`
            (default 1); for `annealed`, the temperature of the last epoch
            (default 5). Not used by the other samplers.
        epoch_length: examples per epoch. Default: the sum of the dataset sizes.
        num_epochs: number of epochs of the `annealed` schedule (required for
            it, not used otherwise). The result then holds all
            `num_epochs` epochs; train it with
            `fit(ds, epochs=num_epochs, steps_per_epoch=ceil(epoch_length / batch_size))`.
        routed: when `True`, `x` is a dict `{task: input}` holding each
            example's input under its own task and zeros under the others
            (for task-routed models whose inputs are keyed by task name);
            needed when the tasks' inputs differ in shape or dtype.
        sizes: `{task: number of examples}` (positive integers, keys among
            the tasks of `datasets`) for datasets whose cardinality is
            unknown (needed by the default epoch length and the size-based
            samplers); a size given here is used instead of the cardinality.

    Returns:
        A `tf.data.Dataset` of `(x, {task: y}, {task: mask})` batches, masks
        float32 `[batch]`.

    Raises:
        ValueError: an empty dict, a dataset whose label key is not its task,
            a batched dataset, an unknown sampler, inputs that differ while
            `routed=False`, a bad numeric argument, or `sizes` that is not a
            dict, names an unknown task or holds a value that is not a
            positive integer (0, negative, NaN, a float, a bool), a `seed`
            outside [0, 2**63), or more examples than tf.data can count.
        TypeError: a value that is not a `tf.data.Dataset`.

    Example:

    >>> stream = kmtl.data.mix(
    ...     {"digit": kmtl.data.mnist_tasks(["digit"], batch_size=None),
    ...      "item": kmtl.data.fashion_tasks(["item"], batch_size=None)},
    ...     sampler="uniform", batch_size=128)
    >>> x, y, mask = next(iter(stream))
    >>> sorted(y) == sorted(mask) == ["digit", "item"]
    True

    References:
        Stickland, A. C. and Murray, I. "BERT and PALs." ICML 2019 (annealed
        sampling).
        Liu, X. et al. "Multi-Task Deep Neural Networks for Natural Language
        Understanding." ACL 2019 (task-per-batch training).
    """
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError(f"mix() needs a non-empty dict `{{task: dataset}}`. Received: datasets={datasets!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler. Expected one of {list(SAMPLERS)}. Received: sampler={sampler!r}")
    for task in datasets:
        if not isinstance(task, str) or not task.isidentifier():
            raise ValueError(f"Task names must be valid identifiers. Received: task={task!r}")
    batch_size = _positive_int(batch_size, "batch_size")
    epoch_length = _positive_int(epoch_length, "epoch_length", allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _INT64_LIMIT:
        raise ValueError(f"`seed` must be an integer in [0, 2**63). Received: seed={seed!r}")
    if temperature is None:
        temperature = _DEFAULT_TEMPERATURE.get(sampler, 1.0)
    if not (
        isinstance(temperature, numbers.Real)
        and not isinstance(temperature, bool)
        and math.isfinite(temperature)
        and temperature > 0
    ):
        raise ValueError(
            f"`temperature` must be a positive finite number. Received: temperature={temperature!r}"
        )
    if sampler == "annealed":
        num_epochs = _positive_int(num_epochs, "num_epochs")
    tasks = list(datasets)
    sizes = _check_sizes(sizes, tasks)
    specs = {task: _check_dataset(task, datasets[task]) for task in tasks}
    if not routed:
        first = tasks[0]
        for task in tasks[1:]:
            if specs[task][0] != specs[first][0]:
                raise ValueError(
                    f"Tasks {first!r} and {task!r} have different inputs "
                    f"({_spec_text(specs[first][0])} vs {_spec_text(specs[task][0])}); "
                    "one input tensor cannot hold both. Pass `routed=True` to key the "
                    f"inputs by task. Received: routed={routed!r}"
                )
    needs_sizes = epoch_length is None or sampler in ("proportional", "annealed")
    counts = [_dataset_size(t, datasets[t], sizes) for t in tasks] if needs_sizes else None
    if epoch_length is None:
        epoch_length = int(sum(counts))
    batches = -(-epoch_length // batch_size) * (num_epochs if sampler == "annealed" else 1)
    if max(epoch_length, batches * batch_size) >= _INT64_LIMIT:  # tf.data counts in int64
        raise ValueError(
            f"The mixed stream would hold {batches} batches of {batch_size} examples, more than tf.data "
            f"can count (2**63). Received: epoch_length={epoch_length}, batch_size={batch_size}, "
            f"num_epochs={num_epochs}"
        )

    def to_multitask(task):
        # Converts a block of examples of `task` to the common structure; done
        # per block (not per example) because a tf.data function call per
        # example would dominate the cost of the stream.
        def zeros(spec, count):
            return tf.nest.map_structure(
                lambda s: tf.zeros(
                    tf.concat([[count], tf.constant(s.shape.as_list(), tf.int32)], 0), s.dtype
                ),
                spec,
            )

        def convert(x, labels):
            count = tf.shape(labels[task])[0]
            if routed:
                x = {t: x if t == task else zeros(specs[t][0], count) for t in tasks}
            y = {t: labels[t] if t == task else zeros(specs[t][1], count) for t in tasks}
            mask = {t: tf.fill([count], 1.0 if t == task else 0.0) for t in tasks}
            return x, y, mask

        return convert

    def blocks(task, size):
        stream = datasets[task].repeat().batch(size, drop_remainder=True)
        return stream.map(to_multitask(task), num_parallel_calls=tf.data.AUTOTUNE)

    steps = -(-epoch_length // batch_size)
    if sampler == "round_robin":
        batched = [blocks(t, batch_size) for t in tasks]
        choice = tf.data.Dataset.range(len(tasks)).repeat().take(steps)
        mixed = tf.data.Dataset.choose_from_datasets(batched, choice)
        return mixed.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(tf.data.AUTOTUNE)

    if sampler == "uniform":
        table = np.full((1, len(tasks)), 1.0 / len(tasks))
    elif sampler == "proportional":
        table = _probabilities(counts, 1.0 / temperature)[None, :]
    else:
        table = annealed_probabilities(counts, num_epochs, temperature)
    with np.errstate(divide="ignore"):  # a probability that underflowed to 0: logit -inf, never drawn
        logits = tf.constant(np.log(table), tf.float32)
    passes = len(table)

    def choices(pass_seed):
        # The task of every example, drawn one batch at a time; `pass_seed`
        # changes with each pass over the dataset, deterministically from `seed`.
        def draw(step):
            row = tf.gather(logits, tf.minimum(step // steps, passes - 1))[None, :]
            seeds = tf.stack([pass_seed, step])
            return tf.random.stateless_categorical(row, batch_size, seeds, dtype=tf.int64)[0]

        return tf.data.Dataset.range(passes * steps).map(draw).unbatch()

    choice = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1).flat_map(choices)
    if sampler != "annealed":
        choice = choice.take(epoch_length)
    streams = [blocks(t, _BLOCK).unbatch() for t in tasks]
    mixed = tf.data.Dataset.choose_from_datasets(streams, choice).batch(batch_size)
    mixed = mixed.apply(tf.data.experimental.assert_cardinality(passes * steps))
    return mixed.prefetch(tf.data.AUTOTUNE)
