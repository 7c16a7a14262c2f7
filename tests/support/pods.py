"""Run a pod spec as the operator (or the chart) renders it, in real containers: a kubelet for one
pod, with podman, on this machine's network.

    from tests.support.pods import Engine, Pod

    engine = Engine.from_hack()                      # podman + hack/images' containers.conf
    pod = Pod(engine, job["spec"]["template"]["spec"], workdir=tmp_path / "generate",
              config_maps={"demo-generate-config": {"generate.yaml": "..."}},
              secrets={"s3-creds": {"AWS_ACCESS_KEY_ID": "...", "AWS_SECRET_ACCESS_KEY": "..."}})
    with pod:
        pod.run_init_containers()
        worker = pod.start("worker")                 # podman run --detach ...
        code = worker.wait(timeout=300)
        worker.termination_message()                 # what the kubelet would put in the pod status

What it does as a kubelet does: command/args ($(VAR) expanded) over the image's entry point;
env from values, Secret keys and fieldRefs; ConfigMap volumes (read-only files from the data
given); emptyDir volumes (a directory of this pod, shared by its containers, writable by the
pod's fsGroup); subPath and readOnly mounts; the security context (runAsUser/runAsGroup,
fsGroup, runAsNonRoot, readOnlyRootFilesystem without podman's extra tmpfs mounts, dropped and
added capabilities, no privilege escalation, RuntimeDefault seccomp = the engine's default
profile); the termination message file and FallbackToLogsOnError; init containers in order,
each to success, before the others; the ServiceAccount token volume when the pod automounts a
token, projected volumes (a token of the given ServiceAccount, ConfigMap items with
kube-root-ca.crt as the cluster's CA, the namespace by downward API), and KUBERNETES_SERVICE_*
whenever a ServiceAccount is given.

What it does not, on purpose: pod networking (every container shares the host's network: the
local cluster's API server and the tests' servers listen on 127.0.0.1, and there is no CNI
here), resource requests and limits, probes (tests poll the same endpoints), restarts, image
pulls (`--pull never`: the image must have been built here). A field it does not know fails
loudly instead of being ignored.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HACK_IMAGES = REPO_ROOT / "hack" / "images"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
LABEL = "io.kubedistill.test-pod"  # every container started here; the value is the owning process

# Fields this kubelet implements, and those it knowingly leaves to a real one (see the docstring).
POD_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "automountServiceAccountToken"}
POD_IGNORED = {
    "restartPolicy", "enableServiceLinks", "terminationGracePeriodSeconds", "serviceAccountName", "nodeSelector",
    "tolerations", "priorityClassName", "imagePullSecrets", "subdomain", "affinity", "hostname",
}  # fmt: skip
CONTAINER_FIELDS = {
    "name", "image", "command", "args", "env", "volumeMounts", "securityContext", "terminationMessagePath",
    "terminationMessagePolicy", "workingDir",
}  # fmt: skip
CONTAINER_IGNORED = {"imagePullPolicy", "resources", "ports", "startupProbe", "readinessProbe", "livenessProbe"}


class PodError(RuntimeError):
    """A container failed, or the spec asks for something this kubelet cannot do."""


@dataclass(frozen=True)
class Engine:
    """The container engine hack/images uses here, with its environment (CONTAINERS_CONF)."""

    command: str
    env: dict[str, str]

    @classmethod
    def from_hack(cls) -> Engine:
        out = subprocess.run([str(HACK_IMAGES), "env"], check=True, capture_output=True, text=True).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        command = values.pop("KUBEDISTILL_ENGINE")
        return cls(command, {**os.environ, **values})

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.command, *args], capture_output=True, text=True, env=self.env, timeout=timeout, input=input
        )
        if check and proc.returncode != 0:
            raise PodError(f"{self.command} {' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def image_exists(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False).returncode == 0

    def remove_orphans(self) -> None:
        """Containers of test processes that died without cleaning up (SIGKILL)."""
        out = self("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.ID}} {{.Labels}}", check=False).stdout
        for line in out.splitlines():
            cid, _, labels = line.partition(" ")
            match = re.search(rf"{re.escape(LABEL)}:(\d+)", labels)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                self("rm", "--force", "--time", "0", cid, check=False)


@dataclass(frozen=True)
class ServiceAccount:
    """What the kubelet mounts for a pod that automounts its token, and where the API server is."""

    token: str
    ca_crt: str
    namespace: str
    api_host: str
    api_port: int


@dataclass(eq=False)  # hashable by identity: the atexit set holds them
class Container:
    """One running (or finished) container of a Pod."""

    engine: Engine
    name: str
    spec: dict[str, Any]
    termination_file: Path

    def wait(self, timeout: float) -> int:
        """The exit code, once the container has exited (PodError after `timeout` seconds)."""
        try:
            out = self.engine("wait", self.name, timeout=timeout).stdout.strip()
        except subprocess.TimeoutExpired:
            raise PodError(f"{self.name} still running after {timeout}s; log tail:\n{self.logs(40)}") from None
        return int(out.splitlines()[-1])

    def running(self) -> bool:
        return self.inspect()["State"]["Running"] is True

    def inspect(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.engine("inspect", self.name).stdout)[0]
        return data

    def logs(self, tail: int | None = None) -> str:
        args = ["logs", *(["--tail", str(tail)] if tail else []), self.name]
        proc = self.engine(*args, check=False)
        return proc.stdout + proc.stderr

    def kill(self, signal: str = "TERM") -> None:
        self.engine("kill", "--signal", signal, self.name)

    def termination_message(self) -> str:
        """As the kubelet reports it: the file, else (FallbackToLogsOnError, on failure) the log's tail."""
        message = self.termination_file.read_text() if self.termination_file.exists() else ""
        state = self.inspect()["State"]
        fallback = self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and fallback and state["ExitCode"] != 0:
            message = "\n".join(self.logs().splitlines()[-80:])[-2048:]
        return message

    def remove(self) -> None:
        self.engine("rm", "--force", "--time", "0", self.name, check=False)


