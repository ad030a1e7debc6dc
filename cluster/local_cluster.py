"""A Ray cluster on this machine, for trying `bulkgen run --address` and `bulkgen submit`.

A head (with its dashboard, which takes job submissions, on 127.0.0.1) and optional extra nodes, each one `ray start --block` in a session
and process group of its own, so that stopping the cluster ends exactly the
processes it started (never `ray stop`, which ends every Ray on the machine).
One state directory holds all of it:

    state.json    address, nodes (pid, process group, cpus), what a driver needs
    auth_token    the cluster's token, mode 0600: token auth stays on
    ray/          Ray's temp dir (sessions, logs, sockets)
    <node>.log    each `ray start`'s own output

    python -m cluster.local_cluster start [--nodes 1]   # prints the lines to export
    python -m cluster.local_cluster add-node [--num-cpus 1] [--resources '{"big": 1}']
    python -m cluster.local_cluster status
    python -m cluster.local_cluster remove-node node-1 [--kill]
    python -m cluster.local_cluster stop

From Python (tests): `with LocalCluster(dir) as cluster: cluster.add_node()`.

Over 300 lines because starting and, above all, stopping exactly our own
processes (sessions, process groups, reused pids) takes care, and it is kept
in one place with its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import psutil
except ImportError:  # Ray bundles psutil: importing ray puts it on sys.path
    import ray  # noqa: F401, I001  (before psutil)
    import psutil

DEFAULT_DIR = ".ray-local"
HOST = "127.0.0.1"
# Ray's Unix sockets live at <temp dir>/session_<time>_<pid>/sockets/plasma_store.<n>;
# Linux caps their path at 107 bytes, and Ray's part takes up to 67 of them.
MAX_TEMP_DIR_CHARS = 40
LABEL = "bulkgen-local-node"  # Ray node label: which of our nodes a GCS entry is


@dataclass
class Node:
    """One `ray start --block` and every process it started.

    The leader is started in a new session, so its pid is also the id of its
    process group and of its session. Ray's worker processes move to process
    groups of their own but stay in the session: the session is what tells a
    node's processes from the other Rays on this machine."""

    name: str
    pid: int  # the `ray start` process
    pgid: int
    created: float  # the leader's start time: a reused pid is never taken for it
    num_cpus: int
    resources: dict = field(default_factory=dict)
    log: str = ""
    pids: list[int] = field(default_factory=list)  # the node's processes once it was up


