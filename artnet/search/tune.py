"""`artnet tune`: Ray Tune over heads on cached backbone features, for each painter count, then each count's
best head fine-tuned end to end by the training job itself.

Per sweep: the features of the whole catalog are computed once (`search.embeddings`); every painter count is a
subset of it and reads them from the cache. Per count: a Tuner runs head-only trials (seconds each, no CNN in
the loop) with ASHA stopping poor ones early, on train and validation features only; the best config by the
validation metric is retrained once, and only then scored on the test split. With `search.finetune`, that head
starts an `artnet train` job (phase 2 only, `model.head_weights`) on the images. MLflow gets a parent run per
sweep, a nested run per trial and per fine-tuning job, and the summary table and plot as artifacts.

A sweep interrupted part-way resumes: each count's Tune experiment is restored (finished trials are not run
again), and each fine-tuning job resumes by name, as `artnet train` does.
"""

from __future__ import annotations

import io
import json
import time

from artnet import cluster, console
from artnet.config import CatalogConfig, ConfigError, JobConfig, override, replace
from artnet.data import catalog, storage
from artnet.search import embeddings
from artnet.search.heads import Features, fit_head
from artnet.search.space import Dimension, split, to_tune

SUMMARY_COLUMNS = ("painters", "trials", "stopped_early", "best_config", "val_metric", "head_test_accuracy",
                   "head_test_top3_accuracy", "head_test_balanced_accuracy", "head_test_macro_f1",
                   "finetuned_test_accuracy", "finetuned_test_top3_accuracy", "finetuned_test_balanced_accuracy",
                   "finetuned_test_macro_f1", "finetune_trials", "trial_s", "wall_s", "model_uri")


def head_trial(config: dict, *, base: JobConfig, train: Features, val: Features, num_classes: int) -> None:
    """One Tune trial: the sampled fields over the base config, a head trained on the features, every epoch
    reported (validation metrics only: trials never see the test split). The features are read-only views of
    the object store's one copy; the head reads them in place."""
    from ray import tune

    _one_thread_per_trial()
    job = with_trial_config(base, config)
    fit_head(train, num_classes, job.model, job.train, job.search.epochs, val=val, on_epoch=tune.report)


def finetune_trial(config: dict, *, base: JobConfig, parent_run_id: str) -> None:
    """One fine-tuning trial: an `artnet train` job (the same training code, phase 2 from the best head) with the
    sampled fields; Ray Train's TuneReportCallback hands every epoch's validation metrics to Tune, whose
    scheduler may stop it. Its job name carries the trial id, so a restored trial resumes its checkpoints."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from artnet.train import trainer

    job = replace(with_trial_config(base, config), name=f"{base.name}-{tune.get_context().get_trial_id()}")
    trainer.fit(job, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])


def with_trial_config(job: JobConfig, config: dict) -> JobConfig:
    """The job with a trial's sampled `field -> value` pairs applied (validated like --set)."""
    return override(job, {field: str(value) for field, value in config.items()})


