#!/usr/bin/env bash
# Install pqfs with its test extras (system packages included), then run every test tier,
# the linter and the type checker. This is what CI runs (.ci/run).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/install.sh" --test
cd "$here"
.venv/bin/ruff check pqfs tests contrib
.venv/bin/mypy
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache  # layers (pyproject.toml)
exec .venv/bin/python -m pytest -q "$@"
