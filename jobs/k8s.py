"""`bulkgen k8s`: the KubeRay manifests that run a job spec, rendered in one place.

    bulkgen k8s JOB.yaml --image IMAGE                     # ConfigMap + RayJob
    bulkgen k8s JOB.yaml --image IMAGE --schedule CRON     # ConfigMap + RayCronJob (KubeRay >= 1.6)
    bulkgen k8s JOB.yaml --image IMAGE --kind raycluster   # ConfigMap + a long-lived RayCluster

The spec is validated first (a bad one exits 2 and prints nothing), then stored as
written, `--set` overrides applied, in a ConfigMap that every Ray pod mounts at
/etc/bulkgen; the RayJob's entrypoint is `bulkgen run` on that file. Recovery needs
nothing else: a RayJob retried (backoffLimit) or resubmitted after a preemption, a
lost head or a deleted cluster runs the same spec into the same output, and `bulkgen
run` resumes from the output's commit log. The KubeRay fields used here are checked
against the CRDs by tests/cluster/test_k8s.py; cluster/README.md says how to use them.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from jobs.core.errors import BadInput
from jobs.core.spec import JobSpec, ReplicaCount, ResourcesSpec, apply_overrides, load_spec

RAY_VERSION = "2.60.0"  # the ray pin in pyproject.toml and the image's tag (a test keeps them equal)
SPEC_DIR = "/etc/bulkgen"
SPEC_FILE = "job.yaml"
ENTRYPOINT = f"bulkgen run {SPEC_DIR}/{SPEC_FILE} --no-progress"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU = "nvidia.com/gpu"
# KubeRay refuses a RayJob name over 47 characters (its RayCluster adds 6 and must stay
# under 53), and a RayCronJob names its RayJobs "rayjob-<name>-<minutes since epoch>":
# 30 keeps every derived name legal.
MAX_NAME = 30
# The head holds the GCS, the dashboard and the driver (the Ray job's entrypoint), which
# keeps only counts and descriptors, never rows: a small fixed size is enough.
HEAD_CPUS, HEAD_MEMORY_GIB = 2, 8
HEAD_PORTS = [
    {"containerPort": 6379, "name": "gcs-server"},
    {"containerPort": 8265, "name": "dashboard"},  # Ray Jobs API: `bulkgen submit --address http://HEAD:8265`
    {"containerPort": 10001, "name": "client"},
    {"containerPort": 8080, "name": "metrics"},  # KubeRay's default metrics-export-port, for Prometheus
]


@dataclass(frozen=True)
class Options:
    """Everything about the manifests that is not in the job spec."""

    image: str
    kind: str = "rayjob"  # rayjob (a RayCronJob with schedule) or raycluster
    schedule: str | None = None
    namespace: str | None = None
    queue: str | None = None
    secret: str | None = None
    suspend: bool = False
    ttl_seconds: int = 300  # the driver's log is copied to the output, so the cluster need not linger
    active_deadline_seconds: int = 24 * 3600
    backoff_limit: int = 2  # each retry is a new cluster that resumes from the commit log
    replica_memory_gib: int = 16


def render(data: dict, spec: JobSpec, opts: Options) -> list[dict]:
    """The manifests for `spec` (validated from `data`): its ConfigMap first, then what runs it."""
    if opts.schedule and opts.kind != "rayjob":
        raise BadInput("--schedule renders a RayCronJob; leave out --kind raycluster")
    if opts.schedule and opts.queue:
        # KubeRay 1.6's jobTemplate is a bare RayJobSpec: the RayJobs it creates carry no
        # labels of ours, so a queue label on the RayCronJob would reach no workload.
        raise BadInput("--queue cannot reach the RayJobs a RayCronJob creates; give the namespace a Kueue "
                       "LocalQueue named 'default' (Kueue's LocalQueueDefaulting) and leave out --queue")
    name = resource_name(spec)
    labels = {"app.kubernetes.io/name": "bulkgen", "app.kubernetes.io/instance": name,
              "bulkgen/fingerprint": spec.fingerprint()}
    config_map = {**_meta("v1", "ConfigMap", f"{name}-spec", opts, labels),
                  "data": {SPEC_FILE: yaml.safe_dump(data, sort_keys=False)}}
    cluster = cluster_spec(spec.resources, opts, config_map["metadata"]["name"])
    if opts.kind == "raycluster":
        return [config_map, {**_meta("ray.io/v1", "RayCluster", name, opts, labels), "spec": cluster}]
    job = {
        "entrypoint": _entrypoint(data, opts.schedule),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_seconds,
        "activeDeadlineSeconds": opts.active_deadline_seconds,
        "backoffLimit": opts.backoff_limit,
        "rayClusterSpec": cluster,
    }
    if opts.schedule:
        cron = {"schedule": opts.schedule, "suspend": opts.suspend, "jobTemplate": job}
        return [config_map, {**_meta("ray.io/v1", "RayCronJob", name, opts, labels), "spec": cron}]
    if opts.queue:
        labels = {**labels, KUEUE_QUEUE_LABEL: opts.queue}
    return [config_map, {**_meta("ray.io/v1", "RayJob", name, opts, labels), "spec": {**job, "suspend": opts.suspend}}]


def resource_name(spec: JobSpec) -> str:
    """A DNS-1035 label (what KubeRay asks of RayJob names): spec.name, else the output's
    last path part, and the spec's fingerprint, so two different jobs never share one."""
    base = spec.name or spec.output.uri.rstrip("/").rsplit("/", 1)[-1]
    fingerprint = spec.fingerprint()[:8]
    room = MAX_NAME - len(fingerprint) - 1
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    if not slug[:1].isalpha():
        slug = f"bg-{slug}"
    return f"{slug[:room].rstrip('-')}-{fingerprint}"


