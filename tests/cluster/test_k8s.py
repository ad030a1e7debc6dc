"""The Kubernetes manifests, the image and the cloud launcher config, checked without a cluster.

Pod templates against Kubernetes' own schemas (kubernetes-validate, strict: an unknown
field fails), the KubeRay fields against the fields of KubeRay's CRDs written out below,
the launcher config against the JSON schema inside the ray package, and the versions in
cluster/Dockerfile against pyproject.toml.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from jobs import k8s
from jobs.cli import main
from jobs.core.spec import spec_from_dict
from tests.conftest import REPO, job_dict, write_job
from tests.test_packaging import packaged

K8S_VERSION = "1.30"  # the oldest Kubernetes that KubeRay 1.6 supports well; its schemas ship in kubernetes-validate

# KubeRay's fields, read in ray-project/kuberay at KubeRay v1.6 (the release that added
# RayCronJob; authOptions came in v1.5.1):
#   ray-operator/apis/ray/v1/rayjob_types.go      RayJobSpec
#   ray-operator/apis/ray/v1/raycluster_types.go  RayClusterSpec, HeadGroupSpec, WorkerGroupSpec
#   ray-operator/config/crd/bases/ray.io_raycronjobs.yaml  RayCronJobSpec (jobTemplate is a RayJobSpec),
#     and authOptions in its rayClusterSpec
# and https://docs.ray.io/en/master/cluster/kubernetes/references/api.html (fields of v1.6.2).
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCRONJOB_SPEC = {"jobTemplate", "schedule", "suspend"}
RAYCRONJOB_REQUIRED = {"jobTemplate", "schedule"}
RAYCLUSTER_SPEC = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}
AUTH_OPTIONS = {"mode"}
AUTH_MODES = {"disabled", "token"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec"}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def kuberay_problems(doc: dict) -> list[str]:
    """Fields of a RayJob/RayCronJob/RayCluster document that KubeRay's CRD does not have, or lacks."""
    problems: list[str] = []

    def check(path: str, node: dict, allowed: set, required: set = frozenset()) -> None:
        problems.extend(f"{path}.{key}: not a field of KubeRay's CRD" for key in node if key not in allowed)
        problems.extend(f"{path}.{key}: required by KubeRay's CRD" for key in required if key not in node)

    def cluster(path: str, spec: dict) -> None:
        check(path, spec, RAYCLUSTER_SPEC, {"headGroupSpec"})
        check(f"{path}.authOptions", spec.get("authOptions", {}), AUTH_OPTIONS)
        if spec.get("authOptions", {}).get("mode", "token") not in AUTH_MODES:
            problems.append(f"{path}.authOptions.mode: not one of {sorted(AUTH_MODES)}")
        groups = [(f"{path}.headGroupSpec", spec.get("headGroupSpec", {}), HEAD_GROUP, HEAD_GROUP_REQUIRED)]
        groups += [(f"{path}.workerGroupSpecs[{i}]", g, WORKER_GROUP, WORKER_GROUP_REQUIRED)
                   for i, g in enumerate(spec.get("workerGroupSpecs", []))]
        for group_path, group, allowed, required in groups:
            check(group_path, group, allowed, required)
            params = group.get("rayStartParams", {})
            problems.extend(f"{group_path}.rayStartParams.{k}: KubeRay wants a string" for k, v in params.items()
                            if not isinstance(v, str))
            problems.extend(f"{group_path}.{k}: not an integer" for k in ("replicas", "minReplicas", "maxReplicas")
                            if k in group and not isinstance(group[k], int))

    def job(path: str, spec: dict) -> None:
        check(path, spec, RAYJOB_SPEC)
        cluster(f"{path}.rayClusterSpec", spec.get("rayClusterSpec", {}))

    check(doc["kind"], doc, TOP_LEVEL)
    if doc["kind"] == "RayJob":
        job("RayJob.spec", doc["spec"])
    elif doc["kind"] == "RayCronJob":
        check("RayCronJob.spec", doc["spec"], RAYCRONJOB_SPEC, RAYCRONJOB_REQUIRED)
        job("RayCronJob.spec.jobTemplate", doc["spec"].get("jobTemplate", {}))
    elif doc["kind"] == "RayCluster":
        cluster("RayCluster.spec", doc["spec"])
    else:
        problems.append(f"{doc['kind']}: not a KubeRay kind")
    return problems


