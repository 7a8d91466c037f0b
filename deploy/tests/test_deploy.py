"""Keeps deploy/ honest: the Dockerfile, compose.yaml and the Kubernetes
manifests are parsed and checked against the real server (``BACKSTOP_BIN``).

* every flag they pass to ``backstop`` exists in ``backstop serve --help``;
* every config they bake in, mount or contain passes ``backstop check-config``;
* the ports they expose, publish and probe are the ones in those configs;
* each config is started for real (cluster configs on a real redis-server),
  and every path their probes use is requested, the image's health-check
  script is run against it (and must fail once the server is gone), the gRPC
  health service they probe is asked, and the stop signal must drain it;
* compose's Redis keeps an AOF, grace periods outlast ``shutdown_grace``, and
  the Kubernetes objects validate against the Kubernetes schemas (strict:
  a misspelt field is an error) and select each other's labels and ports.

Renaming a flag, a probe path or a port on either side fails a test here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import grpc
import kubernetes_validate
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

DEPLOY = Path(__file__).resolve().parents[1]
REPO = DEPLOY.parent
# The Python client's generated stubs (Admin/GetCluster) and its test helpers
# (RedisServer), from the source tree: the same code its own suite checks.
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
from backstop._proto import admin_pb2, admin_pb2_grpc  # noqa: E402
from backstop.testing import RedisServer, find_redis  # noqa: E402

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
HEALTHCHECK_SCRIPT = DEPLOY / "healthcheck.sh"

#: Kubernetes releases the manifests must validate against: the oldest we
#: document (gRPC probes are GA from 1.27) and the newest the schemas know.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())

#: Directories on the image's PATH (debian's default).
IMAGE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


# --- the binary -----------------------------------------------------------------------------


def binary() -> str:
    path = os.environ.get("BACKSTOP_BIN", "")
    if not (path and os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"BACKSTOP_BIN={path!r} is not an executable backstop binary (deploy/scripts/test.sh sets it)")
    return path


def run(args: List[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="session")
def serve_flags() -> Set[str]:
    """Every option `backstop serve --help` lists (long and short forms)."""
    out = run([binary(), "serve", "--help"])
    assert out.returncode == 0, out.stderr
    flags: Set[str] = set()
    for short, long in re.findall(r"^\s+(?:(-\w), )?(--[a-z][\w-]*)", out.stdout, re.M):
        flags.add(long)
        if short:
            flags.add(short)
    # If the help format ever changes, say so rather than reporting every flag missing.
    assert {"--config", "--listen", "--http"} <= flags, f"cannot read flags from:\n{out.stdout}"
    return flags


@pytest.fixture(scope="session")
def subcommands() -> Set[str]:
    out = run([binary(), "--help"])
    assert out.returncode == 0, out.stderr
    section = out.stdout.split("Commands:", 1)[1].split("Options:", 1)[0]
    return set(re.findall(r"^\s+([a-z][\w-]*)\s", section, re.M))


def check_config(path: Path, where: str) -> Dict[str, Any]:
    """Runs `backstop check-config` on a config an artifact uses; returns it parsed."""
    out = run([binary(), "check-config", str(path)])
    assert out.returncode == 0, f"{where}: backstop check-config {path} failed:\n{out.stdout}{out.stderr}"
    return tomllib.loads(path.read_text())


def duration(text: str) -> float:
    """Seconds in a duration as the config and compose write them ("10s", "1m30s", "250ms")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text.strip(), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def host_port(addr: str) -> Tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


# --- what an artifact runs ---------------------------------------------------------------------


@dataclass
class Probe:
    """A health probe an artifact defines."""

    where: str
    kind: str  # "http" (GET path on port), "grpc" (health service on port), "script" (the image's script)
    port: int
    path: str = ""  # http, script
    service: str = ""  # grpc


@dataclass
class Launch:
    """How one artifact starts the server, and what it expects of it."""

    where: str
    args: List[str]  # after the binary, e.g. ["serve", "--config", "/etc/backstop/backstop.toml"]
    config_path: str  # the --config path inside the container
    config_source: Path  # the file in this repository that ends up there
    probes: List[Probe] = field(default_factory=list)
    stop_signal: str = "SIGTERM"
    grace: Optional[float] = None  # seconds between the stop signal and SIGKILL
    hostname: Optional[str] = None  # $HOSTNAME in the container (compose's hostname:)

    def config(self) -> Dict[str, Any]:
        return tomllib.loads(self.config_source.read_text())


