"""MLflow model registry: a run's model becomes a version of a named model; the `champion` alias moves to a
challenger only when it beats the champion on the same frozen evaluation set; `rollback` moves it back.

The evaluation set is a catalog's test split, frozen per registered model at its first promotion (its URI and
manifest checksum are tags of the registered model): scores of different versions are comparable because they
come from the same images, and a version's scores are cached on it (keyed by that checksum). Aliases, not the
deprecated stages. MLflow has no transactions: before moving the alias a promotion re-reads it, and if another
promotion moved it meanwhile, compares against the new champion first. The alias only ever points at a version
that was evaluated on the frozen set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artnet import metrics
from artnet.config import RegistryConfig
from artnet.data import catalog, storage
from artnet.errors import UserError
from artnet.model import bundle
from artnet.serve import predict
from artnet.track import tracking

CHAMPION = "champion"
EVAL_CATALOG_TAG = "artnet.eval_catalog"
EVAL_SHA_TAG = "artnet.eval_sha256"
PREVIOUS_TAG = "artnet.previous_champion"
DECISION_TAG = "artnet.promotion"
RETRIES = 5  # re-comparisons when concurrent promotions keep moving the alias


@dataclass
class EvalSet:
    catalog: str
    rows: pa.Table  # uri, row, label (painter name)
    painters: list[str]
    sha256: str


@dataclass
class Decision:
    promoted: bool
    reason: str
    metric: str
    challenger: dict  # {"version", "score", "scores"}
    champion: dict | None = None
    eval_set: str = ""
    dry_run: bool = False

    def line(self) -> str:
        c, champ = self.challenger, self.champion
        who = f"version {c['version']}" if c.get("version") else "the challenger"
        against = f"champion version {champ['version']}: {champ['score']:.4f}" if champ else "no champion yet"
        verdict = ("would become champion" if self.dry_run else "is now champion") if self.promoted else \
            "is not promoted"
        return f"{self.metric}: {who} {c['score']:.4f}, {against}. {who.capitalize()} {verdict} ({self.reason})."


def client_for(cfg: RegistryConfig):
    import mlflow

    uri = tracking.resolve_uri(cfg.tracking_uri, cfg.workdir)
    mlflow.set_tracking_uri(uri)  # `models:/` URIs below resolve against it
    return mlflow.MlflowClient(uri), uri


# ------------------------------------------------------------------------------------------- evaluation

def load_eval_set(catalog_dir: str) -> EvalSet:
    manifest, painters = catalog.load(catalog_dir)
    test = manifest.filter(pc.equal(manifest["split"], "test"))
    if test.num_rows == 0:
        raise UserError(catalog_dir, "has no test images to evaluate on", "use a catalog with a test split")
    rows = pa.table({"uri": test["uri"], "row": test["row"], "label": test["painter"]})
    return EvalSet(catalog_dir, rows, painters, catalog.digest(test))


def score(model_uri: str, tracking_uri: str, eval_set: EvalSet) -> dict[str, float]:
    """Every promotion metric of a model on the evaluation set (Ray Data batch inference; unreadable images are
    left out for every model alike and counted)."""
    table = predict.collect(predict.stream(model_uri, tracking_uri, eval_set.rows, k=3))
    table = table.filter(pc.is_null(table["error"]))
    index = {p: i for i, p in enumerate(eval_set.painters)}
    truth = [index[p] for p in table["label"].to_pylist()]
    guess = [index[p] for p in table["painter"].to_pylist()]
    top3 = sum(label in [t["painter"] for t in ranked]
               for label, ranked in zip(table["label"].to_pylist(), table["top_k"].to_pylist()))
    cm = metrics.confusion(np.asarray(truth, np.int64), np.asarray(guess, np.int64), len(eval_set.painters))
    found = metrics.summarize(cm, top3, 0.0)
    found.pop("loss")
    found["unreadable"] = eval_set.rows.num_rows - table.num_rows
    return found


def _check_painters(what: str, painters: list[str], eval_set: EvalSet, name: str) -> None:
    if set(painters) != set(eval_set.painters):
        missing, extra = set(eval_set.painters) - set(painters), set(painters) - set(eval_set.painters)
        raise UserError(what, f"knows {len(painters)} painters, the evaluation set of '{name}' has "
                        f"{len(eval_set.painters)} (not known: {sorted(missing)[:5]}, "
                        f"not evaluated: {sorted(extra)[:5]})",
                        "promote it under a registered model for its own painter set (--model-name)")


def _cache_tag(eval_set: EvalSet) -> str:
    return f"artnet.eval.{eval_set.sha256[:16]}"


# ---------------------------------------------------------------------------------------------- registry

def _registered_model(client, cfg: RegistryConfig, challenger_catalog: str, create: bool = True,
                      retry: bool = True) -> tuple[object, EvalSet]:
    """The registered model (created on first use unless not `create`) and its frozen evaluation set."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(cfg.model_name)
    except MlflowException:
        model = None
    frozen = (model.tags or {}).get(EVAL_CATALOG_TAG) if model else None
    eval_set = load_eval_set(frozen or storage.absolute(cfg.eval_catalog or challenger_catalog))
    if frozen:
        if eval_set.sha256 != model.tags.get(EVAL_SHA_TAG):
            raise UserError(frozen, f"is the frozen evaluation set of '{cfg.model_name}' but its test split changed "
                            "since it was frozen", "restore it, or promote under a new --model-name")
        if cfg.eval_catalog and storage.absolute(cfg.eval_catalog) != frozen:
            other = load_eval_set(storage.absolute(cfg.eval_catalog))
            if other.sha256 != eval_set.sha256:
                raise UserError(cfg.eval_catalog, f"differs from the evaluation set '{cfg.model_name}' is frozen on "
                                f"({frozen})", "leave --eval-catalog out, or promote under a new --model-name")
        return model, eval_set
    if not create:
        return None, eval_set
    tags = {EVAL_CATALOG_TAG: eval_set.catalog, EVAL_SHA_TAG: eval_set.sha256}
    try:
        model = client.create_registered_model(cfg.model_name, tags=tags)
    except MlflowException:  # created meanwhile by a concurrent promotion: use its frozen set (once)
        if not retry:
            raise
        return _registered_model(client, cfg, challenger_catalog, retry=False)
    return model, eval_set


