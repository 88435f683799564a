"""The cluster a job will run on: the nodes up now, the node types its autoscaler can add, and asking for (and
waiting for) what a job needs before any work starts.

A freshly launched autoscaling cluster has its head only, so a snapshot of `ray.cluster_resources()` would
refuse a GPU job, size an actor pool to no GPU and call a one-node cluster safe for a store on the driver's disk.
Every such decision reads a `Plan` instead: the nodes up now plus those the autoscaler will add for the job.
Packing is pure (`plan`, `pack`); `ensure` asks Ray's autoscaler (`request_resources`) and waits for the nodes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from artnet import console
from artnet.data import storage
from artnet.errors import ConfigError

POLL_S = 2.0


@dataclass(frozen=True)
class NodeType:
    """A worker node type of the autoscaler's config: its resources and how many nodes of it may run. The
    resources are those the autoscaler plans with: `ray up` fills in CPU and GPU from the instance type before
    it hands the config to the head, so a type without GPUs here has none."""

    name: str
    resources: dict[str, float]
    max_workers: int  # -1: no limit

    def holds(self, bundle: dict[str, float]) -> bool:
        return _fits(bundle, self.resources)


@dataclass(frozen=True)
class Plan:
    """Where a request's bundles go: `up` (resources of each node up now), `launch` (node type -> nodes to add)
    and `added` (their resources), `unplaced` (bundles no node has room for, now or after scaling), `more` (the
    nodes the autoscaler could still add beyond the plan, one of each unbounded type: the job may land there
    through Ray Data's or Tune's own demands)."""

    up: list[dict[str, float]]
    launch: dict[str, int] = field(default_factory=dict)
    added: list[dict[str, float]] = field(default_factory=list)
    unplaced: list[dict[str, float]] = field(default_factory=list)
    more: list[dict[str, float]] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        """Nodes the job may run on: several means nothing may live only on the driver's disk."""
        return len(self.up) + len(self.added) + len(self.more)

    def total(self, resource: str, grown: bool = False) -> float:
        """The resource over the nodes up and those to be added (`grown`: and all the autoscaler may add)."""
        return sum(node.get(resource, 0) for node in self.up + self.added + (self.more if grown else []))


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0) >= v for k, v in bundle.items() if v)


def _take(bundle: dict[str, float], free: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0) - v


def _size(bundle: dict[str, float]) -> tuple:
    return (bundle.get("GPU", 0), len(bundle), bundle.get("CPU", 0))


def pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """First-fit decreasing of `bundles` onto copies of `nodes`' capacities; returns those left over."""
    free = [dict(n) for n in nodes]
    left = []
    for bundle in sorted(bundles, key=_size, reverse=True):
        target = next((f for f in free if _fits(bundle, f)), None)
        if target is None:
            left.append(bundle)
        else:
            _take(bundle, target)
    return left


def _same_type(node: dict[str, float], node_type: NodeType) -> bool:
    keys = [k for k in node_type.resources if k not in ("memory", "object_store_memory")]
    return bool(keys) and all(node.get(k, 0) == node_type.resources[k] for k in keys)


def plan(bundles: list[dict[str, float]], up: list[dict[str, float]], types: list[NodeType],
         max_workers: int = -1) -> Plan:
    """Place `bundles` on the nodes `up`, then on new nodes of `types` (the smallest type that holds each
    leftover bundle, within each type's and the cluster's `max_workers`)."""
    left = pack(bundles, up)
    room = {t.name: (math.inf if t.max_workers < 0 else t.max_workers - sum(_same_type(n, t) for n in up))
            for t in types}
    workers_left = math.inf if max_workers < 0 else max(0, max_workers - max(0, len(up) - 1))
    launch: dict[str, int] = {}
    added: list[dict[str, float]] = []
    free: list[dict[str, float]] = []
    unplaced = []
    for bundle in sorted(left, key=_size, reverse=True):
        target = next((f for f in free if _fits(bundle, f)), None)
        if target is None:
            fitting = sorted((t for t in types if t.holds(bundle) and room[t.name] > 0 and workers_left > 0),
                             key=lambda t: sum(v for k, v in t.resources.items() if k in ("CPU", "GPU")))
            if not fitting:
                unplaced.append(bundle)
                continue
            chosen = fitting[0]
            room[chosen.name] -= 1
            workers_left -= 1
            launch[chosen.name] = launch.get(chosen.name, 0) + 1
            added.append(dict(chosen.resources))
            target = dict(chosen.resources)
            free.append(target)
        _take(bundle, target)
    more: list[dict[str, float]] = []
    for t in types:
        n = 1 if room[t.name] == math.inf else int(room[t.name])
        more += [dict(t.resources)] * max(0, n)
    if workers_left != math.inf:
        more = more[:int(workers_left)]
    return Plan(up=list(up), launch=launch, added=added, unplaced=unplaced, more=more)


