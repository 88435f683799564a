"""Float16 loss scaling across workers: two real processes form a MultiWorkerMirroredStrategy on loopback (CPU)
and train through artnet's own optimizer and step (tests/helpers/fp16_agreement.py). When one worker's gradients
are not finite, every worker must skip the step and halve its loss scale together; without the agreement the
workers disagree (in practice: they hang in different collectives)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

HELPER = REPO / "tests" / "helpers" / "fp16_agreement.py"


def free_ports(count: int) -> list[str]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:  # all held open together: distinct ports
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_pair(directory, *extra: str, step_timeout: float, timeout: float) -> list[dict]:
    """Both workers; per worker: its JSON records by step, `hung` (the step its watchdog gave up on), exit code
    (None when the test's own timeout killed it) and the tail of its log."""
    ports = free_ports(2)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
           "FP16_AGREEMENT_STEP_TIMEOUT": str(step_timeout)}
    procs = []
    for task in range(2):  # output to files: a full pipe must not stall one worker while the other waits on it
        out, err = open(directory / f"w{task}.out", "w"), open(directory / f"w{task}.err", "w")
        procs.append(subprocess.Popen([sys.executable, str(HELPER), str(task), *ports, *extra], stdout=out,
                                      stderr=err, cwd=REPO, env=env))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    workers = []
    for task, code in enumerate(codes):
        records = [json.loads(line) for line in (directory / f"w{task}.out").read_text().splitlines()
                   if line.startswith("{")]
        workers.append({"steps": {r["step"]: r for r in records if "step" in r},
                        "hung": next((r["hung"] for r in records if "hung" in r), None), "code": code,
                        "log": (directory / f"w{task}.err").read_text()[-3000:]})
    return workers


def state(worker: dict, step: int) -> tuple:
    record = worker["steps"][step]
    return record["sha"], record["scale"]


@pytest.fixture(scope="module")
def agreed(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("agreed"), step_timeout=90, timeout=180)


def test_one_workers_nonfinite_gradients_make_every_worker_skip(agreed):
    w0, w1 = agreed
    for w in agreed:
        assert w["code"] == 0 and w["hung"] is None, w["log"]
    assert w0["steps"][0]["replicas"] == 2
    for step in range(4):  # both workers hold the same weights and loss scale after every step
        assert state(w0, step) == state(w1, step), step
    sha, scale = zip(*(state(w0, step) for step in range(4)))
    assert sha[1] != sha[0] and scale[1] == scale[0] == 2.0 ** 15  # step 1: applied everywhere
    assert sha[2] == sha[1] and scale[2] == scale[1] / 2  # step 2: worker 1's inf skips it everywhere
    assert sha[3] != sha[2] and scale[3] == scale[2]  # step 3: applied everywhere again


def test_without_the_agreement_workers_disagree(agreed, tmp_path):
    w0, w1 = run_pair(tmp_path, "off", step_timeout=20, timeout=120)
    # Step 1 (finite everywhere) ran as with the agreement, to the bit: the agreement leaves finite gradients be.
    assert state(w0, 1) == state(w1, 1) == state(agreed[0], 1), w0["log"] + w1["log"]
    disagreed = (any(w["hung"] or w["code"] != 0 for w in (w0, w1))
                 or any(step not in w0["steps"] or step not in w1["steps"] or state(w0, step) != state(w1, step)
                        for step in (2, 3)))
    assert disagreed, (w0["steps"], w1["steps"])
