#!/usr/bin/env python3
"""Figure 5: seconds from a fresh sandbox host to the first HTTPS prediction, and for the idempotent second run.

    .venv/bin/python -m bench.provision      # this figure alone, printed as JSON (bench/run.py calls figure())

Brings up a sandbox host of its own (scripts/sandbox/sandbox up, with the checkout's
MLAPI_SANDBOX_* settings), runs deploy/ansible/site.yml on it as a user would, polls
HTTPS /v1/predict through the host's NGINX until it answers 200, runs site.yml a second
time, and takes the sandbox down again. It never touches a sandbox that is already up in
this checkout (someone may be using it): the figure then says why it is missing.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time

import httpx

from scripts.harness.deploy import ensure_demo_models, run_playbook
from scripts.harness.samples import IRIS
from scripts.harness.sandbox import ENV_FILE, ROOT, SCRIPT, Sandbox, SandboxCommandError

FIRST_PREDICTION_TIMEOUT = 300.0


def not_measured(reason: str) -> dict:
    return {"status": "not measured", "reason": reason, "first_run_s": None, "second_run_s": None}


def why_not() -> str | None:
    """Why the figure cannot be measured here, or None."""
    if os.geteuid() != 0:
        return f"needs root to run {SCRIPT.relative_to(ROOT)} (network namespaces, systemd-nspawn)"
    if ENV_FILE.exists():
        return (f"a sandbox is already up in this checkout ({ENV_FILE.relative_to(ROOT)} exists) and may be in use, "
                "so the bench does not reprovision it; take it down with scripts/sandbox/sandbox down to measure")
    return None


def first_prediction(sandbox: Sandbox, timeout: float = FIRST_PREDICTION_TIMEOUT) -> float:
    """Poll POST /v1/predict over HTTPS (certificate from the sandbox's ACME CA) until it answers 200."""
    start = time.monotonic()
    last = ""
    # Like curl --resolve DOMAIN:PORT:IP: the relay's address, the site's name as Host and TLS SNI.
    url = f"https://{sandbox.ip}:{sandbox.https_port}/v1/predict"
    verify = ssl.create_default_context(cafile=str(sandbox.ca))
    with httpx.Client(verify=verify, timeout=10, headers={"Host": sandbox.domain}) as client:
        while time.monotonic() - start < timeout:
            try:
                response = client.post(url, json=IRIS, extensions={"sni_hostname": sandbox.domain})
                if response.status_code == 200 and "prediction" in response.json():
                    return time.monotonic() - start
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except Exception as exc:  # not listening yet, or the certificate is not there yet
                last = repr(exc)
            time.sleep(0.2)
    raise TimeoutError(f"no HTTPS prediction within {timeout:.0f} s after site.yml (last: {last})")


def figure(log=print) -> dict:  # type: ignore[no-untyped-def]
    """The provisioning figure; every sandbox it brought up is taken down again before it returns."""
    reason = why_not()
    if reason:
        return not_measured(reason)
    ensure_demo_models()
    settings = {k: v for k, v in os.environ.items() if k.startswith("MLAPI_SANDBOX_")}
    log(f"provisioning: a fresh sandbox host ({settings or 'default sandbox settings'})")
    start = time.monotonic()
    try:
        sandbox = Sandbox.up(1)
    except SandboxCommandError as exc:
        Sandbox.down()  # remove what a failed `up` left
        return not_measured(f"scripts/sandbox/sandbox up failed: {str(exc)[-500:]}")
    try:
        up_s = time.monotonic() - start
        log(f"provisioning: host up in {up_s:.1f} s; site.yml")
        start = time.monotonic()
        first = run_playbook(sandbox, "site.yml", label="bench-site-first")
        first_s = time.monotonic() - start
        if first.returncode != 0:
            return not_measured(f"site.yml failed on the fresh host (log: {first.log.relative_to(ROOT)})")
        prediction_s = first_s + first_prediction(sandbox)
        log(f"provisioning: site.yml {first_s:.1f} s, first HTTPS prediction at {prediction_s:.1f} s; site.yml again")
        start = time.monotonic()
        second = run_playbook(sandbox, "site.yml", label="bench-site-second")
        second_s = time.monotonic() - start
        if second.returncode != 0:
            return not_measured(f"the second site.yml failed (log: {second.log.relative_to(ROOT)})")
        log(f"provisioning: second site.yml {second_s:.1f} s, changed={second.changed}")
        return {
            "status": "measured",
            "sandbox_up_s": round(up_s, 1),  # booting the host (root filesystem cached), not part of the figure
            "first_run_s": round(first_s, 1),
            "first_prediction_s": round(prediction_s, 1),
            "second_run_s": round(second_s, 1),
            "second_run_changed": second.changed,
            "first_run_tasks": first.recap,
            "sandbox_settings": settings,
        }
    finally:
        Sandbox.down()


if __name__ == "__main__":
    print(json.dumps(figure(lambda m: print(m, file=sys.stderr, flush=True)), indent=2))
