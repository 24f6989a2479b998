"""The deployment files in infra/ are valid for their kind and agree with the code and configs they run.

Offline checks, no cluster needed:
* built-in Kubernetes kinds, and every pod template inside a KubeRay resource, against the
  Kubernetes OpenAPI schema (kubernetes-validate, strict: unknown fields fail);
* KubeRay resources against ``KUBERAY``: the part of the KubeRay v1 CRDs (1.6) these
  manifests use, unknown keys rejected as ``kubectl apply --validate=strict`` would;
* the cluster launcher config against Ray's own schema, with Ray's defaults filled in;
* consistency: image, Ray version, token auth, GPU workers vs. the job config's
  ``inference.num_gpus`` and pool size, and that every ``python -m jobs.X`` and
  ``configs/*.yaml`` mentioned exists.
The last tests corrupt a manifest and expect these checks to fail.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import JobConfig, load_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGE = f"ghcr.io/encoder-batch/encoder-batch:{PROJECT['version']}"
K8S_VERSION = "1.30"  # oldest Kubernetes the manifests must apply to
GPU = "nvidia.com/gpu"
NIGHTLY_DATE = "2026-01-01"

MANIFESTS = sorted((INFRA / "kuberay").glob("*.yaml"))
DOCUMENTS = [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_manifest(name: str) -> dict[str, Any]:
    """The single document of ``infra/kuberay/<name>.yaml``."""
    [doc] = yaml.safe_load_all((INFRA / "kuberay" / f"{name}.yaml").read_text())
    return doc


# ---- KubeRay schema (the subset used here) ---------------------------------------------


def obj(*required: str, **properties: Any) -> dict[str, Any]:
    """An object schema with exactly these properties."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


STR, BOOL, NUM = {"type": "string"}, {"type": "boolean"}, {"type": "number"}
COUNT = {"type": "integer", "minimum": 0}
STR_MAP = {"type": "object", "additionalProperties": STR}
OPAQUE = {"type": "object"}  # fields these manifests do not use
POD_TEMPLATE = {"type": "object"}  # checked against Kubernetes' own PodTemplateSpec schema by validate()
METADATA = {
    "type": "object",
    "properties": {"name": STR, "generateName": STR, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP},
    "additionalProperties": False,
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
}
RAY_CLUSTER_SPEC = obj(
    "headGroupSpec",
    rayVersion=STR,
    authOptions=obj(mode={"enum": ["disabled", "token"]}, secretName=STR, enableK8sTokenAuth=BOOL),
    enableInTreeAutoscaling=BOOL,
    autoscalerOptions=obj(
        upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
        idleTimeoutSeconds=COUNT,
        version={"enum": ["v1", "v2"]},
        image=STR,
        imagePullPolicy=STR,
        resources=OPAQUE,
        env={"type": "array"},
        envFrom={"type": "array"},
        securityContext=OPAQUE,
        volumeMounts={"type": "array"},
    ),
    headGroupSpec=obj(
        "template",
        template=POD_TEMPLATE,
        rayStartParams=STR_MAP,
        serviceType=STR,
        headService=OPAQUE,
        enableIngress=BOOL,
    ),
    workerGroupSpecs={
        "type": "array",
        "items": obj(
            "groupName",
            "template",
            groupName=STR,
            replicas=COUNT,
            minReplicas=COUNT,
            maxReplicas=COUNT,
            idleTimeoutSeconds=COUNT,
            numOfHosts=COUNT,
            rayStartParams=STR_MAP,
            template=POD_TEMPLATE,
            scaleStrategy=OPAQUE,
            suspend=BOOL,
        ),
    },
    headServiceAnnotations=STR_MAP,
    gcsFaultToleranceOptions=OPAQUE,
    upgradeStrategy=OPAQUE,
    managedBy=STR,
    suspend=BOOL,
)
RAY_JOB_SPEC = obj(
    entrypoint=STR,
    runtimeEnvYAML=STR,
    rayClusterSpec=RAY_CLUSTER_SPEC,
    clusterSelector=STR_MAP,
    shutdownAfterJobFinishes=BOOL,
    ttlSecondsAfterFinished=COUNT,
    activeDeadlineSeconds={"type": "integer", "minimum": 1},
    backoffLimit=COUNT,
    submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    submitterPodTemplate=POD_TEMPLATE,
    submitterConfig=OPAQUE,
    deletionStrategy=OPAQUE,
    metadata=STR_MAP,
    jobId=STR,
    entrypointNumCpus=NUM,
    entrypointNumGpus=NUM,
    entrypointResources=STR,
    managedBy=STR,
    suspend=BOOL,
)
CRON = {"type": "string", "pattern": r"^\S+( \S+){4}$"}  # five fields, as RayCronJob's parser takes
RAY_CRON_JOB_SPEC = obj("schedule", "jobTemplate", schedule=CRON, jobTemplate=RAY_JOB_SPEC, suspend=BOOL)
KUBERAY = {
    kind: obj("apiVersion", "kind", "metadata", "spec",
              apiVersion={"const": "ray.io/v1"}, kind={"const": kind}, metadata=METADATA, spec=spec)
    for kind, spec in [("RayCluster", RAY_CLUSTER_SPEC), ("RayJob", RAY_JOB_SPEC), ("RayCronJob", RAY_CRON_JOB_SPEC)]
}  # fmt: skip


