"""rmt-fairseq: the Recurrent Memory Transformer as a fairseq user-dir plugin.

Besides the ``rmt_plugin`` package this installs ``rmt_compat`` and ``rmt_compat.pth`` at the
root of site-packages, so that stock fairseq 0.12.2 runs on Python >= 3.11 and numpy 2
(see ``rmt_compat.py``). Both ``pip install .`` and ``pip install -e .`` install the ``.pth``.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "rmt_compat.pth"


class BuildPyWithPth(build_py):
    """Also puts rmt_compat.pth at the wheel root (setuptools has no option for that)."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel carries the .pth as well."""

    def __init__(self, strategy):
        self._strategy = strategy

    def __call__(self, wheel, files, mapping):
        self._strategy(wheel, files, mapping)
        with open(PTH, "rb") as f:
            wheel.writestr(PTH, f.read())

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self._strategy.__exit__(*exc)


class EditableWheelWithPth(editable_wheel):
    """``pip install -e .``: setuptools builds editable wheels without build_py's outputs."""

    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(
    name="rmt-fairseq",
    version="0.1.0",
    description="Recurrent Memory Transformer (RMT) and Transformer-XL for fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["rmt_plugin", "rmt_plugin.*", "rmt_data", "rmt_data.*"]),
    py_modules=["rmt_compat"],
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    entry_points={
        "console_scripts": [
            "rmt-prepare-enwik8 = rmt_data.enwik8:cli",
            "rmt-prepare-wikitext = rmt_data.wikitext:cli",
        ],
    },
    install_requires=[
        "fairseq==0.12.2",
        # fairseq's --tensorboard-logdir writes through tensorboardX (without it: "Please install
        # tensorboardX" and no events)
        "tensorboardX",
        # any torch fairseq runs on; install scripts pin torch==2.13.0 first (CPU wheel)
        "torch>=2.0",
        "numpy",
    ],
    extras_require={
        "plots": ["matplotlib"],
        "test": ["pytest", "pytest-xdist", "transformers==4.35.2", "tokenizers==0.15.2", "matplotlib"],
    },
)