def _register(client, name: str, run, source: str):
    keep = ("artnet.painter_count", "artnet.painters_sha256", "artnet.manifest_sha256", "artnet.backbone")
    tags = {k: v for k, v in run.data.tags.items() if k in keep}
    tags.update({f"metric.{k}": str(v) for k, v in run.data.metrics.items()
                 if k.startswith("test_") or k.startswith("calibration_")})
    # An MLflow 3 logged model (`models:/m-...`) is registered by its id (a tracking server insists).
    model_id = source[len("models:/"):] if source.startswith("models:/m-") else None
    return client.create_model_version(name, source, run_id=run.info.run_id, tags=tags, model_id=model_id)


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _scores_of(client, name: str, version, tracking_uri: str, eval_set: EvalSet) -> dict:
    """A version's scores on the frozen set: cached on the version, else computed and cached."""
    cached = (version.tags or {}).get(_cache_tag(eval_set))
    if cached:
        return json.loads(cached)
    meta = bundle.read_metadata(f"models:/{name}/{version.version}")
    _check_painters(f"version {version.version}", meta["painters"], eval_set, name)
    found = score(f"models:/{name}/{version.version}", tracking_uri, eval_set)
    client.set_model_version_tag(name, version.version, _cache_tag(eval_set), json.dumps(found))
    return found


