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


def test_gpu_benchmark_dry_run_on_the_cpu(tmp_path):
    """scripts/gpu_benchmark.sh as the GPU machine runs it (the carried .whl/ installed over a
    Python 3.12 torch, byte-level WikiText-2 prepared, the benchmark, 30 updates of fairseq-train),
    with tiny sizes on the CPU: all but the GPU itself is checked before a device call is spent."""
    import os

    venv = REPO / ".venv312"
    if not (venv / "bin" / "python").exists():
        pytest.skip("needs .venv312 (test_check_py312_script_passes makes it)")
    if not (REPO.parent / "shared" / "data" / "wikitext-2").is_dir():
        pytest.skip("needs ../shared/data/wikitext-2")
    wheels = subprocess.run(["bash", "scripts/gpu_wheels.sh"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert wheels.returncode == 0, wheels.stdout[-3000:] + wheels.stderr[-3000:]
    # .venv312 is a venv with torch, as the GPU machine's python3 is
    env = {**os.environ, "GPU_BENCHMARK_DEVICE": "cpu", "GPU_BENCHMARK_PYTHON": str(venv / "bin" / "python"),
           "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_benchmark.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "benchmark.md").read_text()
    assert "Failed:" not in table and "| ours, Tr-XL + RMT (m, mem T), depth 1 |" in table
    assert "fairseq 0.12.2" in (tmp_path / "machine.txt").read_text()
    assert "done training" in (tmp_path / "train.log").read_text()
