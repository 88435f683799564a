"""The cluster launcher config and the Dockerfile are checked offline with Ray's own validation code."""

import copy

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


def test_dockerfile_uses_the_ray_image_of_the_installed_ray_and_installs_the_package():
    import ray

    text = (REPO / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in text
    assert "pip install" in text and "COPY --chown=ray:users artnet" in text
    assert f"rayproject/ray:{ray.__version__}-" in (REPO / "cluster.yaml").read_text()
