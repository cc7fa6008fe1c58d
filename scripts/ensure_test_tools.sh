#!/usr/bin/env bash
# Make sure the external tools the test suite calls are installed; idempotent.
#   scripts/ensure_test_tools.sh
# Installed when missing (Debian/Ubuntu, as root, via apt-get):
#   docker-compose  (Compose 1.29, validates infra/clearml/docker-compose.yml with
#                    `docker-compose config`; needs no Docker engine)
#   chromium        (headless browser: renders reports/experiments.html in
#                    tests/test_report.py)
#   gcc             (builds the signal-race injector of tests/test_signals.py)
# Prints what it found or did. Exits non-zero when a tool is missing and cannot be
# installed here, with the command to run instead.
set -euo pipefail

missing_packages=()

check_tool() {
    local binary="$1" package="$2"
    if command -v "$binary" >/dev/null 2>&1; then
        echo "ensure_test_tools: $binary found at $(command -v "$binary")"
    else
        echo "ensure_test_tools: $binary missing (Debian package: $package)"
        missing_packages+=("$package")
    fi
}

check_tool docker-compose docker-compose
check_tool chromium chromium
check_tool gcc gcc

if [ "${#missing_packages[@]}" -eq 0 ]; then
    echo "ensure_test_tools: nothing to install"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_test_tools: not root; install with: sudo apt-get install -y ${missing_packages[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_test_tools: no apt-get here; install ${missing_packages[*]} with your package manager" >&2
    exit 1
fi

echo "ensure_test_tools: apt-get update"
apt-get update -qq
echo "ensure_test_tools: apt-get install -y ${missing_packages[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_packages[@]}" >/dev/null

still_missing=0
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "ensure_test_tools: docker-compose still missing after apt-get install" >&2
    still_missing=1
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "ensure_test_tools: chromium still missing after apt-get install" >&2
    still_missing=1
fi
if [ "$still_missing" -ne 0 ]; then
    exit 1
fi
echo "ensure_test_tools: installed ${missing_packages[*]}"
