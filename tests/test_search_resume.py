"""An interrupted `artnet tune` resumes: killed part-way through a painter count's search, the same command
restores the Tune experiment and finishes it without running completed trials again. Runs the CLI in its own
process (and its own local Ray), so it belongs to the separate `cluster` pytest process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artnet.data import demo_data

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ARTNET = Path(sys.executable).parent / "artnet"
EPOCHS, SAMPLES = 6, 6


def trial_lines(experiment: Path) -> dict[str, int]:
    """Trial directory -> number of epochs it reported."""
    return {p.parent.name: len(p.read_text().splitlines()) for p in experiment.glob("*/result.json")}


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    demo_data.write_demo_set(str(tmp_path / "data"), painters=3, per_painter=12, size=48)
    subprocess.run([str(ARTNET), "catalog", "data", "--out", "catalog", "--split", "0.6,0.2,0.2"], cwd=tmp_path,
                   check=True, capture_output=True)
    command = [str(ARTNET), "tune", "catalog", "--preset", "demo", "--image-size", "32", "--name", "sw",
               "--samples", str(SAMPLES), "--search-epochs", str(EPOCHS), "--views", "0", "--no-finetune",
               "--set", "train.patience=0", "--set", "search.max_concurrent=1", "--set", "search.grace_epochs=6",
               "--space", "model.dropout=uniform:0.0,0.5"]
    experiment = tmp_path / "work" / "ray_results" / "sw-3painters"
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [n for n, lines in trial_lines(experiment).items() if lines == EPOCHS]
        if len(done) >= 2 or first.poll() is not None:
            break
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    at_kill = trial_lines(experiment)
    finished = {n for n, lines in at_kill.items() if lines == EPOCHS}
    assert len(finished) >= 2 and len(at_kill) < SAMPLES + 1, at_kill

    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = trial_lines(experiment)
    assert len(after) == SAMPLES and all(lines == EPOCHS for lines in after.values())
    assert all(after[n] == at_kill[n] for n in finished), "finished trials were not run again"
    summary = json.loads((tmp_path / "work" / "ray_results" / "sw" / "summary.json").read_text())
    assert summary[0]["painters"] == 3 and summary[0]["trials"] == SAMPLES