class LocalCluster:
    """A head and extra nodes on 127.0.0.1, with token auth, kept in directory `dir`.

    Nothing starts in the constructor: call start_head() (or use it as a
    context manager, which also stops it). `LocalCluster.load(dir)` picks up
    a cluster that another process started."""

    def __init__(self, dir: str | os.PathLike = DEFAULT_DIR, num_cpus: int = 1, object_store_mb: int = 256,
                 timeout: float = 90.0, dashboard: bool = True):
        self.dir = Path(dir).absolute()
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.timeout = timeout
        self.dashboard = dashboard
        self.port: int | None = None
        self.dashboard_port: int | None = None
        self.nodes: list[Node] = []
        self._leaders: dict[str, subprocess.Popen] = {}  # nodes this process started: it reaps them

    # -- what a driver needs -----------------------------------------------------

    @property
    def temp_dir(self) -> Path:
        return self.dir / "ray"

    @property
    def token_path(self) -> Path:
        return self.dir / "auth_token"

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError(f"no head is running for {self.dir}; call start_head() first")
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Where `bulkgen submit --address` (and `ray job submit`) reach this cluster."""
        if self.dashboard_port is None:
            raise RuntimeError(f"no dashboard is running for {self.dir}; start the head with dashboard=True")
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def auth_env(self) -> dict[str, str]:
        """Ray 2.60's token auth: the mode must be set explicitly by every process that connects."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    @property
    def env(self) -> dict[str, str]:
        """The variables a driver (`bulkgen run`) or a submitter (`bulkgen submit`) needs."""
        api = {"RAY_API_SERVER_ADDRESS": self.dashboard_url} if self.dashboard_port else {}
        return {"RAY_ADDRESS": self.address, **api, **self.auth_env}

    def driver_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with `env` set, for a driver subprocess.

        A RAY_AUTH_TOKEN is dropped: Ray prefers it to RAY_AUTH_TOKEN_PATH."""
        base = os.environ if base is None else base
        dropped = ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
        return {**{k: v for k, v in base.items() if k not in dropped}, **self.env}

    def __enter__(self) -> LocalCluster:
        if self.port is None:
            self.start_head()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- starting ------------------------------------------------------------------

    def start_head(self) -> Node:
        if any(map(self.running, self.nodes)):
            raise RuntimeError(f"nodes from {self.dir} are still running; stop them first")
        if len(str(self.temp_dir)) > MAX_TEMP_DIR_CHARS:
            raise ValueError(
                f"state dir {self.dir} is too long for Ray's Unix sockets under {self.temp_dir} "
                f"(at most {MAX_TEMP_DIR_CHARS} characters); pick a shorter --dir"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / ".gitignore").write_text("*\n")  # logs, sockets and the token never get committed
        self._write_token()
        self.nodes = []
        self.port = _free_port()
        head_args = ["--head", f"--port={self.port}", f"--ray-client-server-port={_free_port()}",
                     f"--temp-dir={self.temp_dir}"]
        if self.dashboard:
            self.dashboard_port = _free_port()
            head_args += ["--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}"]
        else:
            self.dashboard_port = None
            head_args.append("--include-dashboard=false")
        head = self._start_and_wait("head", head_args, self.num_cpus, {})
        if self.dashboard:
            try:
                self._wait_for_dashboard(head)
            except BaseException:
                self.kill_node(head)
                raise
        return head

    def add_node(self, num_cpus: int = 1, resources: dict | None = None) -> Node:
        """Start one more node on this machine and wait until the head sees it."""
        taken = {n.name for n in self.nodes}
        name = next(f"node-{i}" for i in range(1, len(taken) + 2) if f"node-{i}" not in taken)
        return self._start_and_wait(name, [f"--address={self.address}"], num_cpus, resources or {})

    def _start_and_wait(self, name: str, args: list[str], num_cpus: int, resources: dict) -> Node:
        node = self._start(name, args, num_cpus, resources)
        self.nodes.append(node)
        self._save()
        try:
            self._wait_for_nodes(node)
        except BaseException:
            self.kill_node(node)  # one that never came up leaves nothing behind but its log
            raise
        return node

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict) -> Node:
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args,
            f"--node-ip-address={HOST}",  # Ray 2.60 still names nodes by the machine's address
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--labels={LABEL}={name}",
            "--dashboard-agent-listen-port=0",  # not the fixed default, which every other Ray here wants too
            "--disable-usage-stats",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(self.auth_env)
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops at once, no 30 s drain
        log = self.dir / f"{name}.log"
        with open(log, "ab") as out:
            leader = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self._leaders[name] = leader
        created = psutil.Process(leader.pid).create_time()
        return Node(name, leader.pid, os.getpgid(leader.pid), created, num_cpus, resources, str(log))

    def _write_token(self) -> None:
        if self.token_path.exists():
            return  # keep the token across restarts: drivers' environments stay valid
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # the same form `ray get-auth-token --generate` writes

    def _wait_for_nodes(self, starting: Node) -> None:
        """Wait until the head sees exactly our running nodes alive; fail early if `starting` exits."""
        want = {n.name for n in self.nodes if self.running(n)}
        deadline = time.monotonic() + self.timeout
        seen: set[str] | None = None
        while time.monotonic() < deadline:
            if not self.running(starting):
                raise RuntimeError(f"`ray start` for {starting.name} exited; its log:\n{_tail(starting.log)}")
            seen = self.alive_nodes(timeout=max(1.0, deadline - time.monotonic()), want=want)
            if seen == want:
                starting.pids = [p.pid for p in self.processes(starting)]
                self._save()
                return
        raise TimeoutError(
            f"{starting.name} did not come up in {self.timeout:.0f}s (alive: {sorted(seen or [])}, "
            f"want {sorted(want)}); its log:\n{_tail(starting.log)}"
        )

    def _wait_for_dashboard(self, head: Node) -> None:
        """Wait until the dashboard's job API answers (it starts after the head's GCS)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (401 without a token is an answer)
            except OSError:
                if not self.running(head):
                    raise RuntimeError(f"the head exited before its dashboard came up; its log:\n{_tail(head.log)}")
                time.sleep(0.5)
        raise TimeoutError(f"the dashboard at {self.dashboard_url} did not answer in {self.timeout:.0f}s; "
                           f"see {self.temp_dir}/session_latest/logs/dashboard.log")

    # -- looking ---------------------------------------------------------------------

    def alive_nodes(self, timeout: float = 30.0, want: set[str] | None = None) -> set[str] | None:
        """Names of our nodes the head counts alive, or None if it cannot be reached.

        Asked from a short-lived driver process, so this process never joins
        Ray. With `want`, that process polls until the answer is `want` or
        `timeout` passes (one connection instead of one per poll)."""
        env = self.driver_env()
        args = [self.address, LABEL, json.dumps(sorted(want) if want is not None else None), str(timeout)]
        try:
            # Past its own deadline the probe still needs to connect (retries ~20 s when the GCS is down).
            done = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True,
                                  timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        return set(json.loads(done.stdout.strip().splitlines()[-1]))

    def running(self, node: Node) -> bool:
        """Whether any process of `node` is still running."""
        return bool(self.processes(node))

    def processes(self, node: Node) -> list[psutil.Process]:
        """The running processes of `node`'s session, in its process group or not."""
        self._reap()
        try:
            if abs(psutil.Process(node.pid).create_time() - node.created) > 0.01:
                return []  # the pid was reused, so the session ended: Linux keeps a live session's id
        except psutil.NoSuchProcess:
            pass  # the leader is gone; what it started may not be
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == node.pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (OSError, psutil.NoSuchProcess):
                continue
        return found

    def _reap(self) -> None:
        for leader in self._leaders.values():
            leader.poll()  # a leader that this process started stays a zombie until waited for

    # -- stopping --------------------------------------------------------------------

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's whole process group at once, as if its machine were lost."""
        self._end([node], grace=0.0)
        self._forget(node)

    def remove_node(self, node: Node, timeout: float = 15.0) -> None:
        """Stop a node: SIGTERM its process group, SIGKILL what is left after `timeout`."""
        self._end([node], grace=timeout)
        self._forget(node)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every node (all at once); raise if any of their processes survive."""
        self._end(self.nodes, grace=timeout)
        self.nodes, self.port, self.dashboard_port = [], None, None
        self._leaders.clear()
        self._save()

    def _end(self, nodes: list[Node], grace: float) -> None:
        if grace > 0:
            self._signal(nodes, signal.SIGTERM)
            self._wait_gone(nodes, grace)
        if self._signal(nodes, signal.SIGKILL):
            left = self._wait_gone(nodes, 10.0)
            if left:
                raise RuntimeError(f"processes {[p.pid for p in left]} of {[n.name for n in nodes]} survived SIGKILL")

    def _signal(self, nodes: list[Node], sig: signal.Signals) -> bool:
        """Send `sig` to the nodes' process groups; False if none of their processes were left."""
        sent = False
        for node in nodes:
            procs = self.processes(node)
            # Signal the group only while processes of our session hold it: the
            # kernel does not reuse a group id that is in use, so it is still ours.
            if any(_pgid(p) == node.pgid for p in procs):
                os.killpg(node.pgid, sig)
            for proc in procs:
                if _pgid(proc) != node.pgid:  # one that left the group: signal it alone
                    try:
                        proc.send_signal(sig)
                    except psutil.NoSuchProcess:
                        pass
            sent = sent or bool(procs)
        return sent

    def _wait_gone(self, nodes: list[Node], timeout: float) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while (left := [p for n in nodes for p in self.processes(n)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def _forget(self, node: Node) -> None:
        self.nodes = [n for n in self.nodes if n.name != node.name]
        self._leaders.pop(node.name, None)
        self._save()

    # -- state -------------------------------------------------------------------------

    def _save(self) -> None:
        state = {
            "address": f"{HOST}:{self.port}" if self.port else None,
            "dashboard": self.dashboard_url if self.dashboard_port else None,
            "env": self.env if self.port else {},
            "num_cpus": self.num_cpus,
            "object_store_mb": self.object_store_mb,
            "nodes": [asdict(n) for n in self.nodes],
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.dir / "state.json")

    @classmethod
    def load(cls, dir: str | os.PathLike = DEFAULT_DIR) -> LocalCluster:
        path = Path(dir).absolute() / "state.json"
        if not path.exists():
            raise FileNotFoundError(f"no local cluster state in {path.parent}; start one with "
                                    f"`python -m cluster.local_cluster start --dir {dir}`")
        state = json.loads(path.read_text())
        cluster = cls(dir, state["num_cpus"], state["object_store_mb"], dashboard=bool(state.get("dashboard")))
        if state["address"]:
            cluster.port = int(state["address"].rsplit(":", 1)[1])
        if state.get("dashboard"):
            cluster.dashboard_port = int(state["dashboard"].rsplit(":", 1)[1])
        cluster.nodes = [Node(**n) for n in state["nodes"]]
        return cluster


# Run by alive_nodes() in its own process: argv = address, label, wanted names (JSON or null), timeout.
_PROBE = """
import json, sys, time, ray
address, label, want, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout
while True:
    alive = sorted(n.get("Labels", {}).get(label, "?") for n in ray.nodes() if n["Alive"])
    if want is None or alive == want or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(alive))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return None


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


# -- command line --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a head (and --nodes extra nodes); print what a driver needs")
    start.add_argument("--num-cpus", type=int, default=1, help="CPUs of the head (default 1)")
    start.add_argument("--nodes", type=int, default=0, help="extra nodes to start (default 0)")
    start.add_argument("--node-cpus", type=int, default=1, help="CPUs of each extra node (default 1)")
    start.add_argument("--object-store-mb", type=int, default=256, help="object store per node (default 256)")
    start.add_argument("--no-dashboard", action="store_true", help="no dashboard (and so no `bulkgen submit`)")
    add = sub.add_parser("add-node", help="start one more node")
    add.add_argument("--num-cpus", type=int, default=1)
    add.add_argument("--resources", type=json.loads, default=None, help='custom resources as JSON: \'{"big": 1}\'')
    remove = sub.add_parser("remove-node", help="stop one extra node")
    remove.add_argument("name", help="a node name from `status`, e.g. node-1")
    remove.add_argument("--kill", action="store_true", help="SIGKILL at once, as if its machine were lost")
    sub.add_parser("status", help="nodes, their processes, and what the head sees")
    sub.add_parser("env", help="print only the export lines, for eval")
    sub.add_parser("stop", help="stop every node of this cluster (only its own processes)")
    args = p.parse_args(argv)

    try:
        if args.command == "start":
            if (Path(args.dir) / "state.json").exists():
                previous = LocalCluster.load(args.dir)
                if any(map(previous.running, previous.nodes)):
                    raise RuntimeError(f"a cluster from {previous.dir} is running; `stop` it, or use another --dir")
            cluster = LocalCluster(args.dir, args.num_cpus, args.object_store_mb, dashboard=not args.no_dashboard)
            cluster.start_head()
            try:
                for _ in range(args.nodes):
                    cluster.add_node(args.node_cpus)
            except BaseException:
                cluster.stop()  # all of it or none
                raise
            _print_start(cluster, args.dir)
            return 0
        cluster = LocalCluster.load(args.dir)
        if args.command == "add-node":
            node = cluster.add_node(args.num_cpus, args.resources)
            print(f"{node.name} is up (pid {node.pid}); the head sees {len(cluster.nodes)} nodes")
        elif args.command == "remove-node":
            node = next((n for n in cluster.nodes[1:] if n.name == args.name), None)
            if node is None:
                names = [n.name for n in cluster.nodes[1:]] or "none"
                raise ValueError(f"no extra node named {args.name!r} (extra nodes: {names}); `stop` ends the head")
            (cluster.kill_node if args.kill else cluster.remove_node)(node)
            print(f"{node.name} killed; the head notices within ~15 s" if args.kill else f"{node.name} stopped")
        elif args.command == "status":
            _print_status(cluster)
        elif args.command == "env":
            print(_exports(cluster))
        elif args.command == "stop":
            count = len(cluster.nodes)
            cluster.stop()
            print(f"stopped {count} node(s); none of their processes are left")
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        print(f"local_cluster: error: {e}", file=sys.stderr)
        return 1
    return 0


def _exports(cluster: LocalCluster) -> str:
    # An exported RAY_AUTH_TOKEN (say, for another cluster) would win over the token file.
    return "\n".join(["unset RAY_AUTH_TOKEN", *(f"export {k}={v}" for k, v in cluster.env.items())])


def _print_start(cluster: LocalCluster, dir: str) -> None:
    print(f"Ray is up at {cluster.address} with {len(cluster.nodes)} node(s); logs and state in {cluster.dir}\n")
    print("A driver needs these (the token is this cluster's own, in a file only you can read):\n")
    print(_exports(cluster))
    print(f"\nbulkgen run JOB.yaml --address {cluster.address}")
    if cluster.dashboard_port:
        print(f"bulkgen submit JOB.yaml --address {cluster.dashboard_url}   (the dashboard: job submission)")
    print()
    print(f"Stop it with: python -m cluster.local_cluster --dir {dir} stop")


def _print_status(cluster: LocalCluster) -> None:
    if not cluster.nodes:
        print(f"no nodes running from {cluster.dir}")
        return
    alive = cluster.alive_nodes(timeout=10)
    print(f"address {cluster.address}; the head sees: {sorted(alive) if alive is not None else 'unreachable'}")
    for node in cluster.nodes:
        procs = len(cluster.processes(node))
        state = f"running ({procs} processes)" if procs else "gone"
        print(f"  {node.name:8} pid {node.pid:<7} pgid {node.pgid:<7} cpus {node.num_cpus} {node.resources or ''} "
              f"{state}  log {node.log}")


if __name__ == "__main__":
    sys.exit(main())
