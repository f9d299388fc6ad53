"""The deployment files, checked by what would refuse them first (no cluster, container engine
or systemd manager can run here):

- every manifest under examples/kubernetes against the Kubernetes API's own schemas
  (kubernetes_validate's Python API, strict: an unknown field is an error, as with `kubectl
  apply --validate=strict`), at KUBERNETES_VERSION;
- the systemd unit through `systemd-analyze verify`, byte for byte as shipped. verify refuses a
  unit whose ExecStart is not an executable file, and the shipped one names the install path
  (/opt/otelwater/.venv/bin/otelwater), which this machine does not have. Rather than rewrite
  the unit, the test verifies it against a throwaway root (`--root`) holding the host's unit
  directory and an executable at exactly that path, and first shows that the same root without
  it is refused: so the root is the one verify looks in, and nothing but the path is faked;
- the privileges: the capabilities the unit, the DaemonSet and the sidecar grant are exactly
  otelwater.probes.host.AGENT_CAPABILITIES, the agent's own list (no fallback: without it the
  test fails), and the host paths they expose are the same few, read-only; the hardening keeps
  what BCC and the agent need;
- the Containerfile installs the checkout with scripts/setup.sh and runs the agent that script
  installs (CI runs the same script, so it exercises what the image build runs).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "examples" / "kubernetes"
UNIT = ROOT / "examples" / "systemd" / "otelwater-agent.service"
CONTAINERFILE = ROOT / "Containerfile"

# The oldest version pyproject's kubernetes-validate (>=1.30) has schemas for, and the first with
# everything the manifests use: native sidecars (restartPolicy: Always on an init container,
# 1.29) and the securityContext fields of 1.30
KUBERNETES_VERSION = "1.30"
# The host paths the agent reads: BTF, tracefs, the kernel headers BCC compiles against and
# where their links point (the unit's ReadOnlyPaths=, the manifests' read-only hostPath mounts)
HOST_PATHS = {"/sys/kernel/btf/vmlinux", "/sys/kernel/tracing", "/lib/modules", "/usr/src"}


# --- Kubernetes -------------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in manifest_files() for d in documents(p)]


def doc_id(item) -> str:
    name, doc = item
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_templates() -> list[tuple[str, dict, dict]]:
    """(file, workload, pod spec) of every workload in the manifests."""
    out = []
    for name, doc in all_documents():
        spec = doc.get("spec", {})
        if doc["kind"] == "Pod":
            out.append((name, doc, spec))
        elif "template" in spec:
            out.append((name, doc, spec["template"]["spec"]))
    return out


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod.get("containers", [])


def is_agent(container: dict) -> bool:
    """An otelwater agent container: its image is the one the Containerfile builds."""
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == "otelwater-agent"


def agent_pods() -> list[tuple[str, dict, dict, dict]]:
    """(file, workload, pod spec, agent container) of every agent in the manifests."""
    return [(f, w, pod, c) for f, w, pod in pod_templates() for c in containers(pod)
            if is_agent(c)]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def agent_capabilities() -> set[str]:
    """otelwater.probes.host.AGENT_CAPABILITIES, the one list the unit and manifests copy."""
    from otelwater.probes import host

    caps = getattr(host, "AGENT_CAPABILITIES", None)
    if caps is None:
        pytest.fail("otelwater.probes.host.AGENT_CAPABILITIES is missing: it is the list of "
                    "capabilities the agent needs, which the systemd unit and the Kubernetes "
                    "manifests must grant exactly; define it there")
    assert caps and all(re.fullmatch(r"CAP_[A-Z_]+", c) for c in caps), caps
    assert "CAP_SYS_ADMIN" not in caps
    return set(caps)


def test_kubernetes_validate_has_the_pinned_version():
    versions = {kv_utils.major_minor(v) for v in kv_utils.all_versions()}
    assert KUBERNETES_VERSION in versions, (
        f"kubernetes-validate {kubernetes_validate.version.__version__} has schemas for "
        f"{min(versions)}..{max(versions)}, not {KUBERNETES_VERSION}: pin one it has here")


def test_the_manifests_are_there():
    names = {p.name for p in manifest_files()}
    assert {"daemonset.yaml", "sidecar.yaml", "collector-gateway.yaml"} <= names, names
    for path in manifest_files():
        assert documents(path), f"{path.name}: no documents"
    kinds = {(f, w["kind"]) for f, w, _, _ in agent_pods()}
    assert ("daemonset.yaml", "DaemonSet") in kinds and ("sidecar.yaml", "Deployment") in kinds


@pytest.mark.parametrize("item", all_documents(), ids=doc_id)
def test_manifest_is_valid_for_kubernetes(item):
    name, doc = item
    try:
        checked = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(top)"
        pytest.fail(f"{doc_id(item)} is not valid for Kubernetes {e.version}: {where}: "
                    f"{e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{doc_id(item)}: {e.message}")
    assert checked == KUBERNETES_VERSION


def test_manifests_grant_exactly_the_agent_capabilities(agent_capabilities):
    for file, workload, _, c in agent_pods():
        where = f"{file}: {c['name']}"
        sc = c["securityContext"]
        caps = sc["capabilities"]
        # Kubernetes names capabilities without their CAP_ prefix
        assert {f"CAP_{n}" for n in caps["add"]} == agent_capabilities, where
        assert len(caps["add"]) == len(set(caps["add"])), where
        assert caps["drop"] == ["ALL"], f"{where}: every other capability is dropped"
        assert sc.get("privileged", False) is False, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        # Kubernetes adds capabilities to uid 0 only (no ambient capabilities for others)
        assert sc.get("runAsUser") == 0, where


def test_agents_see_processes_but_not_the_host_network():
    for file, workload, pod, _ in agent_pods():
        assert not pod.get("hostNetwork"), file
        assert not pod.get("hostIPC"), file
        if workload["kind"] == "DaemonSet":
            assert pod.get("hostPID") is True, f"{file}: the node's processes need hostPID"
        else:
            assert pod.get("shareProcessNamespace") is True, \
                f"{file}: a sidecar sees its service through shareProcessNamespace"
            assert not pod.get("hostPID"), file


def test_host_paths_are_the_units_and_read_only():
    unit_paths = {p.lstrip("-") for p in unit_values("Service", "ReadOnlyPaths")}
    assert unit_paths == HOST_PATHS, unit_paths
    for file, _, pod, agent in agent_pods():
        host = {v["name"]: v["hostPath"]["path"] for v in pod.get("volumes", [])
                if "hostPath" in v}
        assert set(host.values()) == HOST_PATHS, f"{file}: {sorted(host.values())}"
        mounts = {m["name"]: m for m in agent["volumeMounts"]}
        for volume, path in host.items():
            assert mounts[volume]["mountPath"] == path, f"{file}: {volume} at its host path"
            assert mounts[volume].get("readOnly") is True, f"{file}: {path} must be read-only"
        for c in containers(pod):
            if not is_agent(c):
                assert not {m["name"] for m in c.get("volumeMounts", [])} & set(host), \
                    f"{file}: {c['name']} mounts a host path"


def test_agent_settings_load_and_serve_where_the_probes_look(tmp_path):
    from otelwater.agent.health import HEALTHZ, READYZ
    from otelwater.cli_agent import parse_listen
    from otelwater.config import load_config

    configmaps = {(d["metadata"]["namespace"], d["metadata"]["name"]): d
                  for _, d in all_documents() if d["kind"] == "ConfigMap"}
    for file, workload, pod, agent in agent_pods():
        args = agent.get("args", [])
        config_file = None
        if "--config" in args:        # a ConfigMap's file, read by otelwater's own loader
            path = Path(args[args.index("--config") + 1])
            volume = next(m["name"] for m in agent["volumeMounts"]
                          if m["mountPath"] == str(path.parent))
            source = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == volume)
            data = configmaps[(workload["metadata"]["namespace"], source)]["data"]
            config_file = tmp_path / path.name
            config_file.write_text(data[path.name])
        flags = {"agent.listen": args[args.index("--listen") + 1] if "--listen" in args
                 else None}
        config = load_config(str(config_file) if config_file else None, env={}, flags=flags)
        address, port = parse_listen(config.agent.listen)
        assert address == "0.0.0.0", f"{file}: the kubelet reaches the pod's address"
        ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
        for probe, path in (("livenessProbe", HEALTHZ), ("readinessProbe", READYZ)):
            if probe not in agent:
                continue
            get = agent[probe]["httpGet"]
            assert get["path"] == path, f"{file}: {probe}"
            assert ports[get["port"]] == port, f"{file}: {probe} on the agent's port"
        assert "livenessProbe" in agent, file


def test_agents_send_to_the_gateway_service():
    services = {(d["metadata"]["name"], d["metadata"]["namespace"]): d
                for _, d in all_documents() if d["kind"] == "Service"}
    for file, _, _, agent in agent_pods():
        env = env_of(agent)
        url = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc", file
        name, namespace = url.hostname.split(".")[:2]
        service = services.get((name, namespace))
        assert service, f"{file}: no Service {name} in namespace {namespace}"
        grpc = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        assert grpc and grpc[0].get("appProtocol") == "grpc", f"{file}: {url.netloc}"


# --- systemd ----------------------------------------------------------------------------------

def unit_values(section: str, key: str) -> list[str]:
    """Every item assigned to `key` in `section`, in order, as systemd reads lists (an empty
    assignment resets the list)."""
    values: list[str] = []
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        if current == section and k.strip() == key:
            values = [] if not v.strip() else values + shlex.split(v)
    return values


def unit_value(section: str, key: str) -> str | None:
    values = unit_values(section, key)
    return " ".join(values) if values else None


def unit_lines(section: str, key: str) -> list[str]:
    """Each assignment of `key` as written (SystemCallFilter= lines add and remove in order)."""
    out, current = [], None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.partition("=")[0].strip() == key:
            out.append(line.partition("=")[2].strip())
    return out


def exec_start() -> list[str]:
    (line,) = unit_lines("Service", "ExecStart")
    return shlex.split(line.lstrip("-@:+!"))


def test_unit_grants_exactly_the_agent_capabilities(agent_capabilities):
    assert set(unit_values("Service", "AmbientCapabilities")) == agent_capabilities
    assert set(unit_values("Service", "CapabilityBoundingSet")) == agent_capabilities
    assert unit_value("Service", "NoNewPrivileges") == "yes"
    user = unit_value("Service", "User")
    assert unit_value("Service", "DynamicUser") == "yes" or (user and user not in ("root", "0"))


def test_unit_runs_the_agent_setup_installs():
    command = exec_start()
    assert command[0].endswith("/.venv/bin/otelwater") and command[1] == "agent", command


def test_unit_hardening_keeps_what_bcc_and_the_agent_need():
    v = lambda key: unit_value("Service", key)  # noqa: E731
    assert v("ProtectSystem") == "strict" and v("PrivateTmp") == "yes"  # BCC writes /tmp only
    # other users' /proc/PID is the agent's work, and BCC reads /proc beyond the pids
    assert v("ProtectProc") in (None, "default"), "the agent reads other users' /proc/PID"
    assert v("ProcSubset") in (None, "all"), "BCC reads /proc outside the pid directories"
    # /lib/modules holds the kernel headers BCC compiles against
    assert v("ProtectKernelModules") in (None, "no"), "ProtectKernelModules hides /lib/modules"
    # capabilities in a user namespace load no BPF program
    assert v("PrivateUsers") in (None, "no")
    assert v("PrivateNetwork") in (None, "no"), "it exports OTLP and serves /metrics"
    families = unit_values("Service", "RestrictAddressFamilies")
    assert families and not families[0].startswith("~"), families
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families), families


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    return tool


def syscall_groups(tool: str) -> dict[str, list[str]]:
    text = subprocess.run([tool, "syscall-filter"], capture_output=True, text=True,
                          check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line[0].isspace() and item.startswith("@"):
            current = groups.setdefault(item, [])
        elif current is not None:
            current.append(item)
    return groups


def test_unit_system_call_filter_lets_the_agent_work(systemd_analyze):
    """The filter's lines add and remove in order (the first sets allow-list mode): what BCC and
    the agent call beyond a service's usual set must survive them all."""
    groups = syscall_groups(systemd_analyze)

    def expand(item: str) -> set[str]:
        return set().union(*(expand(i) for i in groups[item])) if item.startswith("@") \
            else {item}

    lines = unit_lines("Service", "SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "an allow list"
    allowed: set[str] = set()
    for line in lines:
        deny = line.startswith("~")
        names = set().union(*(expand(i) for i in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    # bpf: maps, programs, attachment; pidfd_getfd: a traced process's socket, read in its own
    # network namespace; perf_event_open: uprobes; the rest what Python and BCC run on
    needed = {"bpf", "pidfd_getfd", "perf_event_open", "mmap", "openat", "socket", "sendmsg",
              "recvmsg", "epoll_wait", "clone", "getdents64", "readlinkat", "ioctl"}
    assert needed <= allowed, sorted(needed - allowed)


def test_unit_verifies(systemd_analyze, tmp_path):
    units = next((Path(d) for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
                  if Path(d, "sysinit.target").exists()), None)
    if units is None:
        pytest.skip("no systemd unit directory to verify against (sysinit.target)")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    installed = root / "etc/systemd/system" / UNIT.name
    installed.parent.mkdir(parents=True)
    shutil.copyfile(UNIT, installed)
    command = [systemd_analyze, "verify", "--man=no", f"--root={root}",
               f"/etc/systemd/system/{UNIT.name}"]

    def verify() -> tuple[int, str]:
        r = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return r.returncode, (r.stdout + r.stderr).strip()

    # Without the ExecStart binary in the root, verify refuses it: it looks in the root
    rc, out = verify()
    assert rc != 0 and "is not executable" in out, (rc, out)
    # With an executable at exactly the unit's ExecStart path: clean, no warning either (verify
    # only warns, exit 0, on an unknown key or a value it cannot parse)
    binary = root / exec_start()[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    rc, out = verify()
    assert (rc, out) == (0, ""), out


# --- Containerfile ----------------------------------------------------------------------------

def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments left out."""
    out, pending = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        inst, _, args = text.partition(" ")
        out.append((inst.upper(), args.strip()))
    return out


def test_containerfile_builds_with_setup_and_runs_the_agent():
    import tomllib

    steps = containerfile()
    assert steps[0][0] == "FROM" and re.fullmatch(r"debian:(12|bookworm)(-\w+)?", steps[0][1]), \
        steps[0]
    workdir = "/"
    copied: set[str] = set()
    checkout = None
    mode = None
    for inst, args in steps:
        if inst == "WORKDIR":
            workdir = str(Path(workdir, args))
        elif inst == "COPY":
            *sources, dest = shlex.split(args)
            assert not dest.startswith("/") or dest.startswith(workdir), dest
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the checkout"
                copied.add(source.rstrip("/"))
        elif inst == "RUN":
            for command in re.split(r"&&|;|\|\|", args):
                words = shlex.split(command)
                env = {}
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    key, _, value = words.pop(0).partition("=")
                    env[key] = value
                if words and words[0].endswith("scripts/setup.sh"):
                    mode = env.get("OTELWATER_SETUP", "all")
                    script = Path(workdir, words[0])
                    checkout = str(script.parent.parent)   # setup.sh: ROOT = its dir's parent
    assert checkout, "no RUN runs scripts/setup.sh"
    assert checkout == workdir, "setup.sh runs from the copied checkout"
    # the image's mode: the agent alone (no tests, Go toolchains or test servers: ~4 GB less);
    # tests/integration/test_image_setup.py runs that mode of the script
    assert mode == "agent", f"setup.sh runs in mode {mode}: give OTELWATER_SETUP=agent"
    entry = [args for inst, args in steps if inst == "ENTRYPOINT"]
    assert len(entry) == 1, "one ENTRYPOINT"
    command = json.loads(entry[0])      # the exec form: the agent is PID 1 and gets SIGTERM
    assert command == [f"{checkout}/.venv/bin/otelwater", "agent"], command
    # what setup.sh's `pip install -e .` and setup-go.sh need from the checkout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = project["tool"]["setuptools"]
    package_dirs = tool.get("package-dir", {})
    needed = {"pyproject.toml", project["project"]["readme"], "scripts"}
    needed |= {package_dirs.get(p, p.replace(".", "/")).split("/")[0] for p in tool["packages"]}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