def find_run(client, run: str):
    """A run by id, or the latest finished run of the job named `run` (what `artnet train --name` set)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, filter_string=f"tags.`{tracking.JOB_TAG}` = '{run}' and "
                               "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                               max_results=1) if experiments else []
    if not found:
        raise UserError(run, "is neither a run id nor the name of a finished job in this tracking store",
                        "pass the run id or --name printed by `artnet train` (and its --tracking-uri/--workdir)")
    return found[0]


def promote(run: str, cfg: RegistryConfig, dry_run: bool = False) -> Decision:
    """Register the model of `run` (a run id or a job name) as a new version and make it champion if it beats
    the current one by more than `cfg.margin` on the frozen evaluation set. With `dry_run` nothing is registered
    or moved."""
    cfg.validate()
    client, uri = client_for(cfg)
    run = find_run(client, run)
    source = run.data.tags.get(tracking.MODEL_URI_TAG)
    if not source:
        raise UserError(f"run {run.info.run_id}", "logged no model (it did not finish?)",
                        "promote a finished training run")
    _, eval_set = _registered_model(client, cfg, run.data.params["catalog"], create=not dry_run)
    _check_painters(f"run {run.info.run_id}", bundle.read_metadata(source)["painters"], eval_set, cfg.model_name)
    if dry_run:
        challenger = {"version": None, "scores": score(source, uri, eval_set)}
        champion = _champion(client, cfg.model_name)
        return _decide(cfg, challenger, champion and _champion_entry(client, cfg, champion, uri, eval_set),
                       eval_set, dry_run=True)
    version = _register(client, cfg.model_name, run, source)
    challenger = {"version": str(version.version), "scores": _scores_of(client, cfg.model_name, version, uri, eval_set)}
    for _ in range(RETRIES):
        champion = _champion(client, cfg.model_name)
        entry = champion and _champion_entry(client, cfg, champion, uri, eval_set)
        decision = _decide(cfg, challenger, entry, eval_set)
        if decision.promoted and _champion_version(client, cfg.model_name) != (entry and entry["version"]):
            continue  # another promotion moved the alias meanwhile: compare against its champion
        _record(client, cfg.model_name, version.version, decision)
        if decision.promoted:
            if champion:
                client.set_model_version_tag(cfg.model_name, version.version, PREVIOUS_TAG, str(champion.version))
            client.set_registered_model_alias(cfg.model_name, CHAMPION, version.version)
        return decision
    raise UserError(cfg.model_name, f"the champion alias kept moving during {RETRIES} comparisons",
                    "retry the promotion when the other promotions have finished")


def _champion_entry(client, cfg: RegistryConfig, champion, uri: str, eval_set: EvalSet) -> dict:
    return {"version": str(champion.version), "scores": _scores_of(client, cfg.model_name, champion, uri, eval_set)}


def _champion_version(client, name: str) -> str | None:
    found = _champion(client, name)
    return str(found.version) if found else None


def _decide(cfg: RegistryConfig, challenger: dict, champion: dict | None, eval_set: EvalSet,
            dry_run: bool = False) -> Decision:
    challenger["score"] = challenger["scores"][cfg.metric]
    if champion is not None:
        champion["score"] = champion["scores"][cfg.metric]
    if champion is None:
        promoted, reason = True, "first champion"
    elif champion["version"] == challenger.get("version"):
        promoted, reason = False, "already champion"
    elif challenger["score"] > champion["score"] + cfg.margin:
        promoted, reason = True, f"beats the champion by more than {cfg.margin:g}"
    else:
        promoted, reason = False, f"does not beat the champion by more than {cfg.margin:g}"
    return Decision(promoted, reason, cfg.metric, challenger, champion, eval_set.catalog, dry_run)


def _record(client, name: str, version: str, decision: Decision) -> None:
    """The decision and both scores, on the challenger's version."""
    record = {"promoted": decision.promoted, "reason": decision.reason, "metric": decision.metric,
              "score": decision.challenger["score"], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "champion_version": decision.champion and decision.champion["version"],
              "champion_score": decision.champion and decision.champion["score"], "eval_catalog": decision.eval_set}
    client.set_model_version_tag(name, version, DECISION_TAG, json.dumps(record))


def rollback(cfg: RegistryConfig) -> tuple[str, str]:
    """Move `champion` back to the version it replaced; returns (from, to)."""
    cfg.validate()
    client, _ = client_for(cfg)
    current = _champion(client, cfg.model_name)
    if current is None:
        raise UserError(cfg.model_name, "has no champion", "promote a model first")
    previous = (current.tags or {}).get(PREVIOUS_TAG)
    if not previous:
        raise UserError(cfg.model_name, f"version {current.version} was its first champion: there is none before it",
                        "promote another model instead")
    client.set_registered_model_alias(cfg.model_name, CHAMPION, previous)
    client.set_model_version_tag(cfg.model_name, current.version, "artnet.rolled_back",
                                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return str(current.version), previous


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"

