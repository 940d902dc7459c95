"""The deployed HTTPS endpoint seen by the TLS scanners the field trusts (issue 6, check 1).

sslyze checks the server against the Mozilla intermediate profile, with Pebble's root as trust anchor;
testssl.sh, the Debian package, runs its protocol, cipher, certificate, header and vulnerability checks. Both reach
only the sandbox's lb host: no DNS, no revocation or other outside lookups.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from sslyze import (
    CertificateInfoExtraArgument,
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

from scripts.harness.deploy import LOG_DIR, require_provisioned

pytestmark = [
    pytest.mark.e2e,
    # sslyze also validates against the public trust stores it ships, one of which holds an old root with a
    # negative serial number; the check here is the one against Pebble's root.
    pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive"),
]


@pytest.fixture(scope="module")
def sslyze_scan(sandbox):
    require_provisioned(sandbox)
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=sandbox.domain, port=443, ip_address=sandbox.ip),
        scan_commands={*SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER, ScanCommand.HTTP_HEADERS},
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=sandbox.ca)),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = scanner.get_results()
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, (
        f"sslyze could not connect to {sandbox.domain} at {sandbox.ip}:443: {result.connectivity_error_trace}")
    failed = {command: getattr(result.scan_result, command.value).error_trace
              for command in request.scan_commands
              if getattr(result.scan_result, command.value).status != ScanCommandAttemptStatusEnum.COMPLETED}
    assert not failed, f"sslyze scan commands did not complete: {failed}"
    return result


def test_sslyze_finds_the_server_compliant_with_the_mozilla_intermediate_profile(sslyze_scan):
    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(sslyze_scan, profile)
    except ServerNotCompliantWithTlsConfiguration as exc:
        pytest.fail(f"not compliant with the Mozilla intermediate profile: {exc.issues}; change the TLS policy in "
                    "deploy/nginx/snippets/http/tls.conf.j2 (or the certificate settings of the certbot role)")


def test_sslyze_verifies_the_chain_up_to_pebbles_root(sslyze_scan, sandbox):
    validations = [validation for deployment in sslyze_scan.scan_result.certificate_info.result.certificate_deployments
                   for validation in deployment.path_validation_results if validation.trust_store.path == sandbox.ca]
    assert validations and all(v.was_validation_successful for v in validations), (
        f"the served chain does not verify up to Pebble's root: {[v.validation_error for v in validations]}; "
        "NGINX must serve the full chain (fullchain.pem) of the certbot role's certificate")


def test_sslyze_sees_hsts_for_at_least_the_profiles_max_age(sslyze_scan):
    # The profile asks for it; sslyze's own checker leaves the header out.
    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    hsts = sslyze_scan.scan_result.http_headers.result.strict_transport_security_header
    assert hsts is not None, (
        "no Strict-Transport-Security header: see deploy/nginx/snippets/server/security-headers.conf.j2"
    )
    assert hsts.max_age >= profile.hsts_min_age, (
        f"HSTS max-age is {hsts.max_age}, the profile asks for {profile.hsts_min_age}: "
        "raise it in deploy/nginx/snippets/server/security-headers.conf.j2")


@pytest.mark.parametrize("version", ["ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"])
def test_sslyze_completes_no_handshake_with_an_old_protocol(sslyze_scan, version):
    result = getattr(sslyze_scan.scan_result, f"{version}_cipher_suites").result
    accepted = [suite.cipher_suite.name for suite in result.accepted_cipher_suites]
    assert not result.is_tls_version_supported and not accepted, (
        f"{version} handshakes succeed with {accepted}: keep ssl_protocols at TLSv1.2 TLSv1.3 in "
        "deploy/nginx/snippets/http/tls.conf.j2")


def test_sslyze_completes_tls_1_2_and_1_3_handshakes(sslyze_scan):
    # The refusals above mean something only if the scanner's handshakes succeed where they should.
    for version in ("tls_1_2", "tls_1_3"):
        result = getattr(sslyze_scan.scan_result, f"{version}_cipher_suites").result
        assert result.is_tls_version_supported, f"{version} is refused: see deploy/nginx/snippets/http/tls.conf.j2"


# --- testssl.sh ---------------------------------------------------------------------------------------------------

# Debian 12's testssl.sh is 3.0.8: it reports a severity per finding but has no overall rating (grades came with
# 3.2), so every finding must be OK or INFO instead of a grade of A+ (docs/security.md).
TESTSSL_CHECKS = (
    "--protocols", "--std", "--fs", "--server-preference", "--server-defaults", "--headers", "--vulnerable",
)
TESTSSL_TIMEOUT = 240
ACCEPTED_SEVERITIES = {"OK", "INFO"}
# Programs testssl.sh would run to reach anything but the target: DNS, whois, revocation lists.
OUTSIDE_LOOKUP_PROGRAMS = ("dig", "host", "drill", "nslookup", "whois", "curl", "wget")


@pytest.fixture(scope="module")
def testssl_findings(sandbox, tmp_path_factory) -> list[dict]:
    require_provisioned(sandbox)
    work = tmp_path_factory.mktemp("testssl")
    # Stand-ins for the lookup programs: they record any call and fail, so an outside lookup cannot happen
    # unnoticed (--nodns none and the default of no --phone-out should leave them unused). Asking a program
    # for its help or version (testssl.sh runs `dig -h` to learn its options) reaches nothing and is passed on.
    shims, calls = work / "bin", work / "outside-lookups.log"
    shims.mkdir()
    for program in OUTSIDE_LOOKUP_PROGRAMS:
        real = shutil.which(program) or "false"
        shim = shims / program
        shim.write_text(f'#!/bin/sh\ncase "$*" in -h|--help|-v|-V|--version) exec {real} "$@";; esac\n'
                        f'echo "{program} $*" >> {calls}\nexit 1\n')
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    # A check that could not connect in time ("connect problem", seen on a loaded 2-core machine) is no
    # verdict on the server: the scan runs once more, and its findings are the ones judged.
    for attempt in (1, 2):
        report = work / f"findings-{attempt}.json"
        command = ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none", "--ip", sandbox.ip,
                   "--add-ca", str(sandbox.ca), "--connect-timeout", "10", "--openssl-timeout", "10",
                   "--jsonfile", str(report), *TESTSSL_CHECKS, f"https://{sandbox.domain}:443"]
        result = subprocess.run(command, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=TESTSSL_TIMEOUT)
        (LOG_DIR / "testssl.log").write_text(result.stdout + result.stderr)
        assert report.exists(), f"testssl.sh wrote no findings (exit {result.returncode}):\n{result.stdout[-3000:]}"
        shutil.copy2(report, LOG_DIR / "testssl.json")
        findings = json.loads(report.read_text())
        if not any("connect problem" in f["finding"] for f in findings):
            break
    lookups = calls.read_text() if calls.exists() else ""
    assert not lookups, f"testssl.sh tried to reach something other than the sandbox:\n{lookups}"
    return findings


def excused(finding: dict, testssl_findings: list[dict], sslyze_scan) -> bool:
    """Two findings that testssl.sh 3.0.8 cannot rate OK here for reasons outside the kit, each excused only
    where another check proves what it would have (docs/security.md)."""
    if finding["id"] == "secure_renego" and finding["finding"] == "OpenSSL handshake didn't succeed":
        # testssl.sh 3.0 runs this one handshake without SNI (fixed in 3.2), and the server refuses handshakes
        # without its name by design; sslyze checks secure renegotiation with SNI.
        return sslyze_scan.scan_result.session_renegotiation.result.supports_secure_renegotiation
    if finding["id"] == "cert_revocation" and finding["finding"] == "Neither CRL nor OCSP URI provided":
        # The sandbox's ACME CA (Pebble 2.4) writes no CRL or OCSP address into its certificates; Let's
        # Encrypt's certificates carry a CRL address.
        issuer = next(f["finding"] for f in testssl_findings if f["id"] == "cert_caIssuers")
        return issuer.startswith("Pebble")
    return False


def test_testssl_reports_only_ok_or_informational_findings(testssl_findings, sslyze_scan):
    flagged = [f"{f['id']} ({f['severity']}): {f['finding']}" for f in testssl_findings
               if f["severity"] not in ACCEPTED_SEVERITIES and not excused(f, testssl_findings, sslyze_scan)]
    assert not flagged, (
        "testssl.sh flags findings (full report: .cache/e2e/testssl.log); change the TLS policy in "
        "deploy/nginx/snippets/http/tls.conf.j2 or the headers in security-headers.conf.j2:\n" + "\n".join(flagged))


def test_testssl_ran_the_chosen_checks(testssl_findings):
    # A scan that could not connect reports little, all of it INFO: make sure the checks really ran.
    ids = {f["id"] for f in testssl_findings}
    expected = {"TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "cipher_order", "HSTS_time", "heartbleed", "ROBOT", "cert_trust",
                "cert_chain_of_trust"}
    assert expected <= ids, f"testssl.sh did not report {sorted(expected - ids)}; see .cache/e2e/testssl.log"
