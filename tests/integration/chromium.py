"""Headless Chromium (the Debian package) driven over the DevTools protocol, for tests of pages.

A fresh profile per browser, no background network traffic, host names mapped to loopback,
and a certificate error ignored only for the one public key given (the test's self-signed
certificate). The browser is a child process of the test, stopped by its PID.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from scripts.harness.servers import Process, wait_for

# Pages record Content-Security-Policy violations here; a script added over the protocol
# runs before the page's own and is not subject to its policy.
_RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + (e.blockedURI || "inline"));
});
"""


# Debian's package is `chromium`; Ubuntu's is `chromium-browser`; CI images often carry Google's build.
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser_executable() -> str:
    """$MLAPI_CHROMIUM, else the first Chromium build on PATH; an error that says how to install one."""
    wanted = os.environ.get("MLAPI_CHROMIUM")
    for name in (wanted,) if wanted else BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        f"no browser: {'MLAPI_CHROMIUM=' + wanted if wanted else ' '.join(BROWSER_NAMES)} not found on PATH; "
        "run scripts/setup-host.sh, or set MLAPI_CHROMIUM to a Chromium or Chrome executable")


def spki_hash(certificate: Path) -> str:
    """base64 SHA-256 of the certificate's public key, the form --ignore-certificate-errors-spki-list takes."""
    key = subprocess.run(["openssl", "x509", "-in", str(certificate), "-noout", "-pubkey"],
                         check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=key,
                         check=True, capture_output=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der,
                            check=True, capture_output=True).stdout
    return base64.b64encode(digest).decode()


class Browser:
    """One headless Chromium with one page; ``open``, ``evaluate``, ``wait_for``, ``screenshot``."""

    def __init__(self, workdir: Path, host_map: dict[str, str] | None = None,
                 trusted_certificate: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        rules = ", ".join(f"MAP {name} {address}" for name, address in (host_map or {}).items())
        argv = [
            browser_executable(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", "--window-size=1280,1600",
        ]
        if rules:
            argv.append(f"--host-resolver-rules={rules}")
        if trusted_certificate is not None:
            argv.append(f"--ignore-certificate-errors-spki-list={spki_hash(trusted_certificate)}")
        argv.append("about:blank")
        self.process = Process(argv, log=workdir / "chromium.log")
        self._ids = itertools.count(1)
        try:
            self._socket = self._connect()
            self._call("Page.enable")
            self._call("Page.addScriptToEvaluateOnNewDocument", source=_RECORD_VIOLATIONS)
        except BaseException:
            self.process.stop()
            raise

    def _connect(self) -> ClientConnection:
        active_port = self.profile / "DevToolsActivePort"

        def started() -> bool:
            if self.process.proc.poll() is not None:
                raise AssertionError(f"chromium exited:\n{self.process.output()[-3000:]}")
            return active_port.exists() and len(active_port.read_text().splitlines()) == 2

        wait_for(started, 30, what="chromium to open its DevTools port")
        port = active_port.read_text().splitlines()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        # Closed by close(), not by a with block: the connection lives as long as this object.
        return connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10, legacy=True)

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=30))
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (the page's scripts have run, its fetches may not be done)."""
        result = self._call("Page.navigate", url=url)
        assert "errorText" not in result, f"{url}: {result['errorText']}"
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, what: str) -> None:
        """Until the expression is true in the page (rendering takes a moment after the load)."""
        wait_for(lambda: bool(self.evaluate(expression)), 60, what=what)

    def csp_violations(self) -> list[str]:
        return self.evaluate("window.__cspViolations || []")

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input and type as a person would (key events, not a value set by script)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self._call("Input.insertText", text=text)

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the window, or of the whole page's height."""
        data = self._call("Page.captureScreenshot", format="png", captureBeyondViewport=full_page)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self._socket.close()
        finally:
            self.process.stop()
