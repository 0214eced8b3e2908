#!/usr/bin/env bash
# Set up, then the test suite (CPU, no network): ruff, then pytest with the reproducible
# hypothesis profile. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check mixq tests benchmarks
HYPOTHESIS_PROFILE=ci python3 -m pytest -q "$@"
