"""A client that keeps sending predictions over HTTPS while something else happens (a deploy, a renewal, a kill),
and counts what failed. Bounded in requests and time; it stops by itself."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scripts.harness.samples import IRIS

# What httpx reports for a connection the server closed before sending any byte of the answer.
CLOSED_UNANSWERED = "RemoteProtocolError: Server disconnected without sending a response"
# The figures of every action tested under load (requests, statuses, longest stall), one entry per action.
LOAD_RECORD = Path(__file__).resolve().parents[2] / ".cache" / "e2e" / "chaos.json"


def https_client(ca: Path, ip: str, domain: str, timeout: float = 30.0) -> HttpsClient:
    return HttpsClient(ca, ip, domain, timeout)


class HttpsClient:
    """HTTPS to `domain` at `ip` (like curl --resolve DOMAIN:443:IP), verified against the sandbox CA."""

    def __init__(self, ca: Path, ip: str, domain: str, timeout: float = 30.0) -> None:
        self.domain = domain
        self.ip = ip
        context = ssl.create_default_context(cafile=str(ca))
        self._client = httpx.Client(verify=context, timeout=timeout, headers={"Host": domain})

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        extensions = {"sni_hostname": self.domain}
        return self._client.request(method, f"https://{self.ip}{path}", extensions=extensions, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class LoadResult:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    longest_stall: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def figures(self) -> dict:
        return {"requests": self.sent, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "failed": self.failed, "unanswered": len(self.connection_failures),
                "longest_stall_s": round(self.longest_stall, 3)}

    @property
    def connection_failures(self) -> list[str]:
        """Failures without an HTTP answer (reset, closed, timed out), as opposed to an answer other than 200."""
        return [f for f in self.failures if not f[:3].isdigit()]

    def failures_beyond_reloads(self, reloads: int) -> list[str]:
        """The failures, less up to ``reloads`` requests that met NGINX closing an idle keep-alive connection.

        An NGINX reload retires its old workers, which close their idle keep-alive connections at once; a request
        written at that instant is lost unread whatever the configuration (nginx/nginx#437, docs/security.md). A
        client keeps one connection, so a reload costs it at most one such request: the connection closed with no
        byte of an answer. Anything else, or more of them, is a failure of the kit."""
        failures, spared = [], 0
        for failure in self.failures:
            if failure.startswith(CLOSED_UNANSWERED) and spared < reloads:
                spared += 1
            else:
                failures.append(failure)
        return failures

    @classmethod
    def merged(cls, results: list[LoadResult]) -> LoadResult:
        total = cls()
        for result in results:
            total.sent += result.sent
            total.statuses.update(result.statuses)
            total.versions.update(result.versions)
            total.failures.extend(result.failures)
            total.longest_stall = max(total.longest_stall, result.longest_stall)
        return total

    def summary(self) -> str:
        return (f"{self.sent} requests, statuses {dict(self.statuses)}, versions {dict(self.versions)}, "
                f"{self.failed} failed (first: {self.failures[:5]}), longest stall {self.longest_stall:.2f}s")


class ContinuousClient:
    """Sends POST /v1/predict every `interval` seconds from a thread until stopped, or until `max_requests`
    or `max_seconds` is reached. A failure is a connection error or any status other than 200.

        with ContinuousClient(sandbox) as load:
            run_the_deploy()
        assert load.result.failed == 0, load.result.summary()
    """

    def __init__(self, ca: Path, ip: str, domain: str, *, interval: float = 0.1, max_requests: int = 20_000,
                 max_seconds: float = 900.0, min_requests: int = 20) -> None:
        self._client = https_client(ca, ip, domain)
        self.interval = interval
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.min_requests = min_requests
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="continuous-client", daemon=True)

    def __enter__(self) -> ContinuousClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Keep sending until at least min_requests went out, so a fast action is still observed under load.
        deadline = time.monotonic() + 60
        while self.result.sent < self.min_requests and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(self.interval)
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.close()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and self.result.sent < self.max_requests:
            if time.monotonic() - started > self.max_seconds:
                self.result.failures.append(f"still running after {self.max_seconds}s: the action took too long")
                return
            begun = time.monotonic()
            try:
                response = self._client.post("/v1/predict", json=IRIS)
                self.result.statuses[response.status_code] += 1
                if response.status_code == 200:
                    self.result.versions[response.json()["version"]] += 1
                else:
                    self.result.failures.append(f"{response.status_code} {response.text[:200]}")
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.result.failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.result.sent += 1
            elapsed = time.monotonic() - begun
            self.result.longest_stall = max(self.result.longest_stall, elapsed)
            self._stop.wait(max(0.0, self.interval - elapsed))


def record_load(action: str, result: LoadResult, path: Path = LOAD_RECORD) -> None:
    """Print what the client saw during `action` and keep it in .cache/e2e/chaos.json (the latest run per action)."""
    print(f"{action}: {result.summary()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(path.read_text()) if path.exists() else {}
    records[action] = result.figures()
    path.write_text(json.dumps(records, indent=2) + "\n")
