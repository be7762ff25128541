"""Every cluster manifest parses, has its required fields, and agrees with the others and with jobs/configs."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from metaaligner.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def dockerfile_image():
    match = re.search(r"docker build .* -t (\S+) \.", (CLUSTER / "Dockerfile").read_text())
    assert match, "Dockerfile names its image tag in the build comment"
    return match.group(1)


def pod_images(cluster_spec):
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}


def manifests():
    return {
        "raycluster.yaml": load("raycluster.yaml")["spec"],
        "rayjob-pipeline.yaml": load("rayjob-pipeline.yaml")["spec"]["rayClusterSpec"],
        "rayservice.yaml": load("rayservice.yaml")["spec"]["rayClusterConfig"],
    }


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob-pipeline.yaml", "RayJob"),
                                       ("rayservice.yaml", "RayService")])
def test_kuberay_manifest_shape(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = manifests()[name]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in
                  g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, f"{name} has a GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_images_agree_everywhere():
    image = dockerfile_image()
    for name, spec in manifests().items():
        assert pod_images(spec) == {image}, name
    assert load("ray-up-aws.yaml")["docker"]["image"] == image


def test_rayservice_embeds_the_standalone_serve_config():
    embedded = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded == load("serve_config.yaml")
    for app in embedded["applications"]:
        module, attr = app["import_path"].split(":")
        __import__(module)
        cfg = load_config(REPO / app["args"]["config"])
        assert cfg.serve is not None and cfg.serve.num_gpus >= 1


def test_serve_config_files_reference_valid_project_configs():
    for path in [CLUSTER / "serve_config.yaml", REPO / "jobs/configs/serve_app.yaml"]:
        for app in yaml.safe_load(path.read_text())["applications"]:
            assert load_config(REPO / app["args"]["config"]).serve is not None


def test_rayjob_entrypoint_config_fits_its_cluster():
    job = load("rayjob-pipeline.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"] and (REPO / "jobs/pipeline.py").is_file()
    cfg = load_config(REPO / argv[argv.index("--config") + 1])
    assert cfg.reformulate and cfg.train and cfg.evaluate
    gpus = sum(int(g["rayStartParams"].get("num-gpus", 0)) * g["maxReplicas"]
               for g in job["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.train.use_gpu and cfg.train.num_workers <= gpus


def test_ray_up_config():
    cfg = load("ray-up-aws.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"] == "aws"
    assert sum(t.get("max_workers", 0) for t in types.values()) >= cfg["max_workers"] > 0
    for name, t in types.items():
        assert t["node_config"]["InstanceType"], name


@pytest.mark.parametrize("path", sorted((REPO / "jobs/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_validates(path):
    doc = yaml.safe_load(path.read_text())
    if "applications" in doc:  # a Ray Serve config file, checked above
        return
    load_config(path)


def test_job_entrypoints_exist_for_every_command():
    from metaaligner.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for name in ("reformulate", "train", "correct", "evaluate", "serve", "pipeline"):
        assert name in commands and (REPO / "jobs" / f"{name}.py").is_file()