def shape(resources: dict[str, float]) -> str:
    """'{CPU: 1, GPU: 4, trainer: 1}': the resources a person reads (not Ray's memory bookkeeping)."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())
                           if v and k not in ("memory", "object_store_memory")) + "}"


def describe(bundles: list[dict[str, float]]) -> str:
    """'2 x {CPU: 1, GPU: 4, trainer: 1}' for a list of bundles, grouped."""
    counts: dict[str, int] = {}
    for b in bundles:
        text = shape(b)
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"{n} x {text}" for text, n in counts.items())


def refuse_local(field_name: str, uri: str, nodes: int, why: str, example: str) -> None:
    """A path on the driver's disk exists on one node of several: refused before any work, naming the field
    and the s3:// fix (`why`: who reads or writes it elsewhere)."""
    if nodes > 1 and storage.is_local(uri):
        raise ConfigError(field_name, f"is the local path {uri}, but the job may run on {nodes} nodes and {why}",
                          f"use an s3:// prefix every node reaches, e.g. s3://my-bucket/artnet/{example}")


# ------------------------------------------------------------------------------------------ the live cluster

def nodes_up() -> list[dict[str, float]]:
    """Total resources of each alive node, without Ray's per-node bookkeeping keys."""
    import ray

    return [{k: v for k, v in node["Resources"].items() if not k.startswith("node:")}
            for node in ray.nodes() if node.get("Alive")]


def node_types() -> tuple[list[NodeType], int]:
    """The worker node types the cluster's autoscaler can launch and the cluster's `max_workers` (-1: none):
    from the config the autoscaler reported to Ray's GCS (autoscaler v2, KubeRay), else from the
    `--autoscaling-config` file of this cluster's autoscaler process (`ray up` runs it on the head, where
    `ray job submit` runs the driver). ([], 0) for a cluster without an autoscaler."""
    import ray._private.state

    reported = ray._private.state.state.get_cluster_config()
    if reported is not None and reported.node_group_configs:
        return [NodeType(g.name, dict(g.resources), g.max_count) for g in reported.node_group_configs], -1
    config = _autoscaling_config()
    if config is None:
        return [], 0
    head = config.get("head_node_type")
    types = [NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                      int(spec.get("max_workers", config.get("max_workers", 0))))
             for name, spec in config.get("available_node_types", {}).items() if name != head]
    return types, int(config.get("max_workers", -1))


def _autoscaling_config() -> dict | None:
    """The cluster config this cluster's autoscaler (`monitor.py --autoscaling-config=...`) runs with."""
    import psutil
    import ray
    import yaml

    gcs = ray.get_runtime_context().gcs_address
    for process in psutil.process_iter(["cmdline"]):
        args = process.info.get("cmdline") or []
        if not any(a.endswith("monitor.py") or a.endswith("autoscaler._private.monitor") for a in args):
            continue
        options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if options.get("gcs-address") not in (None, gcs) or "autoscaling-config" not in options:
            continue
        try:
            with open(options["autoscaling-config"]) as f:
                text = f.read()
        except OSError:
            return None
        return json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    return None


def current(bundles: list[dict[str, float]] | None = None) -> Plan:
    """The plan for `bundles` (none: what the cluster can grow to) on the cluster as it is now."""
    types, max_workers = node_types()
    return plan(bundles or [], nodes_up(), types, max_workers)


def ensure(bundles: list[dict[str, float]], wanted: Plan, wait_s: float, what: str) -> None:
    """Brings up the nodes `wanted` (the plan for `bundles`) launches: asks the autoscaler for them, says on
    the console what it waits for, and returns once they have joined. Raises `TimeoutError` after `wait_s`
    (the request withdrawn). The caller refuses a plan with `unplaced` bundles before calling this."""
    from ray.autoscaler.sdk import request_resources

    if not wanted.launch:
        return
    request_resources(bundles=bundles)
    adding = ", ".join(f"{n} x {name}" for name, n in wanted.launch.items())
    console.log.info("waiting for the autoscaler to add %s for %s (up to %.0f s: scaling.wait_for_nodes_s)",
                     adding, what, wait_s)
    started, seen = time.time(), len(nodes_up())
    while time.time() - started < wait_s:
        time.sleep(POLL_S)
        now = nodes_up()
        if not pack(bundles, now):
            console.log.info("%d node(s) up after %.0f s", len(now), time.time() - started)
            return
        if len(now) != seen:
            seen = len(now)
            console.log.info("%d node(s) up after %.0f s, waiting for more", seen, time.time() - started)
    request_resources(bundles=[])
    raise TimeoutError(f"{adding} did not join within {wait_s:.0f} s")


def release() -> None:
    """Withdraw this cluster's standing resource request (Ray keeps one, the latest), so idle nodes can go."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])