@dataclass
class Pod:
    """One pod spec, its volumes on this machine, and the containers started from it."""

    engine: Engine
    spec: dict[str, Any]
    workdir: Path
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    field_values: Mapping[str, str] = field(default_factory=dict)
    service_account: ServiceAccount | None = None
    name: str = field(default_factory=lambda: f"pod-{secrets.token_hex(3)}")
    containers: list[Container] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_fields("pod", self.spec, POD_FIELDS, POD_IGNORED)
        self.workdir.mkdir(parents=True, exist_ok=True)
        sc = self.spec.get("securityContext", {})
        self.fs_group = sc.get("fsGroup")
        self.volume_dirs = {v["name"]: self._volume(v) for v in self.spec.get("volumes", [])}

    # --- volumes -----------------------------------------------------------------------------

    def _volume(self, volume: dict[str, Any]) -> Path:
        path = self.workdir / "volumes" / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            # Like the kubelet: world-writable, owned by the fsGroup (the pod's processes write here).
            os.chmod(path, 0o777)
            if self.fs_group is not None:
                os.chown(path, -1, self.fs_group)
        elif "configMap" in volume:
            source = volume["configMap"]
            data = self.config_maps.get(source["name"])
            if data is None:
                raise PodError(f"ConfigMap {source['name']} (volume {volume['name']}) was not given")
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])
                target.chmod(0o644)
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                for item_path, text in self._projected(volume["name"], source):
                    target = path / item_path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text)
                    target.chmod(0o644)
        else:
            raise PodError(f"volume {volume['name']}: only configMap, emptyDir and projected volumes are implemented")
        return path

    def _projected(self, volume: str, source: dict[str, Any]) -> list[tuple[str, str]]:
        """(path, text) of one projected source, as the kubelet fills it: a token of the pod's
        ServiceAccount, a ConfigMap's items (kube-root-ca.crt is the cluster's CA), the namespace."""
        account = self.service_account
        if "serviceAccountToken" in source:
            if account is None:
                raise PodError(f"volume {volume}: a ServiceAccount token needs service_account=")
            return [(source["serviceAccountToken"]["path"], account.token)]
        if "configMap" in source:
            name = source["configMap"]["name"]
            data = self.config_maps.get(name)
            if data is None and name == "kube-root-ca.crt" and account is not None:
                data = {"ca.crt": account.ca_crt}
            if data is None:
                raise PodError(f"ConfigMap {name} (volume {volume}) was not given")
            items = source["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            return [(item["path"], data[item["key"]]) for item in items]
        if "downwardAPI" in source:
            found = []
            for item in source["downwardAPI"]["items"]:
                field_path = item["fieldRef"]["fieldPath"]
                if field_path == "metadata.namespace" and account is not None:
                    found.append((item["path"], account.namespace))
                elif field_path in self.field_values:
                    found.append((item["path"], self.field_values[field_path]))
                else:
                    raise PodError(f"volume {volume}: no value for {field_path}")
            return found
        raise PodError(f"volume {volume}: projected source {sorted(source)} not implemented")

    def _mounts(self, container: dict[str, Any]) -> list[str]:
        args: list[str] = []
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in self.volume_dirs:
                raise PodError(f"{container['name']}: mount of unknown volume {mount['name']}")
            source = self.volume_dirs[mount["name"]]
            volume = next(v for v in self.spec["volumes"] if v["name"] == mount["name"])
            read_only = mount.get("readOnly", False) or "configMap" in volume  # ConfigMap volumes always are
            if sub := mount.get("subPath"):
                source = source / sub
            args += ["--volume", f"{source}:{mount['mountPath']}:{'ro' if read_only else 'rw'}"]
        if self.spec.get("automountServiceAccountToken") and self.service_account is not None:
            sa_dir = self.workdir / "serviceaccount"
            sa_dir.mkdir(exist_ok=True)
            for name, text in (("token", self.service_account.token), ("ca.crt", self.service_account.ca_crt),
                               ("namespace", self.service_account.namespace)):  # fmt: skip
                (sa_dir / name).write_text(text)
                (sa_dir / name).chmod(0o644)
            args += ["--volume", f"{sa_dir}:{SERVICE_ACCOUNT_DIR}:ro"]
        return args

    # --- env and security ----------------------------------------------------------------------

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.service_account is not None:  # the kubelet sets these whether or not a token is mounted
            env["KUBERNETES_SERVICE_HOST"] = self.service_account.api_host
            env["KUBERNETES_SERVICE_PORT"] = str(self.service_account.api_port)
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = _expand(var["value"], env)
            elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
            elif ref := var.get("valueFrom", {}).get("fieldRef"):
                env[var["name"]] = self._field(ref["fieldPath"])
            else:
                raise PodError(f"{container['name']}: env {var['name']}: unsupported source {var}")
        return env

    def _field(self, path: str) -> str:
        """A downward API value: given, or the namespace of the pod's ServiceAccount."""
        if path in self.field_values:
            return self.field_values[path]
        if path == "metadata.namespace" and self.service_account is not None:
            return self.service_account.namespace
        raise PodError(f"no value for the downward API field {path} (give it in field_values)")

    def _security(self, container: dict[str, Any]) -> list[str]:
        pod_sc = self.spec.get("securityContext", {})
        sc = {**pod_sc, **container.get("securityContext", {})}
        unknown = set(sc) - {
            "runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "seccompProfile", "readOnlyRootFilesystem",
            "allowPrivilegeEscalation", "capabilities",
        }  # fmt: skip
        if unknown:
            raise PodError(f"{container['name']}: securityContext {sorted(unknown)} not implemented")
        args: list[str] = []
        if "runAsUser" in sc:
            if sc.get("runAsNonRoot") and sc["runAsUser"] == 0:
                raise PodError(f"{container['name']}: runAsNonRoot with runAsUser 0")
            args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
        elif sc.get("runAsNonRoot"):
            raise PodError(f"{container['name']}: runAsNonRoot without runAsUser is not implemented")
        if self.fs_group is not None:
            args += ["--group-add", str(self.fs_group)]
        if sc.get("readOnlyRootFilesystem"):
            # podman adds writable tmpfs on /tmp, /var/tmp and /run unless told not to; a kubelet does not.
            args += ["--read-only"] + (["--read-only-tmpfs=false"] if self.engine.command == "podman" else [])
        caps = sc.get("capabilities", {})
        args += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
        args += [f"--cap-add={c.lower()}" for c in caps.get("add", [])]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = sc.get("seccompProfile", {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise PodError(f"{container['name']}: seccomp profile {seccomp} not implemented")
        return args

    # --- containers ----------------------------------------------------------------------------

    def _spec_of(self, name: str) -> dict[str, Any]:
        for container in self.spec.get("initContainers", []) + self.spec["containers"]:
            if container["name"] == name:
                _check_fields(f"container {name}", container, CONTAINER_FIELDS, CONTAINER_IGNORED)
                return dict(container)
        raise PodError(f"no container {name} in the pod")

    def start(self, name: str) -> Container:
        """`podman run --detach` one container of the pod, as its spec says."""
        spec = self._spec_of(name)
        if not self.engine.image_exists(spec["image"]):
            raise PodError(f"image {spec['image']} is not here: build it with hack/images build")
        env = self._env(spec)
        env_file = self.workdir / f"{name}.env"  # never on a command line: it may hold Secret values
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        env_file.chmod(0o600)
        termination = self.workdir / f"{name}.termination-log"
        termination.write_text("")
        termination.chmod(0o666)
        cname = f"kd-{self.name}-{name}-{secrets.token_hex(2)}"
        args = [
            "run", "--detach", "--name", cname, "--pull", "never", "--network", "host",
            "--label", f"{LABEL}={os.getpid()}", "--env-file", str(env_file),
            "--volume", f"{termination}:{spec.get('terminationMessagePath', DEFAULT_TERMINATION_PATH)}:rw",
            *self._mounts(spec), *self._security(spec),
        ]  # fmt: skip
        if "workingDir" in spec:
            args += ["--workdir", spec["workingDir"]]
        command = [_expand(a, env) for a in spec.get("command", [])]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        args += [spec["image"], *[_expand(a, env) for a in spec.get("args", [])]]
        self.engine(*args)
        container = Container(self.engine, cname, spec, termination)
        self.containers.append(container)
        _STARTED.add(container)
        return container

    def run(self, name: str, timeout: float) -> Container:
        """Start one container and wait for it to exit; PodError with its log when it fails."""
        container = self.start(name)
        code = container.wait(timeout)
        if code != 0:
            raise PodError(f"{name} exited {code}: {container.termination_message()}\n{container.logs(60)}")
        return container

    def run_init_containers(self, timeout: float = 300) -> list[Container]:
        return [self.run(c["name"], timeout) for c in self.spec.get("initContainers", [])]

    def stop(self) -> None:
        for container in self.containers:
            container.remove()
            _STARTED.discard(container)

    def __enter__(self) -> Pod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_fields(what: str, spec: Mapping[str, Any], known: set[str], ignored: set[str]) -> None:
    unknown = set(spec) - known - ignored
    if unknown:
        raise PodError(f"{what}: fields {sorted(unknown)} are not implemented by tests/support/pods.py")


def _expand(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion in command, args and env values ($$ escapes)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def wait_http(url: str, container: Container, timeout: float, what: str) -> float:
    """Poll url until it answers 200 (as a readiness probe would); seconds it took."""
    import urllib.error
    import urllib.request

    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if not container.running():
            raise PodError(f"{what}: {container.name} exited; log tail:\n{container.logs(60)}")
        if time.monotonic() - start > timeout:
            raise PodError(f"{what}: no answer from {url} after {timeout}s; log tail:\n{container.logs(60)}")
        time.sleep(1)


_STARTED: set[Container] = set()


@atexit.register
def _remove_started() -> None:
    for container in list(_STARTED):
        container.remove()
