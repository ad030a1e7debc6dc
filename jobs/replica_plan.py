"""How many replicas a run starts on the cluster it joined, and whether one fits at all.

`resources.replicas` (a count, auto, or MIN..MAX) is resolved against the live
nodes' total resources as the run starts, once the driver has joined Ray: the
number of replica actors to start, and the number the scheduler's balance
counts on (jobs/scheduler.py). Before that, a replica that no node (and no
node type the autoscaler may add) could ever hold is refused with exit 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jobs.core.errors import ClusterError
from jobs.core.spec import ReplicaCount, ResourcesSpec

log = logging.getLogger(__name__)


def plan_for_cluster(resources: ResourcesSpec) -> ReplicaPlan:
    """The replica plan on the cluster this process is connected to; ClusterError when
    one replica could never start there."""
    need = replica_need(resources)
    nodes, node_types = cluster_nodes()
    check_replica_fits(resources.replicas, need, nodes, node_types)
    return plan_replicas(resources.replicas, need, nodes)


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas a run starts, and how many its scheduler counts on."""

    launch: int  # replica actors started at once; those without room stay pending
    expect: int  # ShardScheduler's `replicas`: the ones it leaves shares for while they load
    how: str  # why, for the job record and the log, e.g. "auto: 2 CPUs / 1 per replica"


def replicas_on(node: dict[str, float], need: dict[str, float]) -> int:
    """Replicas that one node of these total resources holds (need: Ray resource -> amount per replica)."""
    # The epsilon: 0.3 / 0.1 is 2.9999999999999996 in floats, and Ray's own accounting is exact.
    return min((int(node.get(name, 0) / amount + 1e-9) for name, amount in need.items() if amount > 0), default=0)


def plan_replicas(count: ReplicaCount, need: dict[str, float], nodes: list[dict[str, float]]) -> ReplicaPlan:
    """Resolve `resources.replicas` on a cluster whose live nodes have these total resources.

    - A count: that many, counted on (as before ranges existed).
    - auto: as many as the nodes hold, node by node (a replica never spans two),
      at least one: GPUs / num_gpus with num_gpus, else CPUs / num_cpus.
    - MIN..MAX: start MAX at once; those without room stay pending, which is the
      demand Ray's autoscaler adds nodes for, and join as the nodes come. The
      scheduler counts on the ones the cluster holds now, kept within MIN..MAX:
      those load in seconds, like the first, and would be starved if it took
      their share; one that needs a new node waits minutes for it, or forever
      (quota, max_workers), and holding shards back for it would keep the ready
      replicas' batches underfilled all that time. A replica that joins later
      still gets work: the balance counts every ready replica."""
    # A replica that asks for nothing (num_cpus 0, no GPU) fits anywhere, without end:
    # count it one per CPU, the most that can usefully run at once.
    sized = need if any(amount > 0 for amount in need.values()) else {"CPU": 1.0}
    holds = sum(replicas_on(node, sized) for node in nodes)
    if count.fixed is not None:
        return ReplicaPlan(count.fixed, count.fixed, f"{count.fixed}, as the spec says (the cluster holds {holds})")
    if count.auto:
        unit = "GPU" if sized.get("GPU", 0) > 0 else "CPU"
        total = sum(node.get(unit, 0) for node in nodes)
        how = f"auto: {total:g} {unit}s / {sized[unit]:g} per replica"
        if holds < int(total / sized[unit] + 1e-9):
            how += f", {holds} fit node by node"  # e.g. a GPU node short of CPUs, or GPU halves on two nodes
        return ReplicaPlan(max(1, holds), max(1, holds), how)
    expect = min(max(holds, count.min), count.max)
    waiting = count.max - min(holds, count.max)
    how = f"{count}: the cluster holds {holds} now" + (f"; {waiting} wait for new nodes" if waiting else "")
    return ReplicaPlan(count.max, expect, how)


def replica_need(res: ResourcesSpec) -> dict[str, float]:
    """The Ray resources one replica actor asks for (jobs/dispatch.py launches it with these)."""
    return {"CPU": res.num_cpus, "GPU": res.num_gpus}


def cluster_nodes() -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """(total resources of each live node, of each node type the autoscaler may add, or None
    when the cluster reports no autoscaler config). Needs a connected Ray."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        # Private API, the one Ray Data's autoscaling reads; None on a cluster without an autoscaler config.
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # an older or newer Ray without it: then no node types are known
        log.debug("no autoscaler config: %s", e)
        config = None
    if config is None or not config.node_group_configs:
        return nodes, None
    groups = [g for g in config.node_group_configs if g.max_count != 0]  # 0: a type it may never add
    return nodes, [{name: float(amount) for name, amount in g.resources.items()} for g in groups]


def check_replica_fits(
    count: ReplicaCount,
    need: dict[str, float],
    nodes: list[dict[str, float]],
    node_types: list[dict[str, float]] | None,
) -> None:
    """Raise ClusterError when one replica could never start: it fits no live node and no node
    type the autoscaler may add. A range is the spec's word that the cluster autoscales: it is
    refused only where the node types are known, so a GPU group scaled to zero is no error."""
    asked = {name: amount for name, amount in need.items() if amount > 0}
    if not asked or any(_fits(asked, node) for node in nodes):
        return
    if node_types is not None and any(_fits(asked, node) for node in node_types):
        return
    if node_types is None and not count.auto and count.fixed is None:  # a range, on a cluster that tells no node types
        log.warning(
            "resources.replicas %s: no node holds one replica (%s) now; they wait for the autoscaler to add one",
            count, _spell(asked),
        )
        return
    shapes = sorted({_spell(node) for node in nodes + (node_types or [])}) or ["no live node"]
    remedy = "lower resources.num_cpus / resources.num_gpus, or add such a node"
    if node_types is None:
        remedy += '; on an autoscaling cluster give resources.replicas as a range, e.g. "1..4", to wait for one'
    raise ClusterError(
        f"resources.replicas {count}: one replica needs {_spell(asked)}, and no node of the cluster "
        f"{'or its autoscaler ' if node_types is not None else ''}has that ({'; '.join(shapes)}), so none "
        f"could ever start; {remedy}"
    )


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return replicas_on(node, need) >= 1


def _spell(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(name, 0):g} {name}" for name in ("CPU", "GPU"))
