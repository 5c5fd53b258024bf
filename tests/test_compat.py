"""The compat layer: fairseq 0.12.2 imports and runs, and only fairseq/hydra see old behaviour."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_python(code, env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_fairseq_imports_with_python_310_dataclass_semantics():
    proc = run_python("""
        import fairseq, fairseq_cli.train, fairseq_cli.eval_lm
        from fairseq.dataclass.configs import FairseqConfig, CommonConfig
        default = FairseqConfig.__dataclass_fields__["common"].default
        assert type(default) is CommonConfig, type(default)   # the instance, as on 3.10
        assert FairseqConfig.common is default                  # and the class attribute too
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_switched_off_by_environment_variable():
    proc = run_python("import fairseq", {"RMT_FAIRSEQ_COMPAT": "0"})
    if sys.version_info < (3, 11):
        pytest.skip("Python < 3.11 imports fairseq 0.12.2 without the compat layer")
    assert proc.returncode != 0
    assert "mutable default" in proc.stderr


def test_other_modules_keep_modern_dataclass_and_numpy_behaviour():
    proc = run_python("""
        import dataclasses, fairseq, numpy as np
        try:
            @dataclasses.dataclass
            class Outer:
                inner: dict = {}
        except ValueError as e:
            print("dataclass raises:", e)
        try:
            np.float
        except AttributeError:
            print("np.float raises")
        try:
            np.compat
        except AttributeError:
            print("np.compat raises")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "dataclass raises: mutable default" in proc.stdout
    assert "np.float raises" in proc.stdout
    assert "np.compat raises" in proc.stdout


def test_fairseq_code_sees_the_removed_numpy_aliases():
    # TokenBlockDataset's eos break mode uses np.compat.long, data_utils uses np.int.
    proc = run_python("""
        import numpy as np, torch
        from fairseq.data import TokenBlockDataset
        items = [torch.tensor([5, 6, 2]), torch.tensor([7, 2])]
        ds = TokenBlockDataset(items, np.array([3, 2]), block_size=None, pad=1, eos=2, break_mode="eos")
        print(len(ds), ds[1].tolist())
        fake_fairseq_module = {"__name__": "fairseq.some_module", "np": np}
        exec("value = np.int(3.7)", fake_fairseq_module)
        print(fake_fairseq_module["value"])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "[7,", "2]", "3"]


def test_hydra_reports_errors_instead_of_a_typeerror():
    proc = run_python("""
        from hydra._internal.utils import run_and_report
        def broken():
            raise RuntimeError("the real error")
        run_and_report(broken)
    """)
    assert proc.returncode == 1
    assert "RuntimeError: the real error" in proc.stderr
    assert "TypeError" not in proc.stderr


def test_hydra_plugin_scan_gets_find_module_on_any_python():
    import importlib.machinery

    import rmt_compat

    finder = importlib.machinery.FileFinder(
        str(REPO), (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))
    loader = rmt_compat._LegacyImporter(finder).find_module("rmt_compat")
    assert loader is not None and loader.get_filename("rmt_compat").endswith("rmt_compat.py")
    proc = run_python("""
        from hydra.core.plugins import Plugins
        from hydra.plugins.launcher import Launcher
        print(len(Plugins.instance().discover(Launcher)) > 0)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_user_dir_accepts_the_installed_package_name(tmp_path):
    proc = run_python("""
        import argparse
        from fairseq import utils
        from fairseq.models import ARCH_MODEL_REGISTRY
        utils.import_user_module(argparse.Namespace(user_dir="rmt_plugin"))
        print("rmt_tiny" in ARCH_MODEL_REGISTRY)
    """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_wheel_ships_the_pth_at_its_root(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("rmt_fairseq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rmt_compat.pth" in names and "rmt_compat.py" in names
    assert "rmt_plugin/model.py" in names
    # data preparation is part of the package, as commands: a pip install without a clone has it
    assert {"rmt_data/common.py", "rmt_data/byte_level.py", "rmt_data/enwik8.py", "rmt_data/wikitext.py"} <= set(names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    commands = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "rmt-prepare-enwik8 = rmt_data.enwik8:cli" in commands
    assert "rmt-prepare-wikitext = rmt_data.wikitext:cli" in commands
    requirements = zipfile.ZipFile(wheel).read(entry_points.replace("entry_points.txt", "METADATA")).decode()
    assert "Requires-Dist: tensorboardX" in requirements  # fairseq's --tensorboard-logdir writes through it


def test_this_environment_loads_the_pth():
    import rmt_compat

    assert any(isinstance(f, rmt_compat._Finder) for f in sys.meta_path)


@pytest.mark.parametrize("name", ["task state restored on resume", "legacy_ddp for several forwards per backward"])
def test_the_plugin_stops_with_one_line_without_the_fairseq_fixes_it_relies_on(name, monkeypatch):
    """rmt_compat part 5 is what exact resume and data parallel rest on: a task whose fairseq lacks
    one of those fixes refuses to build its model (the marker the fix sets is taken away here)."""
    import importlib

    import rmt_compat
    from rmt_plugin.checks import ChecksCriterionAgainstModel, require_compat_fixes

    require_compat_fixes()  # active here: nothing to say
    module, marker = rmt_compat.RELIED_ON[name]
    monkeypatch.delattr(importlib.import_module(module), marker)
    with pytest.raises(RuntimeError, match=f"rmt_plugin needs fairseq fixed by rmt_compat \\({name}\\)"):
        require_compat_fixes()

    class Base:
        def build_model(self, cfg, from_checkpoint=False):
            return "model"

    class Task(ChecksCriterionAgainstModel, Base):  # as rmt_lm and rmt_memory are made
        pass

    with pytest.raises(RuntimeError, match="rmt_plugin needs fairseq fixed by rmt_compat"):
        Task().build_model(None)


def test_no_noise_about_shared_biases_or_pinned_memory(tiny_data_bin, tmp_path):
    """A training run logs no "detected shared parameter" for bias-less layers (a paper
    architecture's one (u, v) pair is a real shared parameter of the decoder alone, not of each
    layer) and no pin_memory warning on the CPU."""
    from fairseq import trainer

    import rmt_plugin  # noqa: F401
    from conftest import run_cli

    log = run_cli("fairseq_cli.train", tiny_data_bin, "--user-dir", "rmt_plugin", "--task", "rmt_lm",
                  "--arch", "rmt_tiny", "--criterion", "rmt_lm", "--tokens-per-sample", "8", "--batch-size", "4",
                  "--optimizer", "adam", "--lr", "1e-3", "--max-update", "2", "--cpu", "--num-workers", "0",
                  "--save-dir", tmp_path / "ckpt", "--no-save", cwd=tmp_path)
    assert "train_inner" in log or "num_updates" in log
    assert "detected shared parameter" not in log and "pin_memory" not in log
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    assert trainer._catalog_shared_params(layer) == []  # the Nones are no parameter
    tied = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    tied[1].weight = tied[0].weight
    assert trainer._catalog_shared_params(tied) == [["0.weight", "1.weight"]]
