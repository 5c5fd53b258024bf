"""README's Install section, run as written, in a fresh virtual environment.

The command for "an environment of your own" is read from README.md's Install code block, so this
test breaks when README's command does. It runs in a fresh ``python -m venv`` with a copy of the
clone (its tracked files, as ``git clone`` gives them) as the working directory, and the result
must do what README promises: the plot scripts run (matplotlib, the ``plots`` extra),
``fairseq-train --user-dir rmt_plugin`` knows ``--task rmt_lm``, and ``rmt_plugin`` imports from
another directory. README also promises the compat layer for ``pip install .`` and
``--user-dir rmt_plugin`` from anywhere with an installed package: the same command with the clone's
path instead of ``-e .``, run from elsewhere, must give an installation that works once the clone
is gone.

It needs PyPI. pip's wheel cache makes it fast once fairseq 0.12.2, which builds from source on
Python >= 3.11, has been built here (scripts/setup_env.sh does that): about 80 s on 2 cores.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_install_command():
    """The one ``pip install ...`` line of the code block in README.md's "## Install" section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    (line,) = [line for line in block.splitlines() if line.startswith("pip install")]
    return line


def copy_clone(dest):
    """The clone's tracked files (as in the working tree) copied to ``dest``."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def fresh_venv(path):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return dict(env, PATH=f"{path / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(path), OMP_NUM_THREADS="1",
                PIP_DISABLE_PIP_VERSION_CHECK="1")


def run_ok(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    assert proc.returncode == 0, f"{cmd} (in {cwd}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def assert_installed(venv, elsewhere, env, clone=None):
    """What README promises of an installed venv, checked from ``elsewhere`` (not the clone)."""
    out = run_ok([venv / "bin" / "fairseq-train", "--user-dir", "rmt_plugin", "--help"], elsewhere, env)
    assert "rmt_lm" in out, "fairseq-train --user-dir rmt_plugin --help does not list the task rmt_lm"
    where, torchaudio = run_ok([venv / "bin" / "python", "-c", "import importlib.util, rmt_plugin, rmt_data; "
                                "print(rmt_plugin.__file__); print(importlib.util.find_spec('torchaudio'))"],
                               elsewhere, env).strip().splitlines()[-2:]
    assert Path(where).is_relative_to(clone if clone else venv), where
    assert torchaudio == "None", f"torchaudio is installed ({torchaudio}): it cannot load against torch 2.13"
    assert run_ok([venv / "bin" / "rmt-prepare-enwik8", "--help"], elsewhere, env).startswith("usage:")


def test_readme_install_from_the_clone_and_without_it(tmp_path):
    """README's command as written, in a fresh venv with the clone as the working directory
    (editable); then the same command with the clone's path instead of ``-e .``, run from elsewhere,
    into that venv (not editable: the package replaces the editable one), which must work once the
    clone is gone. One venv for both keeps this near a minute: torch is installed once."""
    clone, elsewhere = copy_clone(tmp_path / "rmt-fairseq"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    venv = tmp_path / "venv"
    env = fresh_venv(venv)
    readme = readme_install_command()
    run_ok(readme, clone, env)
    out = run_ok([venv / "bin" / "python", "scripts/plot_memory_diagnostics.py", "--help"], clone, env)
    assert out.startswith("usage:")  # it imports matplotlib first
    assert "rmt_lm" in run_ok([venv / "bin" / "fairseq-train", "--user-dir", "rmt_plugin", "--help"], clone, env)
    assert_installed(venv, elsewhere, env, clone=clone)  # editable: the code is the clone's

    assert '-e ".[plots]"' in readme, readme
    run_ok(readme.replace('-e ".[plots]"', f'"{clone}[plots]"'), elsewhere, env)
    shutil.rmtree(clone)
    assert_installed(venv, elsewhere, env)
