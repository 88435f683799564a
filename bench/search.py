"""Search benchmarks on the real paintings in ../shared/data/paintings with the offline MobileNetV2 weights.
Not tests: they take minutes on CPUs.

    python bench/search.py cost     # a head-only trial on cached features vs a trial that runs the frozen
                                    # backbone every epoch (artnet train, phase 1 only), same head and epochs
    python bench/search.py sweep    # artnet tune over 3,5,10,27,47 painters (head search on cached features)

Write bench/results/search_cost.json, and search_sweep<tag>.json + .md + .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from artnet import console, presets
from artnet.cli import parse_assignments, run_catalog
from artnet.config import CatalogConfig, override
from artnet.data import catalog
from artnet.search import embeddings, space, tune
from artnet.search.heads import fit_head
from artnet.train import trainer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARTNET_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"


def base_job(cat_dir: str, workdir: Path, name: str, sets: list[str]):
    return override(presets.preset("mobilenet"), {
        "catalog": cat_dir, "workdir": str(workdir), "name": name, "model.weights": str(WEIGHTS),
        **parse_assignments(sets)})


def cost(args) -> dict:
    """Same head config, same epochs: on cached features, and as a training job over the images."""
    workdir = Path(args.workdir) / "cost"
    cat_dir = str(workdir / "catalog")
    run_catalog(CatalogConfig(source=str(SHARED / "data" / "paintings"), top_k=3), cat_dir)
    manifest, painters = catalog.load(cat_dir)
    job = base_job(cat_dir, workdir, f"cost-{int(time.time())}", [
        f"train.head_epochs={args.epochs}", "train.finetune_epochs=0", "train.patience=0", *args.set])
    resolved = trainer.resolve(job)
    console.init_ray()
    start = time.time()
    cached = embeddings.ensure(manifest, resolved, str(workdir / "embeddings"), views=0)
    cache_s = time.time() - start
    data = embeddings.load(manifest, cached["directory"], 0)
    start = time.time()
    fit_head(data["train"], len(painters), resolved.model, resolved.train, args.epochs, val=data["val"])
    head_s = time.time() - start
    start = time.time()
    trainer.fit(job)
    backbone_s = time.time() - start
    return {"painters": len(painters), "train_images": len(data["train"].y), "epochs": args.epochs,
            "image_size": resolved.data.image_size, "head_trial_s": round(head_s, 2),
            "backbone_trial_s": round(backbone_s, 1), "ratio": round(backbone_s / head_s, 1),
            "feature_cache_s": round(cache_s, 1), "features_computed": cached["computed"],
            "break_even_trials": round(cache_s / max(backbone_s - head_s, 1e-9), 2), "cpu_cores": os.cpu_count()}


def sweep(args) -> dict:
    workdir = Path(args.workdir) / "sweep"
    cat_dir = str(workdir / "catalog")
    run_catalog(CatalogConfig(source=str(SHARED / "data" / "paintings"), min_paintings=40), cat_dir)
    job = base_job(cat_dir, workdir, args.name, [
        f"search.painter_counts={args.counts}", f"search.samples={args.samples}", f"search.views={args.views}",
        f"search.epochs={args.search_epochs}", f"search.finetune={args.finetune}", *args.set])
    start = time.time()
    result = tune.sweep(job, space.parse_space(space.space_entries([]), job))
    shutil.copy(result["summary"][1], RESULTS / f"search_sweep{args.tag}.md")
    shutil.copy(result["summary"][3], RESULTS / f"search_sweep{args.tag}.png")
    return {"rows": result["rows"], "features": {k: v for k, v in result["features"].items() if k != "spec"},
            "wall_s": round(time.time() - start, 1), "samples": args.samples, "views": args.views,
            "epochs": args.search_epochs, "space": space.DEFAULT_SPACE, "cpu_cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("cost", "sweep"))
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench"))
    parser.add_argument("--epochs", type=int, default=3, help="cost: epochs of both trials")
    parser.add_argument("--search-epochs", type=int, default=30, help="sweep: head epochs a trial may run")
    parser.add_argument("--counts", default="3,5,10,27,47")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--finetune", default="false")
    parser.add_argument("--name", default=f"sweep-{int(time.time())}")
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. _finetune")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    console.setup()
    out = cost(args) if args.what == "cost" else sweep(args)
    print(json.dumps(out, indent=2, default=str))
    (RESULTS / f"search_{args.what}{args.tag}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
