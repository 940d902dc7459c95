"""Real servers for tests: gunicorn serving the app, and Redis, on loopback ports, stopped by PID."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# Where a copy of the interpreter lives for users who cannot run the venv's own (see interpreter_for).
SHARED_RUNTIMES = Path(os.environ.get("MLAPI_TEST_RUNTIMES", "/var/cache/mlapi-tests"))


def _as_user(user: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups"]


def interpreter_for(user: str) -> tuple[list[str], dict[str, str]]:
    """(argv prefix, environment) with which `user` runs this venv's Python and its packages.

    The venv's own interpreter when the user can run it. A pyenv build under /root cannot be: its binary,
    libpython and standard library are root's only. Then a copy of that installation (binary, libpython,
    standard library) in a folder every user may read, made once per machine, runs with the venv's
    site-packages and this checkout on its path: the same Python build, so the same compiled packages."""
    import fcntl
    import hashlib
    import sysconfig

    probe = subprocess.run([*_as_user(user), sys.executable, "-c", "import json, ssl"], capture_output=True,
                           check=False)
    if probe.returncode == 0:
        return [sys.executable], {}
    base = Path(sys.base_prefix)
    tag = f"python{sys.version_info.major}.{sys.version_info.minor}"
    digest = hashlib.sha256(f"{base}\0{sys.version}".encode()).hexdigest()[:12]
    copy = SHARED_RUNTIMES / f"{tag}-{digest}"
    SHARED_RUNTIMES.mkdir(parents=True, exist_ok=True)
    SHARED_RUNTIMES.chmod(0o755)
    with open(SHARED_RUNTIMES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (copy / ".complete").exists():
            shutil.rmtree(copy, ignore_errors=True)
            (copy / "bin").mkdir(parents=True)
            shutil.copy2(base / "bin" / tag, copy / "bin" / tag)
            (copy / "lib").mkdir()
            for library in (base / "lib").glob(f"lib{tag}*.so*"):
                shutil.copy2(library, copy / "lib" / library.name, follow_symlinks=True)
            shutil.copytree(base / "lib" / tag, copy / "lib" / tag, symlinks=True,
                            ignore=shutil.ignore_patterns("test", "site-packages", "idlelib", "tkinter"))
            for path in [copy, *copy.rglob("*")]:
                if not path.is_symlink():  # a link's mode is its target's, which may lie outside the copy
                    path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
            (copy / ".complete").touch()
    site_packages = sysconfig.get_paths()["purelib"]
    return [str(copy / "bin" / tag)], {"LD_LIBRARY_PATH": str(copy / "lib"), "PYTHONNOUSERSITE": "1",
                                        "PYTHONPATH": os.pathsep.join([site_packages, str(ROOT)])}


def mlapi_command() -> list[str]:
    """argv of the mlapi command for this checkout: the installed entry point when it runs this checkout's code
    (a venv shared by several checkouts holds the one it was installed from), else ``python -m app.cli``."""
    import json
    import sysconfig
    from importlib import metadata

    # The venv's own record of the install: the checkout's mlapi.egg-info (written by the editable install) has none.
    installed = metadata.distributions(name="mlapi", path=[sysconfig.get_paths()["purelib"]])
    origins = {json.loads(d.read_text("direct_url.json") or "{}").get("url") for d in installed}
    entry_point = VENV_BIN / "mlapi"
    if entry_point.exists() and ROOT.as_uri() in origins:
        return [str(entry_point)]
    return [sys.executable, "-m", "app.cli"]


def mlapi(*args: object, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the mlapi command from the checkout; output captured as text unless told otherwise."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([*mlapi_command(), *map(str, args)], cwd=ROOT, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; TimeoutError naming ``what`` (and the last error) after ``timeout``.

    An exception from the predicate counts as "not yet" (a server still starting refuses connections), except an
    AssertionError: the predicate's way to say it never will be (the process it waits for has exited).
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except AssertionError:
            raise
        except Exception as exc:  # the server may not be up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last error: {last})")


# Process.signal() shadows the module inside the class body, where default values are evaluated.
_SIGTERM = signal.SIGTERM


class Process:
    """A child process in its own process group, stopped by PID."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT, log: Path | None = None):
        self.log_path = log or Path(tempfile.mkstemp(prefix="mlapi-proc-", suffix=".log")[1])
        self._log = open(self.log_path, "ab")  # noqa: SIM115  open while the process runs; stop() closes it
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0, sig: int = _SIGTERM) -> None:
        """Send ``sig`` (SIGTERM, or e.g. NGINX's graceful SIGQUIT), then SIGKILL the group after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started, by its leader's PID
                self.proc.wait(10)
        self._log.close()


class Gunicorn(Process):
    """gunicorn serving the app; with ``user``, the whole server (master included) runs as that user."""

    def __init__(self, env: dict[str, str], port: int | None = None, workers: int = 2, user: str | None = None,
                 log: Path | None = None):
        self.port = port or free_port()
        self.metrics_dir = tempfile.mkdtemp(prefix="mlapi-prom-")
        command: list[str] = [str(VENV_BIN / "gunicorn")]
        runtime_env: dict[str, str] = {}
        if user is not None:
            shutil.chown(self.metrics_dir, user)
            python, runtime_env = interpreter_for(user)
            command = [*_as_user(user), *python, "-m", "gunicorn"]
        full_env = {
            **os.environ,
            "MLAPI_BIND": f"127.0.0.1:{self.port}",
            "MLAPI_WORKERS": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            **runtime_env,
            **env,
        }
        super().__init__([*command, "-c", "app/gunicorn_conf.py", "app.main:create_app()"], env=full_env, log=log)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200

        wait_for(ready, timeout, what=f"gunicorn ready on {self.url}")

    def workers(self) -> set[int]:
        """The PIDs of the master's children: its workers."""
        return {int(pid) for pid in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()}

    def stop(self, timeout: float = 30.0, sig: int = _SIGTERM) -> None:
        super().stop(timeout, sig)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


@contextmanager
def gunicorn(env: dict[str, str], workers: int = 2, user: str | None = None) -> Iterator[Gunicorn]:
    server = Gunicorn(env, workers=workers, user=user)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class RedisServer(Process):
    """A private redis-server on a loopback port, optionally with a password; restartable on the same port."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.workdir = tempfile.mkdtemp(prefix="mlapi-redis-")
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.workdir]
        if password:
            argv += ["--requirepass", password]
        super().__init__(argv)
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                answer = s.recv(64)
                return answer.startswith((b"+PONG", b"-NOAUTH"))

        try:
            wait_for(up, 20, what="redis-server")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def redis_server(password: str | None = None) -> Iterator[str]:
    """A private redis-server on a loopback port; yields its URL."""
    server = RedisServer(password=password)
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def tarpit() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes them) and never answers: a hung server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield listener.getsockname()[1]
