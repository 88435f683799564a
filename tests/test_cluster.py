"""Planning a job onto the cluster it will run on: the nodes up now plus those the autoscaler can add (pure;
the end-to-end run on a local autoscaling cluster is in tests/test_jobs.py)."""

import pytest

from artnet import cluster
from artnet.cluster import NodeType
from artnet.errors import ConfigError

HEAD = {"CPU": 16.0, "memory": 6e10, "object_store_memory": 2e10}
GPU_NODE = NodeType("gpu_worker", {"CPU": 48, "GPU": 4, "trainer": 1}, max_workers=4)
CPU_NODE = NodeType("cpu_worker", {"CPU": 32}, max_workers=4)
WORKER = {"CPU": 1, "GPU": 4, "trainer": 1}


def test_workers_that_fit_on_the_nodes_up_launch_nothing():
    plan = cluster.plan([{"CPU": 1}] * 3, [HEAD], [GPU_NODE, CPU_NODE])
    assert plan.launch == {} and plan.unplaced == [] and plan.added == []
    assert plan.nodes == 1 + 8, "the autoscaler could still add 8 nodes: a multi-node cluster"


def test_a_head_only_cluster_plans_one_gpu_node_per_worker_and_counts_them():
    plan = cluster.plan([WORKER] * 3 + [{"CPU": 1}], [HEAD], [GPU_NODE, CPU_NODE])
    assert plan.launch == {"gpu_worker": 3} and plan.unplaced == []
    assert plan.total("GPU") == 12 and plan.total("CPU") == 16 + 3 * 48
    assert plan.total("GPU", grown=True) == 16, "one more GPU node may come"


def test_a_bundle_goes_to_the_smallest_node_type_that_holds_it():
    plan = cluster.plan([{"CPU": 20}], [HEAD], [GPU_NODE, CPU_NODE])
    assert plan.launch == {"cpu_worker": 1}


def test_several_workers_share_a_new_node_when_they_fit_on_it():
    plan = cluster.plan([{"CPU": 1, "GPU": 1, "trainer": 0.25}] * 4, [HEAD], [GPU_NODE])
    assert plan.launch == {"gpu_worker": 1}


def test_more_workers_than_max_workers_allow_are_unplaced():
    plan = cluster.plan([WORKER] * 5, [HEAD], [GPU_NODE, CPU_NODE])
    assert plan.launch == {"gpu_worker": 4} and plan.unplaced == [WORKER]


def test_nodes_of_a_type_already_up_count_against_its_max_workers():
    up = [HEAD] + [dict(GPU_NODE.resources)] * 3
    plan = cluster.plan([WORKER] * 5, up, [GPU_NODE])
    assert plan.launch == {"gpu_worker": 1} and plan.unplaced == [WORKER]


def test_the_clusters_max_workers_caps_every_type():
    plan = cluster.plan([WORKER] * 3, [HEAD], [GPU_NODE, CPU_NODE], max_workers=2)
    assert plan.launch == {"gpu_worker": 2} and plan.unplaced == [WORKER]
    assert plan.nodes == 3, "and no node beyond them"


def test_a_node_type_holds_only_the_resources_it_names():
    no_gpu = NodeType("cpu_worker", {"CPU": 32, "trainer": 1}, max_workers=2)
    assert cluster.plan([WORKER], [HEAD], [no_gpu]).unplaced == [WORKER]
    custom = cluster.plan([{"CPU": 1, "special": 1}], [HEAD], [GPU_NODE])
    assert custom.unplaced == [{"CPU": 1, "special": 1}]


def test_without_an_autoscaler_only_the_nodes_up_count():
    plan = cluster.plan([WORKER, {"CPU": 1}], [HEAD], [])
    assert plan.unplaced == [WORKER] and plan.launch == {} and plan.nodes == 1


def test_an_unbounded_node_type_makes_the_cluster_multi_node():
    plan = cluster.plan([], [HEAD], [NodeType("any", {"CPU": 8}, max_workers=-1)])
    assert plan.nodes == 2


def test_a_local_path_is_refused_on_several_nodes_and_a_uri_is_not():
    cluster.refuse_local("storage_path", "/data/ray_results", 1, "it is read elsewhere", "ray_results")
    cluster.refuse_local("storage_path", "s3://bucket/ray_results", 9, "it is read elsewhere", "ray_results")
    with pytest.raises(ConfigError) as err:
        cluster.refuse_local("storage_path", "/data/ray_results", 2, "it is read elsewhere", "ray_results")
    assert err.value.field == "storage_path" and "s3://" in err.value.fix and "2 nodes" in str(err.value)


def test_describe_groups_bundles_without_memory_bookkeeping():
    assert cluster.describe([WORKER, WORKER, {"CPU": 1}]) == "2 x {CPU: 1, GPU: 4, trainer: 1}, 1 x {CPU: 1}"
    assert cluster.shape(HEAD) == "{CPU: 16}"
