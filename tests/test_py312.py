"""Opt-in: stock fairseq 0.12.2 + rmt_compat on Python 3.12 (``pytest -m py312``).

Runs ``scripts/check_py312.sh``, which creates (or reuses) ``.venv312`` with Python 3.12, installs
torch and the project, and checks imports, the compat layer's scoping, and short runs of
fairseq-preprocess / fairseq-train / fairseq-eval-lm / fairseq-hydra-train (transformer_lm and,
once the plugin registers them, rmt_tiny with the rmt_lm task and criterion). The first run
downloads torch (~0.9 GB with the default TORCH_SPEC, see the script); later runs take ~1.5 min.
"""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_py312.sh"

pytestmark = pytest.mark.py312


def test_check_py312_script_passes():
    found = subprocess.run(["bash", str(SCRIPT), "--find-python"], capture_output=True, text=True,
                           timeout=60)
    if found.returncode != 0:
        pytest.skip("no Python 3.12 interpreter found (looked for $PYTHON312, python3.12 on PATH "
                    "and pyenv's 3.12.x); set PYTHON312 to run this check")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    summary = proc.stdout[proc.stdout.rfind("================ check_py312 summary"):]
    assert proc.returncode == 0, (
        f"check_py312.sh exited {proc.returncode} (2: environment could not be set up)\n"
        f"{summary or proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    assert "RESULT: PASS" in summary, proc.stdout[-6000:]