def ray_cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayJob": lambda: spec["rayClusterSpec"], "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"],
            "RayCluster": lambda: spec}[doc["kind"]]()


def pod_templates(doc: dict) -> dict[str, dict]:
    cluster = ray_cluster_spec(doc)
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]})
    return templates


def validate_k8s(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_pod_template(name: str, template: dict) -> None:
    # KubeRay embeds a core/v1 PodTemplateSpec: validated as the template of a PodTemplate.
    validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})


# -- rendering ------------------------------------------------------------------------------------

SPEC_DATA = job_dict("s3://bucket/prompts/", "s3://bucket/out/poems", Path("org/model"),
                     resources={"replicas": 2, "num_gpus": 1, "num_cpus": 4})


def rendered(data: dict = SPEC_DATA, **options) -> list[dict]:
    return k8s.render(data, spec_from_dict(copy.deepcopy(data)), k8s.Options(image="bulkgen:test", **options))


VARIANTS = {
    "rayjob": {},
    "rayjob-cpu": {"data": job_dict("s3://b/in", "s3://b/out", Path("m"))},
    "rayjob-kueue": {"queue": "team-a", "suspend": True, "secret": "storage", "namespace": "jobs"},
    "raycronjob": {"schedule": "0 2 * * *", "secret": "storage"},
    "raycluster": {"kind": "raycluster"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_template_and_the_configmap_validate_against_kubernetes(variant):
    config_map, workload = rendered(**VARIANTS[variant])
    validate_k8s(config_map)
    templates = pod_templates(workload)
    assert set(templates) >= {"head"} and len(templates) == 2
    for name, template in templates.items():
        validate_pod_template(name, template)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kuberay_fields_are_fields_of_the_crd(variant):
    _, workload = rendered(**VARIANTS[variant])
    assert workload["apiVersion"] == "ray.io/v1"
    assert kuberay_problems(workload) == []


def test_the_checks_catch_a_typo():
    _, job = rendered()
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert kuberay_problems(typo) == ["RayJob.spec.shutdownAfterJobFinish: not a field of KubeRay's CRD"]
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert "RayJob.spec.rayClusterSpec.workerGroupSpecs[0].maxReplica: not a field of KubeRay's CRD" in (
        kuberay_problems(typo))
    head = copy.deepcopy(pod_templates(job)["head"])
    head["spec"]["containers"][0]["resourcez"] = head["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resourcez"):
        validate_pod_template("head", head)


def test_rayjob_runs_the_spec_from_the_configmap_and_cleans_up():
    config_map, job = rendered()
    spec = job["spec"]
    assert spec["entrypoint"] == "bulkgen run /etc/bulkgen/job.yaml --no-progress"
    assert spec["shutdownAfterJobFinishes"] is True and spec["suspend"] is False
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["rayClusterSpec"]["rayVersion"] == k8s.RAY_VERSION
    # The ConfigMap holds the spec as written: it loads back to the same job.
    assert spec_from_dict(yaml.safe_load(config_map["data"]["job.yaml"])).fingerprint() == (
        spec_from_dict(copy.deepcopy(SPEC_DATA)).fingerprint())
    for template in pod_templates(job).values():
        pod = template["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/etc/bulkgen"]]["configMap"]["name"] == config_map["metadata"]["name"]


def test_head_runs_no_replica_and_workers_are_sized_from_resources():
    _, job = rendered()
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert k8s.GPU not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    assert workers["rayStartParams"] == {"num-cpus": "4", "num-gpus": "1"}
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits[k8s.GPU] == "1" and limits["cpu"] == "4"
    assert "enableInTreeAutoscaling" not in cluster


def test_cpu_only_workers_ask_for_no_gpu():
    _, job = rendered(job_dict("s3://b/in", "s3://b/out", Path("m"), resources={"replicas": 3, "num_cpus": 2}))
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    assert k8s.GPU not in pod["containers"][0]["resources"]["limits"] and "tolerations" not in pod
    assert workers["replicas"] == 3 and workers["rayStartParams"] == {"num-cpus": "2"}


def test_replicas_sharing_a_gpu_share_a_pod_and_a_range_autoscales():
    data = job_dict("s3://b/in", "s3://b/out", Path("m"), resources={"replicas": "2..6", "num_gpus": 0.5})
    _, job = rendered(data)
    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 3)  # two replicas per one-GPU pod
    assert workers["rayStartParams"] == {"num-cpus": "2", "num-gpus": "1"}
    assert cluster["enableInTreeAutoscaling"] is True


