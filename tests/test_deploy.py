"""The cluster launcher config and the Dockerfile are checked offline with Ray's own validation code."""

import copy
import tomllib

import yaml

from conftest import REPO


def test_cluster_yaml_passes_ray_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = broken["available_node_types"]["head"].pop("node_config")
    try:
        validate_config(prepare_config(broken))
    except Exception as e:  # Ray raises jsonschema's ValidationError for a misspelt key
        assert "node_confg" in str(e) or "node_config" in str(e)
    else:
        raise AssertionError("a misspelt key must fail validation")


def test_the_cluster_runs_the_image_the_dockerfile_builds_with_artnet_installed_in_it():
    import ray

    text = (REPO / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in text
    assert "COPY --chown=ray:users artnet" in text and 'pip install --no-cache-dir ".[search]"' in text
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert config["docker"]["image"].endswith(f"/artnet:{version}"), "the image `make image` builds and pushes"
    assert "docker build -t $(IMAGE) ." in (REPO / "Makefile").read_text()
    assert not config.get("setup_commands") and not config.get("file_mounts"), "nothing installed per node"
    # Training workers asked to take `trainer` (scaling.worker_resource) land on GPU nodes only.
    assert config["available_node_types"]["gpu_worker"]["resources"] == {"trainer": 1}
    assert all("trainer" not in t["resources"] for n, t in config["available_node_types"].items() if n != "gpu_worker")