def job_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayJob specs a resource runs: its own, or the template a RayCronJob stamps out."""
    if doc["kind"] == "RayJob":
        return [doc["spec"]]
    if doc["kind"] == "RayCronJob":
        return [doc["spec"]["jobTemplate"]]
    return []


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayCluster specs a resource creates."""
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    return [job["rayClusterSpec"] for job in job_specs(doc)]


def pod_templates(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for job in job_specs(doc):
        if "submitterPodTemplate" in job:
            yield job["submitterPodTemplate"]
    for spec in cluster_specs(doc):
        yield spec["headGroupSpec"]["template"]
        yield from (group["template"] for group in spec.get("workerGroupSpecs", []))


def validate(doc: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` is valid for its kind."""
    if doc["kind"] not in KUBERAY:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    jsonschema.validate(doc, KUBERAY[doc["kind"]])
    for template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


# ---- consistency checks ---------------------------------------------------------------------


def gpus_per_pod(group: dict[str, Any]) -> int:
    """GPUs one pod of a worker group gets (Kubernetes schedules extended resources by their limit)."""
    containers = group["template"]["spec"]["containers"]
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in containers)


def cluster_problems(spec: dict[str, Any]) -> list[str]:
    """What is wrong with a RayCluster spec beyond its schema."""
    problems = []
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != installed ray {ray.__version__}")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("token authentication is not enabled (authOptions.mode: token)")
    if not spec.get("enableInTreeAutoscaling"):
        problems.append("autoscaling is off (enableInTreeAutoscaling)")
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for container in (c for g in groups for c in g["template"]["spec"]["containers"]):
        if container["image"] != IMAGE:
            problems.append(f"container {container['name']} runs {container['image']}, not {IMAGE}")
    for group in spec.get("workerGroupSpecs", []):
        name, low, high = group["groupName"], group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if not low <= group.get("replicas", low) <= high:
            problems.append(f"{name}: replicas outside minReplicas..maxReplicas")
        if ("gpu" in name) != (gpus_per_pod(group) > 0):
            problems.append(f"{name}: requests {gpus_per_pod(group)} {GPU} per pod")
    if not any(gpus_per_pod(g) for g in spec.get("workerGroupSpecs", [])):
        problems.append(f"no worker group requests {GPU}")
    return problems


def parse_entrypoint(entrypoint: str) -> tuple[str, str, list[str]]:
    """``python -m MODULE --config PATH [--set K=V ...] ...`` -> (MODULE, PATH, overrides)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], f"entrypoint is not `python -m MODULE ...`: {entrypoint}"
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = parser.parse_known_args(argv[3:])
    return argv[2], args.config, args.overrides


def job_config(job: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> JobConfig:
    """The config a RayJob spec runs, resolved with only the environment the job gets.

    Its ``runtimeEnvYAML`` env_vars are the job's environment (plus ``DATE``, which jobs.nightly
    supplies); anything else the config interpolates is removed from this process's environment.
    """
    module, config, overrides = parse_entrypoint(job["entrypoint"])
    env_vars = (yaml.safe_load(job.get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
    referenced = re.findall(r"\$\{(\w+)", (REPO / config).read_text() + " ".join(overrides))
    for name in referenced:
        monkeypatch.delenv(name, raising=False)
    variables = {"DATE": NIGHTLY_DATE} if module == "jobs.nightly" else {}
    return load_config(REPO / config, overrides, variables={**env_vars, **variables})


def gpu_problems(job: dict[str, Any], cfg: JobConfig) -> list[str]:
    """Where the job's GPU worker groups do not fit its model actors."""
    num_gpus = 1 if cfg.inference.num_gpus is None else cfg.inference.num_gpus  # pipeline default on GPU clusters
    _, max_actors = cfg.inference.pool.bounds
    problems = []
    for group in job["rayClusterSpec"].get("workerGroupSpecs", []):
        per_pod = gpus_per_pod(group)
        if not per_pod:
            continue
        if per_pod != num_gpus:
            problems.append(f"{group['groupName']}: {per_pod} GPU per pod, inference.num_gpus is {num_gpus}")
        if max_actors * num_gpus > group.get("maxReplicas", 0) * per_pod:
            problems.append(f"{group['groupName']}: maxReplicas too small for inference.pool max size {max_actors}")
    return problems


# ---- the files as they are ------------------------------------------------------------------


def test_every_manifest_is_found() -> None:
    assert {doc["kind"] for _, doc in DOCUMENTS} >= {"RayCluster", "RayJob", "RayCronJob"}


@pytest.mark.parametrize("doc", [d for _, d in DOCUMENTS], ids=[f"{p.name}:{d['kind']}" for p, d in DOCUMENTS])
def test_manifest_is_valid_for_its_kind(doc: dict[str, Any]) -> None:
    validate(doc)
    for spec in cluster_specs(doc):
        assert cluster_problems(spec) == []


@pytest.mark.parametrize("name", ["rayjob", "nightly-cronjob"])
def test_job_runs_an_existing_config_that_fits_its_gpu_workers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for job in job_specs(load_manifest(name)):
        cfg = job_config(job, monkeypatch)
        assert gpu_problems(job, cfg) == []


def test_nightly_config_scores_one_day_of_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKET", "events-bucket")
    cfg = load_config(REPO / "configs/nightly_s3.yaml", variables={"DATE": NIGHTLY_DATE})
    assert cfg.input.path == f"s3://events-bucket/events/dt={NIGHTLY_DATE}/"
    assert cfg.output.path == "s3://events-bucket/scores/"
    assert re.fullmatch(r"[0-9a-f]{40}", cfg.model.revision), "pin the model to a commit"
    assert (cfg.inference.num_gpus, cfg.inference.pool.bounds, cfg.model.dtype) == (1, (1, 4), "float16")


def test_referenced_modules_and_configs_exist() -> None:
    text = "\n".join(p.read_text() for p in sorted(INFRA.rglob("*")) if p.is_file())
    modules = set(re.findall(r"python -m (jobs\.\w+)", text))
    configs = set(re.findall(r"\bconfigs/[\w./-]+\.yaml", text))
    assert modules >= {"jobs.run", "jobs.nightly", "jobs.submit"}
    assert [m for m in sorted(modules) if not (REPO / (m.replace(".", "/") + ".py")).is_file()] == []
    assert [c for c in sorted(configs) if not (REPO / c).is_file()] == []


def test_dockerfile_builds_on_the_official_ray_image_of_the_tested_version() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    *_, base = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)  # the final stage is the image
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)-(gpu|cu\d+)", base)
    assert match, f"{base} is not an official CUDA image of rayproject/ray"
    assert match["ray"] == ray.__version__
    [declared] = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "ray"]
    assert match["ray"] in declared.specifier
    assert f"{match['py']}.{match['minor']}" in SpecifierSet(PROJECT["requires-python"])
    assert re.search(r"^RUN pip install .*\s'?\.(\[openvino\])?'?$", dockerfile, re.M), "the image must install this package"
    copied = [src for line in re.findall(r"^COPY\s+(.*)$", dockerfile, re.M) for src in line.split()[:-1]]
    assert [src for src in copied if not src.startswith("--") and not (REPO / src).exists()] == []


def test_cluster_launcher_config_is_valid_and_has_gpu_workers() -> None:
    raw = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))  # fills Ray's AWS defaults, as `ray up` does
    validate_config(config)
    assert config["docker"]["image"] == IMAGE
    gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["min_workers"] <= t["max_workers"] for t in gpu_types)
    assert "~/.ray/auth_token" in config["file_mounts"]
    starts = [c for c in (*config["head_start_ray_commands"], *config["worker_start_ray_commands"]) if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


# ---- the checks catch broken files ---------------------------------------------------------


DELETE = ...  # as a value for set_path: remove the key


def set_path(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with the value at ``path`` replaced (or removed, for ``DELETE``)."""
    doc = copy.deepcopy(doc)
    *parents, leaf = path
    node = doc
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


HEAD = ("spec", "headGroupSpec")
CPU_GROUP, GPU_GROUP = ("spec", "workerGroupSpecs", 0), ("spec", "workerGroupSpecs", 1)
CONTAINER = ("template", "spec", "containers", 0)
NIGHTLY_GPU_GROUP = ("spec", "jobTemplate", "rayClusterSpec", "workerGroupSpecs", 1)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (HEAD, DELETE),  # required by the CRD
        ((*CPU_GROUP, "minReplica"), 1),  # typo: unknown field
        ((*GPU_GROUP, "maxReplicas"), "4"),  # wrong type
        (("spec", "enableInTreeAutoscaler"), True),  # typo
        ((*HEAD, *CONTAINER, "imagePullPolicyy"), "Always"),  # typo in a pod template
        ((*GPU_GROUP, *CONTAINER, "name"), DELETE),  # containers need a name
    ],
)
def test_schema_validation_rejects_a_broken_raycluster(path: tuple[str | int, ...], value: Any) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(set_path(load_manifest("raycluster"), path, value))


def test_schema_validation_rejects_a_cronjob_with_a_bad_schedule() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(set_path(load_manifest("nightly-cronjob"), ("spec", "schedule"), "every night"))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "rayVersion"), "2.9.0"),
        (("spec", "authOptions"), DELETE),
        ((*GPU_GROUP, *CONTAINER, "resources", "limits"), {"cpu": "8"}),  # the gpu group without GPUs
        ((*CPU_GROUP, *CONTAINER, "image"), "rayproject/ray:latest"),
    ],
)
def test_consistency_checks_reject_a_drifted_raycluster(path: tuple[str | int, ...], value: Any) -> None:
    assert cluster_problems(set_path(load_manifest("raycluster"), path, value)["spec"]) != []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ((*NIGHTLY_GPU_GROUP, *CONTAINER, "resources", "limits", GPU), "2"),  # config says num_gpus 1
        ((*NIGHTLY_GPU_GROUP, "maxReplicas"), 2),  # config's pool grows to 4 actors
    ],
)
def test_gpu_check_rejects_workers_that_do_not_fit_the_config(
    path: tuple[str | int, ...], value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    [job] = job_specs(set_path(load_manifest("nightly-cronjob"), path, value))
    assert gpu_problems(job, job_config(job, monkeypatch)) != []


def test_config_check_rejects_a_job_missing_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    [job] = job_specs(set_path(load_manifest("nightly-cronjob"), ("spec", "jobTemplate", "runtimeEnvYAML"), ""))
    with pytest.raises(ValueError, match="BUCKET"):
        job_config(job, monkeypatch)