def cluster_spec(resources: ResourcesSpec, opts: Options, config_map: str) -> dict:
    """A RayClusterSpec: a head that runs no replica and one worker group sized from `resources`."""
    per_pod, cpus, gpus = pod_shape(resources)
    low, high = replica_bounds(resources.replicas) or (1, 1)  # auto: one pod; the job fills the cluster it gets
    pods_low, pods_high = math.ceil(low / per_pod), math.ceil(high / per_pod)
    worker_params = {"num-cpus": str(cpus), **({"num-gpus": str(gpus)} if gpus else {})}
    worker = {
        "groupName": "gpu-workers" if gpus else "cpu-workers",
        "replicas": pods_low,
        "minReplicas": pods_low,
        "maxReplicas": pods_high,
        "rayStartParams": worker_params,
        "template": _pod(_container("ray-worker", opts, cpus, per_pod * opts.replica_memory_gib, gpus, []),
                         config_map, shm=True, gpus=gpus),
    }
    head = {
        # num-cpus 0: Ray places no replica on the head (every replica asks for CPUs or
        # GPUs), so a model never competes with the GCS and the driver for memory, and
        # the head needs no GPU. The driver itself asks for no CPU and still runs there.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod(_container("ray-head", opts, HEAD_CPUS, HEAD_MEMORY_GIB, 0, HEAD_PORTS),
                         config_map, shm=False, gpus=0),
    }
    spec = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},  # KubeRay >= 1.5.1 makes the token Secret and sets it in every pod
        "headGroupSpec": head,
        "workerGroupSpecs": [worker],
    }
    if pods_high > pods_low:  # a MIN..MAX range: Ray's autoscaler adds pods as pending replicas ask
        spec["enableInTreeAutoscaling"] = True
    return spec


