"""What a training step costs the host under MultiWorkerMirroredStrategy, with the input path as it was and as it
is, in one run: two worker processes on loopback (as two nodes' training workers), artnet's own step
(`trainer.make_train_step`) on the tiny backbone (small steps, where the host's share is largest).

Sides (each trains the same batches, in-memory generator -> tf.data -> `distribute_datasets_from_function`):
- `before`: float32 images to the device and TensorFlow's partial-batch handling on (an all-reduce of "has a
  batch" across workers before every step), no tf.data prefetch: the input path before it changed;
- `after`: uint8 images, partial-batch handling off, two batches prefetched (`artnet.train.passes.distributed`).
Reported per side: images/s (median of `--rounds`, sides alternating), the host-to-device bytes per image and the
cross-worker collectives each step runs besides the gradients' all-reduce (0 or 1).

    python bench/input_path.py [--steps 200] [--rounds 3] [--size 64]
Writes bench/results/input_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "input_path.json"
BATCH = 16


def worker(task: int, ports: list[str], side: str, steps: int, size: int) -> None:
    """One worker process: trains `steps` steps on its side's input path, prints images/s as JSON."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": task}})
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from artnet.config import ModelConfig
    from artnet.model import backbones, classifier
    from artnet.train import trainer
    from artnet.train.passes import Passes, distributed

    spec = backbones.get("tiny")
    with strategy.scope():
        model = classifier.build_classifier(spec, ModelConfig(backbone="tiny", weights="none"), 8, size)
        classifier.set_trainable_blocks(model, spec, 2)
        optimizer = trainer.make_optimizer(strategy, model, "float32", 1e-3)
    step = trainer.make_train_step(strategy, model, optimizer, BATCH * strategy.num_replicas_in_sync)
    rng = np.random.default_rng(task)
    batch = {"image": rng.integers(0, 256, (BATCH, size, size, 3)).astype(np.uint8),
             "label": rng.integers(0, 8, BATCH).astype(np.int32)}
    passes = Passes(lambda: (batch for _ in range(steps + 10)))
    if side == "after":
        data = distributed(strategy, passes, size)
    else:
        def before(_):
            def generator():
                for b in passes.batches():
                    yield b["image"].astype(np.float32), b["label"]

            return tf.data.Dataset.from_generator(generator, output_signature=(
                tf.TensorSpec((None, size, size, 3), tf.float32), tf.TensorSpec((None,), tf.int32)))

        data = strategy.distribute_datasets_from_function(before)
    iterator = iter(data)
    for _ in range(10):  # trace, warm up
        loss, _ = step(*next(iterator))
    float(loss)
    start = time.perf_counter()
    total = 0.0
    for _ in range(steps):
        loss, _ = step(*next(iterator))
        total = total + loss
    float(total)
    elapsed = time.perf_counter() - start
    print(json.dumps({"images_per_s": steps * BATCH * 2 / elapsed,
                      "checks_each_step": bool(iterator._enable_get_next_as_optional)}), flush=True)


def free_ports(count: int) -> list[str]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_side(side: str, steps: int, size: int) -> dict:
    ports = free_ports(2)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(task), *ports, side, str(steps), str(size)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
             for task in range(2)]
    outs = [json.loads(p.communicate(timeout=900)[0].strip().splitlines()[-1]) for p in procs]
    return {"images_per_s": min(o["images_per_s"] for o in outs), "checks_each_step": outs[0]["checks_each_step"]}


def main() -> None:
    import numpy as np

    if sys.argv[1:2] == ["--worker"]:
        task, p0, p1, side, steps, size = sys.argv[2:8]
        worker(int(task), [p0, p1], side, int(steps), int(size))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rounds = []
    for r in range(args.rounds):
        sides = {side: run_side(side, args.steps, args.size) for side in (("before", "after") if r % 2 == 0
                                                                           else ("after", "before"))}
        rounds.append(sides)
        print(f"round {r + 1}: before {sides['before']['images_per_s']:.0f} img/s, "
              f"after {sides['after']['images_per_s']:.0f} img/s", flush=True)
    ratios = [r["after"]["images_per_s"] / r["before"]["images_per_s"] for r in rounds]
    result = {
        "command": "python " + " ".join(["bench/input_path.py", *sys.argv[1:]]), "steps": args.steps,
        "image_size": args.size, "batch_per_worker": BATCH, "rounds": rounds,
        "host_bytes_per_image": {"before": 4 * 3 * args.size ** 2, "after": 3 * args.size ** 2},
        "cross_worker_checks_per_step": {side: int(rounds[0][side]["checks_each_step"]) for side in ("before", "after")},
        "after_over_before": {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("host_bytes_per_image", "cross_worker_checks_per_step",
                                             "after_over_before")}))


if __name__ == "__main__":
    main()
