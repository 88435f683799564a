"""The training shard's passes (one per epoch, started ahead) and which epoch the loop trains next."""

import threading

import pytest

from artnet.train.passes import Passes
from artnet.train.trainer import TrainState, next_epoch


class Shard:
    """Stands in for a Ray dataset shard: each pass is a new iterator over `batches` numbered batches, and it
    records which thread opened it and how many batches had been read before the epoch asked."""

    def __init__(self, batches: int = 3):
        self.batches, self.opened, self.read = batches, [], []
        self.fail = False

    def open_pass(self):
        number = len(self.opened)
        self.opened.append(threading.current_thread().name)
        self.read.append(0)

        def batches():
            if self.fail:
                raise RuntimeError("the data budget is spent")
            for i in range(self.batches):
                self.read[number] += 1
                yield {"pass": number, "batch": i}

        return batches()


def test_each_call_reads_one_whole_pass_in_order():
    shard = Shard()
    passes = Passes(shard.open_pass)
    for number in range(3):
        assert list(passes.batches()) == [{"pass": number, "batch": i} for i in range(3)]
    assert len(shard.opened) == 3


def test_a_pass_started_ahead_is_opened_and_its_first_batch_read_before_the_epoch_asks():
    shard = Shard()
    passes = Passes(shard.open_pass)
    passes.start_next()
    passes.start_next()  # once: a second call must not open another pass
    passes.ahead[0].join()
    assert shard.opened == ["artnet-next-pass"] and shard.read == [1]
    assert [b["batch"] for b in passes.batches()] == [0, 1, 2]  # the batch read ahead is not lost
    assert len(shard.opened) == 1, "no pass is opened that nobody asked for"
    assert [b["pass"] for b in passes.batches()] == [1, 1, 1]  # the next one opened when the epoch asks


def test_an_empty_pass_started_ahead_yields_nothing():
    passes = Passes(Shard(batches=0).open_pass)
    passes.start_next()
    assert list(passes.batches()) == []


def test_an_error_while_starting_ahead_is_raised_where_the_epoch_reads():
    shard = Shard()
    shard.fail = True
    passes = Passes(shard.open_pass)
    passes.start_next()
    passes.ahead[0].join()  # the helper thread ended without raising
    with pytest.raises(RuntimeError, match="budget"):
        list(passes.batches())


@pytest.mark.parametrize("epoch,stopped_phase,expected", [
    (0, 0, 0),  # a fresh start
    (2, 0, 2),  # the middle of phase 1
    (1, 1, 3),  # phase 1 stopped early: its remaining epochs are skipped
    (3, 1, 3),  # ... and phase 2 trains
    (4, 2, 5),  # phase 2 stopped early: nothing left
    (5, 0, 5),  # all done
])
def test_next_epoch_skips_what_early_stopping_ended(epoch, stopped_phase, expected):
    assert next_epoch(TrainState(epoch=epoch, stopped_phase=stopped_phase), head_epochs=3, total_epochs=5) == expected


def test_passes_started_ahead_on_two_splits_read_every_row_once_a_pass(ray_local):
    """Two training workers' shards of one Ray dataset (`streaming_split`, as Ray Train deals them), each pass
    started ahead as the worker loop does: every pass yields every row exactly once across the two, and the next
    pass's rows are a new epoch of the same dataset."""
    import ray

    shards = ray.data.range(64, override_num_blocks=8).streaming_split(2, equal=True)
    seen = [[], []]

    def worker(rank: int) -> None:
        passes = Passes(lambda: shards[rank].iter_batches(batch_size=4, batch_format="numpy", drop_last=True))
        passes.start_next()
        for _ in range(3):
            ids = [int(i) for batch in passes.batches() for i in batch["id"]]
            seen[rank].append(ids)
            if len(seen[rank]) < 3:
                passes.start_next()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for number in range(3):
        first, second = seen[0][number], seen[1][number]
        assert len(first) == len(second) == 32 and sorted(first + second) == list(range(64)), number


def test_the_device_gets_uint8_batches_and_no_cross_worker_check_before_each_step():
    """Under MultiWorkerMirroredStrategy TensorFlow all-reduces "has a batch" before every step unless told that
    every worker runs the same steps (Ray's equal split): artnet's dataset says so, a plain one (the control)
    does not; images reach the replicas as uint8, a quarter of float32's bytes."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "input_path.py")], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"checks_each_step_ours": False, "checks_each_step_plain": True, "device_dtype": ["uint8"]}
