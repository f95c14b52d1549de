#!/usr/bin/env bash
# Installs what pqfs needs on a Debian machine (run as root, or with sudo available):
# system packages, a virtualenv in .venv with pqfs (and with --test its test extras; with
# --bench also gocryptfs and rclone for contrib/bench), and a `pqfs` command in
# /usr/local/bin. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
bench=""
[ "${1:-}" = "--bench" ] && bench="gocryptfs rclone"  # peers for contrib/bench only

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

# shellcheck disable=SC2206
pkgs=(fuse3 libfuse3-dev pkg-config ffmpeg flac rsync age gcc python3-dev python3-venv $bench)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The first of these that really runs and is >= 3.11. Probed quietly: a pyenv shim is found by
# `command -v` for every version pyenv has, and when that version is not selected the shim
# fails with a page of advice on stderr.
py=""
for cand in python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
        "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        py="$cand"; break
    fi
done
[ -n "$py" ] || { echo "install: error: Python >= 3.11 is required" >&2; exit 1; }

[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
if [ -n "$extras" ]; then
    # typage (npm age-encryption), an independent age implementation with post-quantum keys,
    # for tests/test_typage.py; Debian's age (1.1.1) knows no post-quantum keys.
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "install: apt-get install nodejs npm"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    fi
    if [ ! -f .venv/typage/node_modules/age-encryption/package.json ]; then
        npm install --silent --no-audit --no-fund --prefix .venv/typage age-encryption@0.3.1 >/dev/null
    fi
fi
if [ -w /usr/local/bin ] || [ -n "$SUDO" ]; then
    $SUDO ln -sf "$PWD/.venv/bin/pqfs" /usr/local/bin/pqfs
fi
echo "install: pqfs $(.venv/bin/pqfs --version | cut -d' ' -f2) ready ($(command -v pqfs || echo .venv/bin/pqfs))"