def pod_shape(resources: ResourcesSpec) -> tuple[int, int, int]:
    """(replicas per worker pod, CPUs per pod, GPUs per pod).

    One replica per pod, except replicas asking for a fraction of a GPU: as many as
    share one GPU go in one pod, since Kubernetes hands out whole GPUs only."""
    per_pod = int(1 // resources.num_gpus) if 0 < resources.num_gpus < 1 else 1
    gpus = math.ceil(resources.num_gpus * per_pod)
    cpus = max(1, math.ceil(resources.num_cpus * per_pod))  # `ray start --num-cpus` takes a whole number
    return per_pod, cpus, gpus


def replica_bounds(replicas) -> tuple[int, int] | None:
    """(min, max) replicas the spec asks for, or None for `auto` (as many as the cluster holds).
    `replicas`: a ReplicaCount, or anything ReplicaCount.parse reads (3, "2..8", "auto")."""
    count = replicas if isinstance(replicas, ReplicaCount) else ReplicaCount.parse(replicas)
    return None if count.auto else (count.min, count.max)


def _meta(api_version: str, kind: str, name: str, opts: Options, labels: dict) -> dict:
    metadata = {"name": name, **({"namespace": opts.namespace} if opts.namespace else {}), "labels": labels}
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


def _container(name: str, opts: Options, cpus: int, memory_gib: int, gpus: int, ports: list) -> dict:
    # Requests equal to limits: the Guaranteed QoS class KubeRay recommends, so a Ray
    # node is not the first pod the kubelet evicts under memory pressure.
    limits = {"cpu": str(cpus), "memory": f"{memory_gib}Gi", **({GPU: str(gpus)} if gpus else {})}
    container = {
        "name": name,
        "image": opts.image,
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": [{"name": "bulkgen-spec", "mountPath": SPEC_DIR, "readOnly": True}],
    }
    if ports:
        container["ports"] = ports
    if opts.secret:  # storage credentials: the driver and the replicas all read and write the output
        container["envFrom"] = [{"secretRef": {"name": opts.secret}}]
    return container


def _pod(container: dict, config_map: str, shm: bool, gpus: int) -> dict:
    volumes = [{"name": "bulkgen-spec", "configMap": {"name": config_map}}]
    if shm:  # a container's default /dev/shm is 64 MiB: too small for Ray's object store and vLLM
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        shm_mount = {"name": "dshm", "mountPath": "/dev/shm"}
        container = {**container, "volumeMounts": [*container["volumeMounts"], shm_mount]}
    spec = {"containers": [container], "volumes": volumes}
    if gpus:  # GPU node pools are commonly tainted so that only pods asking for GPUs land there
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _entrypoint(data: dict, schedule: str | None) -> str:
    if not schedule:
        return ENTRYPOINT
    # Each scheduled run writes to its own dated directory under output.uri: the same
    # output would only resume a job that already succeeded. A retry on the same UTC day
    # resumes that day's run; the date is expanded by the shell that runs the entrypoint.
    uri = str(data["output"]["uri"]).rstrip("/")
    return f"{ENTRYPOINT} --set " + shlex.quote(f"output.uri={uri}/") + "$(date -u +%Y-%m-%d)"


def _warnings(spec: JobSpec) -> list[str]:
    notes = [f"{field} {uri!r} is a local path: each pod sees its own disk; use object storage (s3://, gs://)"
             for field, uri in (("input.uri", spec.input.uri), ("output.uri", spec.output.uri)) if "://" not in uri]
    if spec.input.storage_options or spec.output.storage_options:
        notes.append("storage_options go into a ConfigMap, which is not secret: pass credentials with --secret")
    return notes


def add_parser(sub) -> None:
    """`bulkgen k8s`, added to the CLI's subcommands."""
    p = sub.add_parser("k8s", help="print KubeRay manifests for a job: ConfigMap + RayJob, RayCronJob or RayCluster")
    p.add_argument("spec", help="job spec YAML file")
    p.add_argument("--image", required=True, help="image with bulkgen and its pinned dependencies (cluster/Dockerfile)")
    p.add_argument("--kind", choices=["rayjob", "raycluster"], default="rayjob",
                   help="rayjob: one run on its own cluster (default); raycluster: a cluster for `bulkgen submit`")
    p.add_argument("--schedule", metavar="CRON",
                   help='run on a schedule, e.g. "0 2 * * *": a RayCronJob (KubeRay >= 1.6)')
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field before it goes into the ConfigMap (repeatable)")
    p.add_argument("--namespace", help="namespace of every resource (default: kubectl's)")
    p.add_argument("--queue", metavar="LOCAL_QUEUE", help="Kueue LocalQueue: labels the RayJob for Kueue to admit")
    p.add_argument("--secret", metavar="NAME", help="Secret whose keys become environment variables in every Ray pod")
    p.add_argument("--suspend", action="store_true", help="create it suspended (Kueue, or you, resume it)")
    p.add_argument("--replica-memory-gib", type=int, default=Options.replica_memory_gib, help="memory per replica")
    p.add_argument("--ttl-seconds", type=int, default=Options.ttl_seconds, help="cluster kept after the job ends")
    p.add_argument("--active-deadline-seconds", type=int, default=Options.active_deadline_seconds)
    p.add_argument("--backoff-limit", type=int, default=Options.backoff_limit, help="retries, each on a new cluster")
    p.set_defaults(func=_cmd_k8s)


def _cmd_k8s(args) -> int:
    spec = load_spec(args.spec, args.overrides)  # a bad spec raises SpecError (exit 2) before any output
    data = apply_overrides(yaml.safe_load(Path(args.spec).read_text()), args.overrides)
    for note in _warnings(spec):
        print(f"bulkgen: warning: {note}", file=sys.stderr)
    opts = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})  # one flag per option
    sys.stdout.write(yaml.dump_all(render(data, spec, opts), Dumper=_BlockDumper, sort_keys=False))
    return 0


class _BlockDumper(yaml.SafeDumper):
    """yaml.safe_dump, with multi-line strings (the ConfigMap's spec file) written as blocks."""

    def ignore_aliases(self, data) -> bool:
        return True  # a dict used twice is written out twice: no &id001 anchors for kubectl readers


_BlockDumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)