def config_flag(args: List[str]) -> Optional[str]:
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def flags_used(args: List[str]) -> List[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-")]


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass
class Instruction:
    op: str
    rest: str
    line: int

    def exec_form(self) -> List[str]:
        value = json.loads(self.rest)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def split(self) -> Tuple[Dict[str, str], List[str]]:
        """``--flag=value`` options, then the other words."""
        opts, words = {}, []
        for w in shlex.split(self.rest):
            if w.startswith("--") and not words:
                k, _, v = w[2:].partition("=")
                opts[k] = v
            else:
                words.append(w)
        return opts, words


def parse_dockerfile(text: str) -> List[Instruction]:
    out: List[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        op, _, rest = full.partition(" ")
        out.append(Instruction(op.upper(), rest.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.instructions = parse_dockerfile(path.read_text())
        # ARGs before the first FROM (their defaults) parameterise FROM lines.
        self.args: Dict[str, str] = {}
        for ins in self.instructions:
            if ins.op == "FROM":
                break
            if ins.op == "ARG":
                k, _, v = ins.rest.partition("=")
                self.args[k] = v
        self.stages: List[Tuple[str, Optional[str], List[Instruction]]] = []
        for ins in self.instructions:
            if ins.op == "FROM":
                words = ins.rest.split()
                image = re.sub(r"\$\{(\w+)\}", lambda m: self.args[m.group(1)], words[0])
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                self.stages.append((image, name, []))
            elif self.stages:
                self.stages[-1][2].append(ins)

    @property
    def final(self) -> List[Instruction]:
        return self.stages[-1][2]

    def one(self, op: str) -> Instruction:
        found = [i for i in self.final if i.op == op]
        assert len(found) == 1, f"the runtime stage should have exactly one {op}, has {len(found)}"
        return found[0]

    def copies(self, stage: List[Instruction]) -> List[Tuple[Dict[str, str], List[str], str]]:
        """(options, sources, destination) of each COPY in a stage."""
        out = []
        for ins in stage:
            if ins.op == "COPY":
                opts, words = ins.split()
                out.append((opts, words[:-1], words[-1]))
        return out

    def source_of(self, dest: str) -> Path:
        """The repository file a runtime-stage COPY puts at ``dest``."""
        for opts, sources, d in self.copies(self.final):
            if "from" in opts:
                continue
            for s in sources:
                target = PurePosixPath(d) / PurePosixPath(s).name if d.endswith("/") else PurePosixPath(d)
                if str(target) == dest:
                    return REPO / s
        pytest.fail(f"deploy/Dockerfile: nothing is copied to {dest}")


DOCKER = Dockerfile(DOCKERFILE)


def docker_launch() -> Launch:
    entry = DOCKER.one("ENTRYPOINT").exec_form()
    cmd = DOCKER.one("CMD").exec_form()
    assert entry == ["backstop"], f"deploy/Dockerfile: ENTRYPOINT should be the backstop binary, is {entry}"
    path = config_flag(cmd)
    assert path, "deploy/Dockerfile: CMD passes no --config"
    _, words = DOCKER.one("HEALTHCHECK").split()
    assert words[0] == "CMD", "deploy/Dockerfile: HEALTHCHECK should be CMD [...] (exec form)"
    hc = json.loads(DOCKER.one("HEALTHCHECK").rest.split("CMD", 1)[1])
    return Launch(
        where="deploy/Dockerfile",
        args=cmd,
        config_path=path,
        config_source=DOCKER.source_of(path),
        probes=[script_probe("deploy/Dockerfile HEALTHCHECK", hc)],
        stop_signal=DOCKER.one("STOPSIGNAL").rest,
    )


def script_probe(where: str, command: List[str]) -> Probe:
    """A health check that runs the image's script: [script, PORT, PATH]."""
    assert len(command) == 3, f"{where}: {command} should be [backstop-healthcheck, PORT, PATH], explicit"
    script = command[0]
    dests = [
        d for _, sources, d in DOCKER.copies(DOCKER.final) if any(Path(s).name == HEALTHCHECK_SCRIPT.name for s in sources)
    ]
    assert dests, "deploy/Dockerfile does not copy deploy/healthcheck.sh into the image"
    dest = PurePosixPath(dests[0])
    assert str(dest.parent) in IMAGE_PATH, f"{dest} is not on the image's PATH"
    assert script in (dest.name, str(dest)), f"{where}: runs {script!r}, the image has {dest}"
    return Probe(where, "script", int(command[1]), path=command[2])


# --- compose --------------------------------------------------------------------------------


COMPOSE_DOC: Dict[str, Any] = yaml.safe_load(COMPOSE.read_text())


def compose_backstops() -> Dict[str, Dict[str, Any]]:
    """The services that run the Backstop image (built from deploy/Dockerfile)."""
    return {
        name: svc
        for name, svc in COMPOSE_DOC["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }


def compose_launches() -> List[Launch]:
    out = []
    for name, svc in compose_backstops().items():
        where = f"deploy/compose.yaml service {name}"
        args = svc["command"]
        assert isinstance(args, list), f"{where}: command should be a list (exec form)"
        path = config_flag(args)
        assert path, f"{where}: command passes no --config"
        source = None
        for v in svc.get("volumes", []):
            src, dst = v.split(":")[:2]
            if dst == path:
                source = (COMPOSE.parent / src).resolve()
        assert source is not None and source.is_file(), f"{where}: no volume mounts a file at {path}"
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD", f"{where}: healthcheck should be [CMD, ...]"
        out.append(
            Launch(
                where=where,
                args=args,
                config_path=path,
                config_source=source,
                probes=[script_probe(f"{where} healthcheck", test[1:])],
                stop_signal=svc.get("stop_signal", DOCKER.one("STOPSIGNAL").rest),
                grace=duration(svc.get("stop_grace_period", "10s")),
                hostname=svc.get("hostname"),
            )
        )
    return out


# --- Kubernetes ---------------------------------------------------------------------------


def k8s_files() -> List[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")


def k8s_objects() -> List[Tuple[Path, Dict[str, Any]]]:
    return [(p, d) for p in k8s_files() for d in yaml.safe_load_all(p.read_text()) if d]


OBJECTS = k8s_objects()


def k8s(kind: str, name: Optional[str] = None) -> List[Dict[str, Any]]:
    return [d for _, d in OBJECTS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def backstop_deployment() -> Dict[str, Any]:
    found = k8s("Deployment", "backstop")
    assert len(found) == 1, "deploy/k8s should have one Deployment named backstop"
    return found[0]


def container(workload: Dict[str, Any], name: str) -> Dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    pytest.fail(f"{workload['kind']} {workload['metadata']['name']} has no container {name}")


def container_port(c: Dict[str, Any], port: Any) -> int:
    """A probe's or Service's port (a number or a containerPort's name) as a number."""
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in c["ports"]), f"container {c['name']} has no port {port}"
        return port
    for p in c["ports"]:
        if p.get("name") == port:
            return int(p["containerPort"])
    pytest.fail(f"container {c['name']} has no port named {port!r}")


def k8s_probe(where: str, c: Dict[str, Any], probe: Dict[str, Any]) -> Probe:
    if "grpc" in probe:
        return Probe(where, "grpc", container_port(c, probe["grpc"]["port"]), service=probe["grpc"].get("service", ""))
    if "httpGet" in probe:
        return Probe(where, "http", container_port(c, probe["httpGet"]["port"]), path=probe["httpGet"]["path"])
    pytest.fail(f"{where}: use a grpc or httpGet probe (the server's health service, /healthz or /readyz)")


def k8s_launch(tmp_dir: Path) -> Launch:
    dep = backstop_deployment()
    where = "deploy/k8s Deployment backstop"
    c = container(dep, "backstop")
    args = c.get("command", []) + c["args"]
    path = config_flag(args)
    assert path, f"{where}: args pass no --config"
    pod = dep["spec"]["template"]["spec"]
    mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{where}: nothing is mounted where --config {path} points"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert "configMap" in volume, f"{where}: {path} should come from a ConfigMap"
    key = path[len(mounts[0]["mountPath"].rstrip("/")) + 1 :]
    cms = k8s("ConfigMap", volume["configMap"]["name"])
    assert cms and key in cms[0]["data"], f"{where}: ConfigMap {volume['configMap']['name']} has no key {key}"
    source = tmp_dir / "configmap-backstop.toml"
    source.write_text(cms[0]["data"][key])
    probes = [k8s_probe(f"{where} {kind}", c, c[kind]) for kind in ("readinessProbe", "livenessProbe") if kind in c]
    return Launch(
        where=where,
        args=args,
        config_path=path,
        config_source=source,
        probes=probes,
        grace=float(pod.get("terminationGracePeriodSeconds", 30)),
    )


def prestop_seconds(c: Dict[str, Any]) -> float:
    pre = c.get("lifecycle", {}).get("preStop")
    if not pre:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    if cmd[:1] == ["sleep"]:
        return float(cmd[1])
    pytest.fail(f"cannot tell how long the preStop hook {pre} takes")


@pytest.fixture(scope="session")
def k8s_config_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="backstop-deploy-") as d:
        yield Path(d)


# --- a real server per launch -------------------------------------------------------------------


class Live:
    """The binary started the way an artifact starts it: the artifact's own
    arguments and config, but listening on free loopback ports (and on a
    real local Redis for cluster configs), because the container's
    addresses and Redis host do not exist here."""

    #: Flags whose values are replaced (each takes one value).
    REPLACED = ("--listen", "--http", "--data-dir", "--redis")

    def __init__(self, launch: Launch, tmp: Path, redis_url: Optional[str]) -> None:
        args = list(launch.args)
        for i, a in enumerate(args):
            if a == launch.config_path:
                args[i] = str(launch.config_source)
            elif a.startswith("--config="):
                args[i] = f"--config={launch.config_source}"
        kept: List[str] = []
        skip = False
        for a in args:
            if skip:
                skip = False
                continue
            if a in self.REPLACED:
                skip = True
                continue
            if a.split("=", 1)[0] in self.REPLACED or a in ("--ephemeral", "--reset-state"):
                continue
            kept.append(a)
        kept += ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]
        if "cluster" in launch.config():
            assert redis_url
            kept += ["--redis", redis_url]
        else:
            kept += ["--data-dir", str(tmp / "data")]
        env = dict(os.environ, RUST_LOG="warn")
        if launch.hostname:
            env["HOSTNAME"] = launch.hostname
        self.log = tmp / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary(), *kept], stdout=subprocess.PIPE, stderr=log, env=env, cwd=tmp)
        self.fields: Dict[str, str] = {}
        found = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                if line.startswith("backstop listening"):
                    self.fields = dict(kv.split("=", 1) for kv in line.split()[2:])
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(30) or "grpc" not in self.fields:
            self.proc.kill()
            pytest.fail(f"{launch.where}: the server did not start with {kept}:\n{self.log.read_text()}")

    @property
    def grpc(self) -> str:
        return self.fields["grpc"]

    @property
    def http_port(self) -> int:
        return host_port(self.fields["http"])[1]

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def health(self, service: str) -> int:
        """grpc.health.v1.Health/Check: 1 = SERVING. The request is one string
        field, encoded by hand (no health package needed)."""
        name = service.encode()
        with grpc.insecure_channel(self.grpc) as ch:
            answer = ch.unary_unary("/grpc.health.v1.Health/Check")(b"\x0a" + bytes([len(name)]) + name, timeout=5)
        assert answer[:1] == b"\x08", answer
        return answer[1]

    def cluster(self) -> Any:
        with grpc.insecure_channel(self.grpc) as ch:
            return admin_pb2_grpc.AdminStub(ch).GetCluster(admin_pb2.GetClusterRequest(), timeout=5)

    def stop(self, sig: str, within: float) -> int:
        self.proc.send_signal(getattr(signal, sig))
        try:
            return self.proc.wait(within)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def run_script(port: int, path: str) -> subprocess.CompletedProcess[str]:
    """The image's health-check script, as the container runs it (bash)."""
    return run(["bash", str(HEALTHCHECK_SCRIPT), str(port), path])


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    try:
        find_redis()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    with RedisServer() as r:
        yield r


def all_launches(tmp: Path) -> List[Launch]:
    return [docker_launch(), *compose_launches(), k8s_launch(tmp)]


LAUNCH_IDS = ["dockerfile", *compose_backstops(), "k8s"]


@pytest.fixture(params=range(len(LAUNCH_IDS)), ids=LAUNCH_IDS)
def launch(request: pytest.FixtureRequest, k8s_config_dir: Path) -> Launch:
    return all_launches(k8s_config_dir)[request.param]


# === every artifact ==============================================================================


def test_flags_exist(launch: Launch, serve_flags: Set[str], subcommands: Set[str]) -> None:
    assert launch.args[0] in subcommands, f"{launch.where}: `backstop {launch.args[0]}` is not a command"
    assert launch.args[0] == "serve", f"{launch.where}: should run `backstop serve`"
    unknown = [f for f in flags_used(launch.args) if f not in serve_flags]
    assert unknown == [], f"{launch.where}: `backstop serve --help` has no {unknown}"


def test_config_is_valid_and_reachable(launch: Launch) -> None:
    config = check_config(launch.config_source, launch.where)
    server = config.get("server", {})
    for key in ("listen", "http"):
        assert key in server, f"{launch.where}: set [server] {key} (the defaults listen on 127.0.0.1 only)"
        host, _ = host_port(server[key])
        # In a container, loopback is the container's own: the ports must listen on every interface.
        assert host in ("0.0.0.0", "::"), f"{launch.where}: [server] {key} = {server[key]!r} is unreachable from outside"


def test_probes_use_the_configured_ports(launch: Launch) -> None:
    server = launch.config()["server"]
    ports = {"grpc": host_port(server["listen"])[1], "http": host_port(server["http"])[1]}
    assert launch.probes, f"{launch.where}: no health probe"
    for p in launch.probes:
        want = ports["grpc"] if p.kind == "grpc" else ports["http"]
        assert p.port == want, f"{p.where}: probes port {p.port}, the config serves {p.kind} on {want}"


def test_grace_outlasts_the_drain(launch: Launch) -> None:
    shutdown_grace = duration(launch.config()["server"].get("shutdown_grace", "10s"))
    grace = launch.grace if launch.grace is not None else 10.0  # docker stop's default wait
    extra = 0.0
    if launch.where.startswith("deploy/k8s"):
        extra = prestop_seconds(container(backstop_deployment(), "backstop"))
    assert grace >= shutdown_grace + extra, (
        f"{launch.where}: {grace}s before SIGKILL, but the drain takes up to {shutdown_grace}s"
        + (f" after a {extra}s preStop" if extra else "")
    )


def test_the_server_serves_what_the_probes_ask(launch: Launch, redis: RedisServer, tmp_path: Path) -> None:
    live = Live(launch, tmp_path, redis.url)
    try:
        # What the artifacts' probes request, and the two probe paths the server documents.
        for path in {"/healthz", "/readyz", *(p.path for p in launch.probes if p.kind == "http")}:
            assert live.get(path) == 200, f"{launch.where}: GET {path} is not 200"
        for p in launch.probes:
            if p.kind == "grpc":
                assert live.health(p.service) == 1, f"{p.where}: health of {p.service!r} is not SERVING"
            if p.kind == "script":
                out = run_script(live.http_port, p.path)
                assert out.returncode == 0, f"{p.where}: the health check failed on a serving server: {out.stderr}"
                # Any answer but a 200 is unhealthy (a 503 from a draining server, a 404 here).
                assert run_script(live.http_port, "/no-such-probe-path").returncode != 0, f"{p.where}: passes on a 404"
        if "cluster" in launch.config():
            status = live.cluster()
            assert status.mode == "cluster" and status.redis_reachable, status
            if launch.hostname:
                # The replica id compose relies on: $HOSTNAME and the gRPC port.
                assert status.replica_id == f"{launch.hostname}:{host_port(live.grpc)[1]}", status.replica_id
        port = live.http_port
        grace = duration(launch.config()["server"].get("shutdown_grace", "10s"))
        code = live.stop(launch.stop_signal, within=grace + 5)
        assert code == 0, f"{launch.where}: {launch.stop_signal} should drain and exit 0, got {code}:\n{live.log.read_text()}"
        # ...and a stopped server fails the health check (it can fail at all).
        for p in launch.probes:
            if p.kind == "script":
                assert run_script(port, p.path).returncode != 0, f"{p.where}: passes with no server"
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
            live.proc.wait()


# === Dockerfile ==================================================================================


def test_dockerfile_stages() -> None:
    assert len(DOCKER.stages) >= 2, "deploy/Dockerfile should build in one stage and run in another"
    build_image, build_name, build = DOCKER.stages[0]
    assert build_image.startswith("rust:") and build_name, "the first stage should be a named rust: build stage"
    runtime_image = DOCKER.stages[-1][0]
    assert re.fullmatch(r"debian:[\w.]+-slim", runtime_image), f"runtime image {runtime_image} is not debian:*-slim"
    # Build and runtime on the same Debian release: the binary's glibc must be there.
    assert build_image.rsplit("-", 1)[1] == runtime_image.split(":")[1].split("-")[0]


def test_dockerfile_builds_with_a_supported_rust() -> None:
    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    want = tuple(int(x) for x in manifest["package"]["rust-version"].split("."))
    tag = DOCKER.stages[0][0].split(":")[1].split("-")[0]
    have = tuple(int(x) for x in tag.split("."))
    assert have >= want[: len(have)], f"rust:{tag} is older than Cargo.toml's rust-version {want}"


def docker_excluded(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore keeps ``path`` out of the build context
    (Docker's rules: patterns in order, the last that matches the path or a parent wins)."""

    def regex(pattern: str) -> "re.Pattern[str]":
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            rules.append((neg, regex(line.lstrip("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerfile_copies_what_cargo_needs() -> None:
    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    build = DOCKER.stages[0][2]
    copied: Set[str] = set()
    for opts, sources, _ in DOCKER.copies(build):
        assert "from" not in opts
        copied.update(s.rstrip("/") for s in sources)
    needed = {"Cargo.toml", "Cargo.lock", "build.rs", "proto", "src"}
    needed |= {f"benches/{b['name']}.rs" for b in manifest.get("bench", [])}
    needed |= {b["path"] for b in manifest.get("bin", []) if "path" in b}
    missing = [n for n in needed if not any(n == c or n.startswith(c + "/") for c in copied)]
    assert missing == [], f"deploy/Dockerfile's build stage does not copy {missing}"
    run_steps = " ".join(i.rest for i in build if i.op == "RUN")
    assert re.search(r"cargo build --release --locked --bin backstop\b", run_steps)
    assert "backstop" in [b["name"] for b in manifest["bin"]]


def test_dockerfile_context_has_every_copied_file() -> None:
    for stage in DOCKER.stages:
        for opts, sources, _ in DOCKER.copies(stage[2]):
            if "from" in opts:
                continue
            for s in sources:
                assert (REPO / s).exists(), f"deploy/Dockerfile copies {s}, which does not exist"
                assert not docker_excluded(s), f"{s} is copied but Dockerfile.dockerignore leaves it out of the context"
    # ...and the filter does filter.
    for heavy in ("target/debug/backstop", ".ci/.cache", "clients/typescript/node_modules"):
        assert docker_excluded(heavy), f"{heavy} would be sent to the Docker daemon"


def test_dockerfile_runtime() -> None:
    launch = docker_launch()
    config = check_config(launch.config_source, "deploy/Dockerfile")
    # A non-root user, numeric (Kubernetes' runAsNonRoot can check it), created in the image.
    user = DOCKER.one("USER").rest.split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}: use a numeric, non-root uid"
    runs = " ".join(i.rest for i in DOCKER.final if i.op == "RUN")
    assert re.search(rf"useradd\b.*--uid {user}\b", runs), f"no user with uid {user} is created"
    # The binary lands on PATH, where ENTRYPOINT finds it.
    bins = [d for o, s, d in DOCKER.copies(DOCKER.final) if o.get("from") == DOCKER.stages[0][1]]
    assert bins and str(PurePosixPath(bins[0]).parent) in IMAGE_PATH and PurePosixPath(bins[0]).name == "backstop"
    # The ports the config listens on are the ones exposed.
    exposed = {int(p.split("/")[0]) for p in DOCKER.one("EXPOSE").rest.split()}
    server = config["server"]
    assert exposed == {host_port(server["listen"])[1], host_port(server["http"])[1]}
    # The state store is a volume the user owns.
    volumes = DOCKER.one("VOLUME").exec_form()
    assert server["data_dir"] in volumes, f"data_dir {server['data_dir']} is not a VOLUME"
    assert re.search(rf"install -d -o \w+ .*{re.escape(server['data_dir'])}", runs)
    # SIGTERM is what starts the server's drain.
    assert DOCKER.one("STOPSIGNAL").rest in ("SIGTERM", "SIGINT")


def test_healthcheck_script_is_the_one_tested() -> None:
    # The image runs deploy/healthcheck.sh under bash (its /dev/tcp); the test runs the same file.
    assert HEALTHCHECK_SCRIPT.read_text().startswith("#!/bin/bash\n")
    copies = [(o, s) for o, s, _ in DOCKER.copies(DOCKER.final) if "deploy/healthcheck.sh" in s]
    assert copies and copies[0][0].get("chmod") == "0755", "copy the script with --chmod=0755"


# === compose ====================================================================================


def test_compose_three_replicas_on_one_redis() -> None:
    services = compose_backstops()
    assert len(services) == 3, f"compose.yaml should run three replicas, runs {sorted(services)}"
    build = next(iter(services.values()))["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # One replica id each: the config must not pin one, and each service has its own hostname.
    for launch in compose_launches():
        assert "replica_id" not in launch.config()["cluster"], f"{launch.where}: a shared replica_id would collide"
    hostnames = [s.get("hostname") for s in services.values()]
    assert None not in hostnames and len(set(hostnames)) == 3, f"each replica needs its own hostname: {hostnames}"
    # Its own host ports each, mapped to the ports the config listens on.
    published: List[str] = []
    for launch, svc in zip(compose_launches(), services.values()):
        server = launch.config()["server"]
        want = {host_port(server["listen"])[1], host_port(server["http"])[1]}
        targets = set()
        for p in svc["ports"]:
            parts = str(p).split(":")
            published.append(":".join(parts[:-1]))
            targets.add(int(parts[-1]))
        assert targets == want, f"{launch.where}: publishes container ports {targets}, the config serves {want}"
    assert len(published) == len(set(published)), f"host ports collide: {published}"


def test_compose_redis_keeps_an_aof() -> None:
    redis = COMPOSE_DOC["services"]["redis"]
    cmd = redis["command"]
    opts = {cmd[i].lstrip("-"): cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("--")}
    assert opts.get("appendonly") == "yes", "compose's Redis should run with --appendonly yes"
    assert opts.get("appendfsync") in ("everysec", "always"), "--appendfsync everysec (or always)"
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", [])), "Redis' /data should be a volume"
    assert redis.get("healthcheck"), "Redis needs a health check for depends_on: service_healthy"
    port = int(opts.get("port", 6379))
    for name, svc in compose_backstops().items():
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
    for launch in compose_launches():
        url = launch.config()["cluster"]["redis_url"]
        m = re.fullmatch(r"redis://([^:/]+)(?::(\d+))?(/\d+)?", url)
        assert m and m.group(1) in ("redis", redis.get("hostname")), f"{launch.where}: {url} is not the redis service"
        assert int(m.group(2) or 6379) == port


# === Kubernetes ==================================================================================


def test_k8s_manifests_parse_and_validate() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in k8s_files()), "kustomization.yaml lists every manifest"
    assert OBJECTS, "no manifests"
    for path, obj in OBJECTS:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path.name}: {obj['kind']} {obj['metadata']['name']} is not valid for Kubernetes {version}: {e.message}")


def labels_select(selector: Dict[str, str], labels: Dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_k8s_deployment(k8s_config_dir: Path) -> None:
    dep = backstop_deployment()
    spec = dep["spec"]
    assert spec["replicas"] == 3
    pod_labels = spec["template"]["metadata"]["labels"]
    assert labels_select(spec["selector"]["matchLabels"], pod_labels)
    c = container(dep, "backstop")
    launch = k8s_launch(k8s_config_dir)
    server = check_config(launch.config_source, "ConfigMap backstop-config")["server"]
    assert container_port(c, "grpc") == host_port(server["listen"])[1]
    assert container_port(c, "http") == host_port(server["http"])[1]
    scrape = spec["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in scrape:
        assert int(scrape["prometheus.io/port"]) == host_port(server["http"])[1], "Prometheus would scrape the wrong port"
    kinds = {p.where.rsplit(" ", 1)[1]: p for p in launch.probes}
    ready, live = kinds.get("readinessProbe"), kinds.get("livenessProbe")
    assert ready and (ready.kind == "grpc" or ready.path == "/readyz"), "readiness: gRPC health or /readyz"
    assert live and live.kind == "http" and live.path == "/healthz", "liveness: GET /healthz"
    res = c["resources"]
    assert res["requests"].get("cpu") and res["requests"].get("memory") and res["limits"].get("memory")
    # The image's user, enforced.
    sc = spec["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and str(sc["runAsUser"]) == DOCKER.one("USER").rest.split(":")[0]
    # A read-only root needs the image's data directory mounted writable.
    data_dir = docker_launch().config()["server"]["data_dir"]
    if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        assert any(m["mountPath"] == data_dir for m in c["volumeMounts"]), f"mount a volume at {data_dir}"


def test_k8s_services_and_pdb_select_the_pods() -> None:
    dep = backstop_deployment()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    c = container(dep, "backstop")
    services = [s for s in k8s("Service") if labels_select(s["spec"]["selector"], pod_labels)]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert headless, "a headless Service (clusterIP: None) for client-side load balancing"
    grpc_port = container_port(c, "grpc")
    assert any(container_port(c, p.get("targetPort", p["port"])) == grpc_port for p in headless[0]["spec"]["ports"])
    # The headless name resolves to the pods on the port clients use: the container's gRPC port.
    assert any(p["port"] == grpc_port for p in headless[0]["spec"]["ports"])
    for s in services:
        for p in s["spec"]["ports"]:
            container_port(c, p.get("targetPort", p["port"]))  # every target port exists
    pdbs = [p for p in k8s("PodDisruptionBudget") if labels_select(p["spec"]["selector"]["matchLabels"], pod_labels)]
    assert len(pdbs) == 1, "one PodDisruptionBudget for the replicas"
    pdb = pdbs[0]["spec"]
    if "minAvailable" in pdb:
        # Equal to the replica count, it would block every node drain.
        assert 0 < int(pdb["minAvailable"]) < dep["spec"]["replicas"]
    else:
        assert int(pdb["maxUnavailable"]) >= 1


def test_k8s_redis(k8s_config_dir: Path) -> None:
    launch = k8s_launch(k8s_config_dir)
    url = launch.config()["cluster"]["redis_url"]
    m = re.fullmatch(r"redis://([^:/]+)(?::(\d+))?(/\d+)?", url)
    assert m, url
    host, port = m.group(1), int(m.group(2) or 6379)
    svc = k8s("Service", host.split(".")[0])
    assert svc, f"redis_url names {host}, but deploy/k8s has no such Service (or point it at a managed Redis)"
    sets = [s for s in k8s("StatefulSet") if labels_select(svc[0]["spec"]["selector"], s["spec"]["template"]["metadata"]["labels"])]
    assert len(sets) == 1, f"Service {host} should select the Redis StatefulSet"
    redis = container(sets[0], "redis")
    sp = next(p for p in svc[0]["spec"]["ports"] if p["port"] == port)
    assert container_port(redis, sp.get("targetPort", port)) == 6379
    args = redis.get("command", []) + redis.get("args", [])
    opts = {args[i].lstrip("-"): args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert opts.get("appendonly") == "yes" and opts.get("appendfsync") in ("everysec", "always")
    assert any(m["mountPath"] == "/data" for m in redis["volumeMounts"])
    assert sets[0]["spec"].get("volumeClaimTemplates"), "Redis' AOF should be on a persistent volume"
