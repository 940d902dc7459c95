#!/usr/bin/env bash
# Installs what the kit needs on a Debian 12 / Ubuntu 22.04+ controller (run as root):
# the system packages used by the tests and the sandbox, and the Python venv (Python 3.12, that of the
# default sandbox OS, Ubuntu 24.04: Ubuntu 24.04 has it, elsewhere a pyenv 3.12; see HOST_PYTHON in the Makefile).
#   scripts/setup-host.sh                    everything `make test` needs
#   scripts/setup-host.sh --without-sandbox  only what `make test-fast` needs (no sandbox hosts, no TLS
#                                            scanner, no load generator): a CI runner of unit and
#                                            integration tests, such as deploy/github/workflows/
set -euo pipefail
cd "$(dirname "$0")/.."

with_sandbox=1
for arg in "$@"; do
  case "$arg" in
    --without-sandbox) with_sandbox=0 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-host: unknown option $arg (known: --without-sandbox)" >&2; exit 2 ;;
  esac
done

packages=(
  make python3-venv curl jq openssl socat  # venv and the commands the README uses
  redis-server nginx-light               # real rate-limit store and edge proxy for integration tests
  prometheus                             # promtool and a real Prometheus for the alert and dashboard tests
  shellcheck                             # checks the shell of the CI workflow example (with actionlint)
  libarchive-tools                       # bsdtar: the release archive must not depend on GNU tar
  gnupg                                  # checks Ubuntu's archive keyring against pinned fingerprints
  strace                                 # the worker test counts failed close(2) calls of retiring workers
)
if [ "$with_sandbox" = 1 ]; then
  packages+=(
    systemd-container debootstrap          # sandbox hosts: systemd-nspawn over debootstrapped Ubuntu and Debian
    debian-archive-keyring                 # Debian suites' signatures for debootstrap
    pebble tinyproxy iproute2 openssh-client  # local ACME CA, sandbox egress, namespaces
    wrk                                    # load generator for benchmarks
    testssl.sh libengine-gost-openssl     # TLS scanner of the e2e suite (it warns without the GOST engine)
  )
fi
# Headless browser of the API page tests (DevTools protocol): Debian's package, unless a Chromium or
# Chrome build is already there (CI images carry one; Ubuntu packages Chromium only as a snap).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && ! command -v google-chrome >/dev/null; then
  packages+=(chromium)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing packages: ${missing[*]}; run as root or install them with apt-get" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The kit runs its own NGINX processes (tests, benchmarks); the distribution's default
  # site would hold port 80 on every address, which the sandbox relay needs on loopback.
  if [[ " ${missing[*]} " == *" nginx-light "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now nginx || true
  fi
  # The tests run their own promtool and Prometheus; the distribution's service would scrape and store
  # for nothing on the controller (and its node exporter, when recommends brought it).
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    for unit in prometheus prometheus-node-exporter; do
      systemctl disable --now "$unit" 2>/dev/null || true
    done
  fi
fi

make venv