def _one_thread_per_trial() -> None:
    """A trial holds one CPU; TensorFlow would otherwise start a thread pool as wide as the machine."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # a reused trial process already initialised TensorFlow
        pass


def _search_algorithm(job: JobConfig):
    """Seeded, so a sweep is reproducible and random search draws the same candidates at every count."""
    if job.search.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=job.train.seed)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("search.algorithm", "is 'optuna' but optuna is not installed",
                          "pip install optuna, or use search.algorithm=random") from None
    return OptunaSearch(seed=job.train.seed)


def _concurrency(job: JobConfig) -> int:
    if job.search.max_concurrent:
        return job.search.max_concurrent
    return max(1, int(cluster.current().total("CPU", grown=True)) - 1)  # one CPU for Ray's own work


def search_count(job: JobConfig, dims: list[Dimension], data: dict, num_classes: int,
                 name: str, parent_run_id: str, uri: str):
    """Run (or resume) one count's head search; returns Tune's ResultGrid. `data` holds the train and val
    Features, or object refs to them: put in the object store once, every trial reads that copy in place."""
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from artnet.search.heads import trial_memory
    from artnet.track import tracking

    refs = {s: data[s] if isinstance(data[s], ray.ObjectRef) else ray.put(data[s]) for s in ("train", "val")}
    # Each trial asks for the memory it allocates itself, so Ray packs no more trials on a node than it holds.
    sizes = {"model.head_width": job.model.head_width, "model.head_depth": job.model.head_depth}
    for d in dims:
        if d.field in sizes:
            sizes[d.field] = max([sizes[d.field]] + [int(float(v)) for v in d.values])
    memory = trial_memory(ray.get(refs["train"]), num_classes, sizes["model.head_width"], sizes["model.head_depth"])
    trainable = tune.with_resources(  # with_parameters keeps refs as they are: no copy per trial
        tune.with_parameters(head_trial, base=job, train=refs["train"], val=refs["val"], num_classes=num_classes),
        {"cpu": 1, "memory": memory})
    logger = MLflowLoggerCallback(tracking_uri=uri, experiment_name=job.tracking.experiment,
                                  tags={tracking.PARENT_TAG: parent_run_id, "artnet.painter_count": str(num_classes)})
    return _run_tuner(job, trainable, dims, name, job.search.samples, job.search.epochs, _concurrency(job), [logger])


def finetune_search(job: JobConfig, dims: list[Dimension], name: str, parent_run_id: str):
    """Run (or resume) one count's fine-tuning search: `search.finetune_samples` training jobs under Tune, as
    many at once as the cluster has room for (each job's workers plus a CPU for decoding); returns the best
    trial's last result by the validation metric. Each job's MLflow run is nested under the sweep's."""
    from ray import tune

    from artnet.train import trainer

    # Each trial's workers are planned (refused, or their nodes waited for) once here, on the sweep's driver,
    # which sees the autoscaler's node types: a trial may run on a node that does not.
    wanted = trainer.plan_cluster(job)
    trainer.wait_for_nodes(job, wanted)
    per_job = job.scaling.num_workers * job.scaling.cpus_per_worker + 1
    concurrent = job.search.max_concurrent or max(1, int(wanted.total("CPU", grown=True) // per_job))
    # The trial itself only waits on its training job: a sliver of a CPU, so decoding keeps the rest.
    trainable = tune.with_resources(tune.with_parameters(finetune_trial, base=job, parent_run_id=parent_run_id),
                                    {"cpu": 0.1})
    epochs = max([job.train.finetune_epochs] + [int(v) for d in dims if d.field == "train.finetune_epochs"
                                                for v in d.values])
    try:
        results = _run_tuner(job, trainable, dims, name, job.search.finetune_samples, epochs + 1, concurrent, [])
    finally:
        if wanted.launch:
            cluster.release()
    return results.get_best_result(job.search.metric, job.search.mode, scope="all"), results


def _run_tuner(job: JobConfig, trainable, dims: list[Dimension], name: str, samples: int, max_t: int,
               concurrent: int, callbacks: list):
    """A Tune experiment under the job's results folder, ASHA on the validation metric; restored instead when
    an interrupted one is found there."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from artnet.train import trainer

    where = storage.ray_storage(trainer.results_dir(job))
    experiment = f"{where['storage_path'].rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment, where.get("storage_filesystem")):
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True,
                                   storage_filesystem=where.get("storage_filesystem"))
        console.log.info("resuming the search in %s", storage.join(trainer.results_dir(job), name))
    else:
        tuner = tune.Tuner(
            trainable, param_space=to_tune(dims),
            tune_config=tune.TuneConfig(
                metric=job.search.metric, mode=job.search.mode, num_samples=samples,
                scheduler=ASHAScheduler(max_t=max_t, grace_period=min(job.search.grace_epochs, max_t)),
                search_alg=_search_algorithm(job), max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, verbose=1 if console.is_verbose() else 0, callbacks=callbacks,
                                      **where))
    return tuner.fit()


def _best(results, job: JobConfig):
    """The trial whose best epoch is best on the validation metric."""
    best = results.get_best_result(job.search.metric, job.search.mode, scope="all")
    history = best.metrics_dataframe
    values = history[job.search.metric]
    epoch = int(history["epoch"][values.idxmin() if job.search.mode == "min" else values.idxmax()])
    return best, epoch


def _save_head(head, uri: str) -> None:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "head.weights.h5")
        head.save_weights(path)
        with open(path, "rb") as f:
            storage.write_bytes(uri, f.read())


def run_count(job: JobConfig, dims: list[Dimension], manifest, painters: list[str], count: int, features_dir: str,
              parent_run_id: str, uri: str) -> dict:
    """Search one painter count, score its best head on test, fine-tune it if asked: one summary row."""
    import ray

    from artnet.search.heads import evaluate
    from artnet.track import tracking
    from artnet.train import trainer

    head_dims, finetune_dims = split(dims)
    start = time.time()
    keep = catalog.top_painters(manifest, count) if count < len(painters) else painters
    sub, names = catalog.subset(manifest, painters, keep)
    data = embeddings.load(sub, features_dir, job.search.views, splits=("train", "val"))
    # Into the object store once: the trials and the retraining below read that copy in place (read-only
    # views), and the driver's own copy goes.
    refs = {split_name: ray.put(features) for split_name, features in data.items()}
    data = {split_name: ray.get(ref) for split_name, ref in refs.items()}
    name = f"{job.name}-{count}painters"
    results = search_count(job, head_dims, refs, len(names), name, parent_run_id, uri)
    best, best_epoch = _best(results, job)
    trials = [r for r in results if r.metrics]
    stopped = sum(1 for r in trials if r.metrics.get("training_iteration", 0) < job.search.epochs)
    chosen = with_trial_config(job, best.config)
    # The chosen config, retrained for its best epoch count; only now is the test split read, once.
    final = fit_head(data["train"], len(names), chosen.model, chosen.train, best_epoch, val=data["val"])
    test = embeddings.load(sub, features_dir, 0, splits=("test",))["test"]
    head_test = evaluate(final.model, test, len(names))
    out = storage.join(trainer.results_dir(job), job.name, f"{count}painters")
    _save_head(final.model, storage.join(out, "head.weights.h5"))
    row = {"painters": len(names), "trials": len(trials), "stopped_early": stopped,
           "best_config": "; ".join(f"{k}={_short(v)}" for k, v in sorted(best.config.items())),
           "val_metric": float(best.metrics_dataframe[job.search.metric].agg(job.search.mode)),
           **{f"head_test_{k}": v for k, v in head_test.items() if k in ("accuracy", "top3_accuracy",
                                                                        "balanced_accuracy", "macro_f1")}}
    trial_seconds = float(sum(r.metrics.get("time_total_s", 0.0) for r in trials))
    console.log.info("%d painters: %d trials (%d stopped early), best %s; head on test: accuracy %.3f, balanced %.3f",
                     len(names), len(trials), stopped, row["best_config"], row["head_test_accuracy"],
                     row["head_test_balanced_accuracy"])
    if job.search.finetune:
        catalog.write(catalog.Catalog(sub, names, {}), storage.join(out, "catalog"), CatalogConfig(source=job.catalog))
        tuned = replace(chosen, catalog=storage.join(out, "catalog"), name=f"{name}-finetune",
                        model=replace(chosen.model, head_weights=storage.join(out, "head.weights.h5")),
                        train=replace(chosen.train, head_epochs=0))
        if finetune_dims:  # a search over fine-tuning fields: training jobs as Tune trials
            best_job, tuned_trials = finetune_search(tuned, finetune_dims, f"{name}-finetune", parent_run_id)
            final, model_uri = best_job.metrics, tracking.model_uri(uri, best_job.metrics["run_id"])
            row["best_config"] += "; " + "; ".join(f"{k}={_short(v)}" for k, v in sorted(best_job.config.items()))
            row["finetune_trials"] = len([r for r in tuned_trials if r.metrics])
        else:  # the job's own fine-tuning settings, once
            result = trainer.fit(tuned, parent_run_id=parent_run_id)
            final, model_uri = result["metrics"], result["model_uri"]
        row.update({f"finetuned_test_{k}": final.get(f"test_{k}") for k in
                    ("accuracy", "top3_accuracy", "balanced_accuracy", "macro_f1")})
        row["model_uri"] = model_uri
    row["trial_s"], row["wall_s"] = trial_seconds, time.time() - start  # summed trial time; this count's wall time
    return row


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sweep(job: JobConfig, dims: list[Dimension]) -> dict:
    """The whole sweep: features once, then every painter count; returns the summary rows and where the
    summary files are."""
    from artnet.track import plots, tracking
    from artnet.train import trainer

    console.import_tensorflow()
    job.validate()
    manifest, painters = catalog.load(job.catalog)
    counts = sorted(set(job.search.painter_counts or (len(painters),)))
    if counts[-1] > len(painters):
        raise ConfigError("search.painter_counts", f"asks for {counts[-1]} painters; the catalog has {len(painters)}",
                          f"use counts up to {len(painters)}, or catalogue more painters")
    job = trainer.resolve(job)
    console.init_ray()
    uri = tracking.tracking_uri(job)
    nodes = cluster.current().nodes  # before any work
    tracking.check_reachable(uri, job.tracking.artifact_location, nodes)
    cluster.refuse_local("search.cache", embeddings.cache_of(job), nodes,
                         "features are written by the embedding actors on their nodes", "embeddings")
    started = time.time()
    cached = embeddings.ensure(manifest, job, embeddings.cache_of(job), job.search.views, job.train.seed)
    console.log.info("features: %d computed, %d reused, %d undecodable (%.0f s) in %s", cached["computed"],
                     cached["reused"], cached["undecodable"], time.time() - started, cached["directory"])
    parent = tracking.start_job_run(job, uri, {"artnet.sweep": "true"})
    rows = [run_count(job, dims, manifest, painters, k, cached["directory"], parent, uri) for k in counts]
    out = storage.join(trainer.results_dir(job), job.name)
    files = write_summary(rows, out)
    plots.sweep_curve(rows, storage.join(out, "accuracy_by_painters.png"))
    files.append(storage.join(out, "accuracy_by_painters.png"))
    tracking.log_files(uri, parent, files)
    tracking.finish_run(uri, parent, {"features_computed": cached["computed"], "features_reused": cached["reused"]})
    return {"rows": rows, "summary": files, "run_id": parent, "tracking_uri": uri, "features": cached}


def write_summary(rows: list[dict], out: str) -> list[str]:
    """summary.csv and summary.md beside the sweep's results."""
    import csv

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(out, "summary.csv"), text.getvalue().encode())
    storage.write_bytes(storage.join(out, "summary.md"), markdown_table(rows).encode())
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(rows, indent=2).encode())
    return [storage.join(out, name) for name in ("summary.csv", "summary.md", "summary.json")]


def markdown_table(rows: list[dict]) -> str:
    """painters | best config | val | head test top-1/top-3/balanced/macro-F1 | fine-tuned test ... | trials"""
    def cell(value):
        return "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    header = ["painters", "best head config", "val", "test top-1 (head)", "top-3", "balanced", "macro-F1",
              "test top-1 (fine-tuned)", "top-3", "balanced", "macro-F1", "trials (stopped early)", "trial s",
              "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            cell(r["painters"]), r["best_config"], cell(r["val_metric"]), cell(r["head_test_accuracy"]),
            cell(r["head_test_top3_accuracy"]), cell(r["head_test_balanced_accuracy"]), cell(r["head_test_macro_f1"]),
            cell(r.get("finetuned_test_accuracy")), cell(r.get("finetuned_test_top3_accuracy")),
            cell(r.get("finetuned_test_balanced_accuracy")), cell(r.get("finetuned_test_macro_f1")),
            f"{r['trials']} ({r['stopped_early']})", f"{r['trial_s']:.0f}", f"{r['wall_s']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"
