"""A real S3-compatible server for tests: versitygw (Apache-2.0) with its posix backend.

The binary is built once from the Go module proxy by `hack/s3/build` into
`$KUBEDISTILL_CACHE/s3/versitygw-<version>/bin` (default cache ~/.cache/kubedistill); set
`KUBEDISTILL_S3_BINARY` to use another build. Run `hack/s3/build` before the tests (CI does):
a cold build takes minutes, and this module builds on first use only as a fallback.

Session fixture (in a conftest.py):

    from tests.support.s3 import shared_s3_server

    @pytest.fixture(scope="session")
    def s3():
        return shared_s3_server()      # one per process, however many fixtures ask for it

    # or, owned by the fixture and stopped at its teardown:
    @pytest.fixture(scope="session")
    def s3(tmp_path_factory):
        yield from s3_server(tmp_path_factory.mktemp("s3"))

    def test_upload(s3, monkeypatch):
        bucket = s3.make_bucket()                       # a fresh, uniquely named bucket
        for k, v in s3.env().items():                   # credentials + region, as workers read them
            monkeypatch.setenv(k, v)
        s3.client().put_object(Bucket=bucket, Key="a", Body=b"x")
        ... worker config: endpoint=s3.endpoint_url, uri=s3.uri(bucket, "prefix/") ...
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.procs import ManagedProcess, ProcessFailed, free_port, wait_for_http

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "s3" / "build"

ACCESS_KEY = "kubedistill-test"
SECRET_KEY = "kubedistill-test-secret-key"
REGION = "us-east-1"
HEALTH_PATH = "/health"

_bucket_seq = itertools.count()


def versitygw_binary() -> Path:
    """Path of the versitygw binary: `KUBEDISTILL_S3_BINARY`, else `hack/s3/build` (cached)."""
    explicit = os.environ.get("KUBEDISTILL_S3_BINARY")
    if explicit:
        return Path(explicit)
    done = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(
            f"hack/s3/build failed (exit {done.returncode}); it needs `go` and the Go module "
            f"proxy.\n{done.stderr[-4000:]}"
        )
    return Path(done.stdout.strip().splitlines()[-1])


def _supports_user_xattrs(directory: Path) -> bool:
    probe = directory / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.kubedistill", b"1")
        return True
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return False
        raise
    finally:
        probe.unlink()


class S3Server:
    """versitygw serving `root` on 127.0.0.1 (or `host`) with fixed test credentials (single account)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        region: str = REGION,
        binary: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        # host: another address than loopback for clients in other network namespaces (real pods).
        self.host = host
        # Without `root`, the server's data lives in a temp dir removed by stop().
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="s3-"))
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.binary = Path(binary) if binary is not None else None
        self.proc: ManagedProcess | None = None

    @property
    def endpoint_url(self) -> str:
        assert self.port is not None, "not started"
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> S3Server:
        binary = self.binary or versitygw_binary()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        backend = ["posix"]
        if not _supports_user_xattrs(data):
            # Object metadata (ETag, content type, user metadata) lives in xattrs by default.
            meta = self.root / "meta"
            meta.mkdir(exist_ok=True)
            backend += ["--sidecar", str(meta)]
        # A port taken between free_port() and bind makes the server exit: try a few.
        for attempt in range(3):
            port = self.port if self.port is not None and attempt == 0 else free_port()
            argv = [
                str(binary),
                "--port", f"{self.host}:{port}",
                "--access", self.access_key,
                "--secret", self.secret_key,
                "--region", self.region,
                "--health", HEALTH_PATH,
                "--quiet",
                *backend, str(data),
            ]  # fmt: skip
            # A clean environment: VGW_* / ROOT_* variables of the caller must not leak in.
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root)}
            proc = ManagedProcess(argv, log_path=self.root / "versitygw.log", env=env, name="versitygw").start()
            try:
                wait_for_http(f"http://{self.host}:{port}{HEALTH_PATH}", timeout=timeout, proc=proc)
            except ProcessFailed:
                proc.stop()
                if attempt == 2 or self.port is not None:
                    raise
                continue
            self.port, self.proc = port, proc
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, *, include_endpoint: bool = False) -> dict[str, str]:
        """Credentials and region as boto3 (and the workers) read them from the environment.

        The endpoint is left out by default: workers take it from their config, and a test
        should fail if they ignore it. `include_endpoint=True` adds `AWS_ENDPOINT_URL_S3`.
        """
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }
        if include_endpoint:
            env["AWS_ENDPOINT_URL_S3"] = self.endpoint_url
        return env

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing); `config` goes to botocore."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create bucket `name` (default: a fresh unique name) if missing; return its name.

        S3 names are 3-63 chars of lowercase letters, digits, dots and hyphens: the server
        refuses others with InvalidBucketName, as AWS does.
        """
        if name is None:
            name = f"test-{os.getpid()}-{next(_bucket_seq)}"
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    @staticmethod
    def uri(bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}"


_SHARED: S3Server | None = None


def shared_s3_server() -> S3Server:
    """One server per process, started on first call and stopped at interpreter exit.

    Fixtures in different conftest files or test modules that call this get the same
    server; isolate tests with `make_bucket()` (a fresh bucket each call).
    """
    global _SHARED
    if _SHARED is None or _SHARED.proc is None or not _SHARED.proc.alive():
        _SHARED = S3Server().start()
        atexit.register(_SHARED.stop)
    return _SHARED


def s3_server(root: str | os.PathLike[str] | None = None) -> Iterator[S3Server]:
    """Generator for a pytest fixture: `yield from s3_server(tmp_path_factory.mktemp("s3"))`."""
    server = S3Server(root).start()
    try:
        yield server
    finally:
        server.stop()