def test_replica_bounds():
    assert k8s.replica_bounds(3) == (3, 3)
    assert k8s.replica_bounds("2..8") == (2, 8)
    assert k8s.replica_bounds("auto") is None
    spec = spec_from_dict(job_dict("s3://b/in", "s3://b/out", Path("m"), resources={"replicas": "2..8"}))
    assert k8s.replica_bounds(spec.resources.replicas) == (2, 8)


def test_kueue_queue_and_suspend():
    _, job = rendered(queue="team-a", suspend=True)
    assert job["metadata"]["labels"][k8s.KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True


def test_storage_secret_reaches_every_ray_container():
    _, job = rendered(secret="storage")
    for template in pod_templates(job).values():
        assert template["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "storage"}}]


def test_cronjob_writes_each_run_to_a_dated_output():
    _, cron = rendered(schedule="0 2 * * *")
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"] == "0 2 * * *"
    entrypoint = cron["spec"]["jobTemplate"]["entrypoint"]
    assert entrypoint.startswith(k8s.ENTRYPOINT + " ")
    # Run by a shell, as Ray runs an entrypoint: print the arguments instead of running bulkgen.
    before = datetime.now(timezone.utc).date().isoformat()
    shell = subprocess.run(["sh", "-c", entrypoint.replace("bulkgen ", "printf '%s\\n' ", 1)],
                           capture_output=True, text=True, check=True)
    after = datetime.now(timezone.utc).date().isoformat()
    assert shell.stdout.splitlines()[-2] == "--set"
    assert shell.stdout.splitlines()[-1] in {f"output.uri=s3://bucket/out/poems/{day}" for day in (before, after)}


def test_names_are_short_dns_labels_with_the_fingerprint():
    spec = spec_from_dict(copy.deepcopy(SPEC_DATA))
    assert k8s.resource_name(spec) == f"test-{spec.fingerprint()[:8]}"
    for name in ("Nightly Poems, v2!", "9-lives", "x" * 80, "---", None):
        data = {**copy.deepcopy(SPEC_DATA), "name": name}
        derived = k8s.resource_name(spec_from_dict(data))
        assert DNS_1035.fullmatch(derived) and len(derived) <= k8s.MAX_NAME, derived
    unnamed = spec_from_dict({**copy.deepcopy(SPEC_DATA), "name": None})
    assert k8s.resource_name(unnamed).startswith("poems-")  # from the output URI


# -- the command line -----------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["k8s", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_parseable_manifests(tmp_path, capsys):
    job = write_job(tmp_path / "job.yaml", SPEC_DATA)
    code, out, err = run_cli(capsys, str(job), "--image", "x")
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert err == ""  # object storage, no storage options: nothing to warn about


def test_cli_bad_spec_exits_2_naming_the_field(tmp_path, capsys):
    job = write_job(tmp_path / "job.yaml", SPEC_DATA)
    code, out, err = run_cli(capsys, str(job), "--image", "x", "--set", "generation.max_new_tokens=0")
    assert code == 2 and out == ""
    assert "generation.max_new_tokens" in err


def test_cli_schedule_renders_a_raycronjob(tmp_path, capsys):
    job = write_job(tmp_path / "job.yaml", SPEC_DATA)
    code, out, _ = run_cli(capsys, str(job), "--image", "x", "--schedule", "30 1 * * *")
    assert code == 0
    cron = list(yaml.safe_load_all(out))[1]
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"] == "30 1 * * *"
    code, out, err = run_cli(capsys, str(job), "--image", "x", "--schedule", "30 1 * * *", "--kind", "raycluster")
    assert code == 2 and "--schedule" in err


def test_cli_warns_about_local_paths(tmp_path, capsys):
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in.parquet"), "s3://b/out", Path("m")))
    code, _, err = run_cli(capsys, str(job), "--image", "x")
    assert code == 0 and "input.uri" in err and "local path" in err


def test_example_manifests_are_what_bulkgen_k8s_renders(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands in the files name the spec relative to the repository
    examples = sorted((REPO / "cluster/kuberay").glob("ray*.yaml"))
    assert [p.name for p in examples] == ["raycluster.yaml", "raycronjob.yaml", "rayjob.yaml"]
    for path in examples:
        command = path.read_text().splitlines()[0].removeprefix("# Rendered by: ")
        argv = shlex.split(command)
        assert argv[:2] == ["bulkgen", "k8s"], path
        code, out, err = run_cli(capsys, *argv[2:])
        assert code == 0, err
        assert list(yaml.safe_load_all(out)) == list(yaml.safe_load_all(path.read_text())), (
            f"{path.relative_to(REPO)} is stale: regenerate it with the command on its first line")


# -- the image and the launcher config ------------------------------------------------------------


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    pins = {}
    for requirement in requirements:
        pinned = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", requirement.split(";")[0].strip())
        assert pinned, f"pyproject.toml: {requirement!r} is not pinned exactly"
        name, version = pinned.groups()
        pins[name.lower()] = version
    return pins


def test_dockerfile_pins_agree_with_pyproject():
    dockerfile = (REPO / "cluster/Dockerfile").read_text()
    pins = pyproject_pins()
    requires_python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    bases = re.findall(r"^FROM rayproject/ray:(\S+) AS base-(\w+)$", dockerfile, re.M)
    assert {variant for _, variant in bases} == {"cpu", "cuda"}
    for tag, _ in bases:
        version, major, minor = re.fullmatch(r"([\d.]+)-py(\d)(\d+)(?:-\w+)?", tag).groups()
        assert version == pins["ray"] == k8s.RAY_VERSION, tag
        assert SpecifierSet(requires_python).contains(f"{major}.{minor}"), tag
    for name, version in re.findall(r"\b([A-Za-z][\w-]*)==([\w.+]+)", dockerfile):
        pinned = pins.get(name.lower())
        assert pinned == version, f"cluster/Dockerfile pins {name}=={version}; pyproject.toml: {pinned}"
    assert "torch==" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile  # the CPU variant's torch
    assert 'BULKGEN_EXTRAS="[vllm]"' in dockerfile and "vllm" in pins  # the CUDA variant installs the vllm extra


def test_dockerignore_keeps_what_the_install_needs():
    kept = {line[1:].rstrip("/") for line in (REPO / "cluster/Dockerfile.dockerignore").read_text().splitlines()
            if line.startswith("!")}
    packages = packaged(tomllib.loads((REPO / "pyproject.toml").read_text()))
    assert {package.split(".")[0] for package in packages} | {"pyproject.toml", "README.md"} <= kept


def launcher_config() -> dict:
    return yaml.safe_load((REPO / "cluster/launcher/aws.yaml").read_text())


def ray_launcher_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())


def test_launcher_config_validates_against_rays_schema():
    config = launcher_config()
    jsonschema.validate(config, ray_launcher_schema())
    # And the way `ray up` checks it: Ray's defaults for the provider filled in first.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    typo = {**config, "head_node_typ": config["head_node_type"]}
    with pytest.raises(jsonschema.ValidationError, match="head_node_typ"):
        jsonschema.validate(typo, ray_launcher_schema())


def test_launcher_config_runs_our_versions_and_no_replica_on_the_head():
    config = launcher_config()
    pins = pyproject_pins()
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pins['ray']}-py311")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("bulkgen[vllm]" in command for command in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
