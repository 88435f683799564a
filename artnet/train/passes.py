"""The training shard as tf.data, one Ray Data pass per epoch, each pass started ahead of time where it can be
(the test share too, while the last epoch's checkpoint is saved).

A pass's first batch waits for its first decode task (and, in the first epoch, for decode worker processes to
start). Started only when the epoch asks for it, that wait is on the training loop's critical path while a core
idles; started ahead (the first while the worker builds its model, each next one while the last epoch's
checkpoint is saved), it overlaps work the worker does anyway. A pass is started ahead only once it is certain
to be read: a started pass that nobody reads would keep its decode tasks busy for nothing.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator


class Passes:
    """Hands out the batches of one pass per call to `batches()`, in order; `start_next()` opens the next pass
    and reads its first batch on a helper thread so that it is there when the epoch begins."""

    def __init__(self, open_pass: Callable[[], Iterable[dict]]):
        self.open_pass = open_pass
        self.ahead: tuple[threading.Thread, dict] | None = None

    def start_next(self) -> None:
        if self.ahead is not None:
            return
        started: dict = {}

        def first_batch():
            try:
                started["batches"] = iter(self.open_pass())
                started["first"] = next(started["batches"], None)
            except BaseException as e:  # raised where the epoch reads it, as if read there
                started["error"] = e

        thread = threading.Thread(target=first_batch, name="artnet-next-pass", daemon=True)
        thread.start()
        self.ahead = (thread, started)

    def batches(self) -> Iterator[dict]:
        self.start_next()  # not started ahead: open it now
        thread, started = self.ahead
        self.ahead = None
        thread.join()
        if "error" in started:
            raise started["error"]
        if started["first"] is not None:
            yield started["first"]
            yield from started["batches"]


def distributed(strategy, passes: Passes, size: int):
    """The passes as the strategy's per-worker dataset. Ray Train's split gives every worker the same number of
    rows each pass (`equal=True`) in whole batches, so every worker runs the same steps: TensorFlow's
    partial-batch handling, which all-reduces "has a batch" across workers before every step (the host then
    cannot run ahead of the device, and one slow worker stalls all), is turned off."""
    strategy.extended.experimental_enable_get_next_as_optional = False
    return strategy.distribute_datasets_from_function(lambda _: tf_dataset(passes, size))


def tf_dataset(passes: Passes, size: int):
    """(uint8 images, int32 labels) batches of `passes`, one pass per iterator (epoch). Images stay uint8 to the
    device, a quarter of float32's bytes (the model casts them); two batches are kept ahead of the step. Ray
    already sharded them: tf.data's auto-sharding is off."""
    import tensorflow as tf

    def generator():
        for batch in passes.batches():
            yield batch["image"], batch["label"]

    ds = tf.data.Dataset.from_generator(generator, output_signature=(
        tf.TensorSpec((None, size, size, 3), tf.uint8), tf.TensorSpec((None,), tf.int32)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.prefetch(2).with_options(options)
