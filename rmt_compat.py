"""Compatibility layer that lets stock fairseq 0.12.2 run on Python >= 3.11 and numpy 2.

fairseq 0.12.2 (the last release) and hydra-core 1.0.7 were written for Python <= 3.10 and
numpy < 1.24. This module restores the few old behaviours they rely on, **only for code that
lives in the ``fairseq``, ``fairseq_cli`` and ``hydra`` packages**; everybody else keeps the
modern behaviour. Nothing in site-packages is edited.

It is loaded by ``rmt_compat.pth`` (installed next to this module), which calls
:func:`install` at interpreter start. ``install`` only registers an import hook; each patch is
applied right after the module it patches (dataclasses, numpy, a few hydra/fairseq modules) loads.
Set ``RMT_FAIRSEQ_COMPAT=0`` to switch the whole layer off.

What is restored, and why (see also docs in the project README):

1. Dataclass defaults (Python >= 3.11 rejects unhashable defaults such as a dataclass
   instance). fairseq's ``FairseqConfig``/``TransformerConfig`` and hydra's ``hydra.conf`` use
   them, and fairseq reads ``Field.default`` back, so ``default_factory`` is *not* a fix. We give
   those classes the exact 3.10 semantics: the check runs on a hashable stand-in, then the real
   default is put back.
2. numpy 2 removed ``np.int``, ``np.float``, ``np.compat`` … which fairseq's data code uses;
   they are served to callers inside fairseq only.
3. hydra 1.0.7 scans plugins with ``FileFinder.find_module`` (removed in Python 3.12) and
   reports errors with ``traceback.print_exception(etype=...)`` (keyword removed in 3.10);
   both are fixed inside hydra's own modules.
4. ``--user-dir NAME`` also accepts an installed package name (e.g. ``--user-dir rmt_plugin``
   from any directory), not only a path.
5. fairseq behaviour that rmt_plugin relies on (``RELIED_ON``; the plugin checks at start-up that
   it is active and stops with one line if not, see ``rmt_plugin/checks.py``):

   - the task state is saved in checkpoints (``task_state``) but never restored on resume: it is
     now also handed back through ``extra_state`` (the same object, pickled once) and given to
     ``task.load_state_dict`` on every rank, unless ``--reset-dataloader`` starts the data over
     (the carried memory and the stream position of an exact resume);
   - only the saving rank builds the checkpoint state, so a task cannot gather the other
     data-parallel ranks' state: every rank now builds it at each save;
   - a model that runs several forwards per backward (``several_forwards_per_backward``, e.g.
     RMT's segments) gets fairseq's legacy_ddp, which reduces the gradients after the backward,
     whatever ``--ddp-backend`` says (torch's DDP allows one forward per backward).

6. Other fairseq 0.12.2 bugs that break long runs (fixed for every task, not only ours):

   - ``checkpoint_last.pt`` / ``checkpoint_best.pt`` were copied in place, so a kill during the
     copy left a truncated file that the rerun dies on: copies now go to a temporary file that
     replaces the target atomically, and a rerun whose last checkpoint is unreadable falls back
     to the newest intact one (one line names both) and removes stray ``*.pt.tmp`` files;
   - data parallel on the CPU: ``--distributed-world-size N --cpu`` asserted N GPUs, and with
     ``torchrun`` the default nccl backend and DDP's ``device_ids`` need GPUs. On the CPU the
     backend is now gloo, ``fairseq-train`` spawns N local processes (on ``--distributed-port``
     when given, outside SLURM) and DDP gets no device ids;
     resuming with several ranks failed in ``broadcast_object`` (torch >= 2.6 loads with
     ``weights_only=True``; the bytes come from rank 0 of the same job and hold omegaconf objects);
   - an ``--arch`` whose config interpolates a key the ``--task`` lacks (``--task rmt_lm --arch
     transformer_lm``: ``task.max_target_positions``) died in omegaconf; now one line names both;
   - unknown keys in ``--model-overrides`` (e.g. ``mem_lne``) were silently ignored; now an error
     names them;
   - ``--fp16``, ``--bf16`` and ``--amp`` on the CPU died inside the trainer; now one line says to
     train in fp32 there;
   - a run with ``--optimizer sgd`` (its config is saved as an ``argparse.Namespace``) could not
     resume under torch >= 2.6 (``weights_only`` loading): ``Namespace`` is allowed when loading;
   - noise that looks like a bug: every bias-less layer was logged as sharing its (absent) bias
     with the others ("detected shared parameter"), and on a machine without a GPU the data
     loader warned at every epoch that it cannot pin memory; both are gone.
"""

import importlib.machinery
import os
import sys

ENV_SWITCH = "RMT_FAIRSEQ_COMPAT"
OLD_CODE_PACKAGES = ("fairseq", "fairseq_cli", "hydra")

_TRIGGERS = frozenset(OLD_CODE_PACKAGES)

# Part 5, what rmt_plugin relies on: name -> (the patched module, the marker the patch sets there).
RELIED_ON = {
    "task state restored on resume": ("fairseq.trainer", "_rmt_compat_task_state"),
    "legacy_ddp for several forwards per backward": ("fairseq.models.distributed_fairseq_model",
                                                     "_rmt_compat_several_forwards"),
}


def enabled():
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _is_old_code(module_name):
    top = (module_name or "").partition(".")[0]
    return top in OLD_CODE_PACKAGES


# ---------------------------------------------------------------- 1. dataclass defaults
class _HashableStandIn:
    """Replaces an unhashable default while the stdlib validates the field."""

    __slots__ = ()


def _patch_dataclass_defaults():
    import dataclasses

    stock_get_field = dataclasses._get_field
    if getattr(stock_get_field, "_rmt_compat", False):
        return

    def _get_field(cls, a_name, a_type, *args, **kwargs):
        if not _is_old_code(getattr(cls, "__module__", None)):
            return stock_get_field(cls, a_name, a_type, *args, **kwargs)
        default = cls.__dict__.get(a_name, dataclasses.MISSING)
        holder = default if isinstance(default, dataclasses.Field) else None
        real = holder.default if holder is not None else default
        if real is dataclasses.MISSING or type(real).__hash__ is not None:
            return stock_get_field(cls, a_name, a_type, *args, **kwargs)
        stand_in = _HashableStandIn()
        if holder is not None:
            holder.default = stand_in
        else:
            setattr(cls, a_name, stand_in)
        try:
            f = stock_get_field(cls, a_name, a_type, *args, **kwargs)
        finally:
            if holder is not None:
                holder.default = real
            else:
                setattr(cls, a_name, real)
        f.default = real
        return f

    _get_field._rmt_compat = True
    dataclasses._get_field = _get_field


# ---------------------------------------------------------------- 2. numpy aliases
def _numpy_aliases():
    """The aliases numpy 1.x had and fairseq 0.12.2 still uses (np.compat.long, np.int, ...)."""
    import types

    return {
        "int": int,
        "float": float,
        "long": int,
        "compat": types.SimpleNamespace(long=int, unicode=str, integer_types=(int,)),
    }


def _patch_numpy():
    import numpy as np

    stock_getattr = getattr(np, "__getattr__", None)
    if getattr(stock_getattr, "_rmt_compat", False):
        return
    aliases = _numpy_aliases()

    def __getattr__(name):
        if name in aliases and _is_old_code(sys._getframe(1).f_globals.get("__name__")):
            return aliases[name]
        if stock_getattr is None:
            raise AttributeError(f"module 'numpy' has no attribute {name!r}")
        return stock_getattr(name)

    __getattr__._rmt_compat = True
    np.__getattr__ = __getattr__


# ---------------------------------------------------------------- 3. hydra fixes
class _LegacyImporter:
    """Gives a PEP 451 finder the ``find_module`` that hydra 1.0's plugin scan calls."""

    def __init__(self, finder):
        self._finder = finder

    def find_module(self, fullname):
        spec = self._finder.find_spec(fullname)
        return None if spec is None else spec.loader

    def __getattr__(self, name):
        return getattr(self._finder, name)


class _HydraPkgutil:
    """``pkgutil`` as hydra.core.plugins sees it: importers that still have find_module."""

    def __init__(self, pkgutil):
        self._pkgutil = pkgutil

    def walk_packages(self, *args, **kwargs):
        for importer, modname, ispkg in self._pkgutil.walk_packages(*args, **kwargs):
            if not hasattr(importer, "find_module"):
                importer = _LegacyImporter(importer)
            yield importer, modname, ispkg

    def __getattr__(self, name):
        return getattr(self._pkgutil, name)


def _fix_hydra_plugins(module):
    module.pkgutil = _HydraPkgutil(module.pkgutil)


def _fix_hydra_utils(module):
    import traceback

    def print_exception(etype=None, value=None, tb=None, **kwargs):
        traceback.print_exception(value, value=value, tb=tb, **kwargs)

    module.print_exception = print_exception


# ---------------------------------------------------------------- 4. --user-dir by name
def _fix_fairseq_utils(module):
    import importlib.util

    stock = module.import_user_module

    def import_user_module(args):
        user_dir = getattr(args, "user_dir", None)
        if user_dir and not os.path.exists(user_dir) and os.sep not in user_dir:
            spec = importlib.util.find_spec(user_dir)
            if spec is not None and spec.submodule_search_locations:
                args.user_dir = list(spec.submodule_search_locations)[0]
        return stock(args)

    module.import_user_module = import_user_module


# ---------------------------------------------------------------- 5. what rmt_plugin relies on (and 6.)
def _fix_fairseq_trainer(module):
    Trainer = module.Trainer
    stock_state_dict, stock_load = Trainer.state_dict, Trainer.load_checkpoint
    stock_always_call = Trainer.always_call_state_dict_during_save_checkpoint

    def state_dict(self):
        state = stock_state_dict(self)
        # load_checkpoint returns only extra_state (on every rank): a reference there, not a copy
        state["extra_state"]["task_state"] = state["task_state"]
        return state

    def load_checkpoint(self, filename, *args, **kwargs):
        extra_state = stock_load(self, filename, *args, **kwargs)
        task_state = (extra_state or {}).pop("task_state", None)
        if task_state and self.task is not None and not self.cfg.checkpoint.reset_dataloader:
            self.task.load_state_dict(task_state)
        return extra_state

    def always_call_state_dict_during_save_checkpoint(self):
        # the task state may gather from every data-parallel rank
        return stock_always_call.fget(self) or self.data_parallel_world_size > 1

    Trainer.state_dict = state_dict
    Trainer.load_checkpoint = load_checkpoint
    Trainer.always_call_state_dict_during_save_checkpoint = property(always_call_state_dict_during_save_checkpoint)
    setattr(module, RELIED_ON["task state restored on resume"][1], True)
    _fix_shared_parameter_catalog(module)


def _fix_shared_parameter_catalog(module):
    """Part 6: fairseq catalogues a model's shared parameters to re-tie them after moving it, and
    took every bias-less layer's ``bias = None`` for one parameter shared by all of them (a log
    line "detected shared parameter" per such layer). Only real parameters count now."""
    import functools

    stock_catalog = module._catalog_shared_params

    def _catalog_shared_params(model, memo=None, prefix=""):
        shared = stock_catalog(model, memo, prefix)
        if memo is not None:  # a recursive call fills memo; the first one returns the groups
            return shared
        return [paths for paths in shared if functools.reduce(getattr, paths[0].split("."), model) is not None]

    module._catalog_shared_params = _catalog_shared_params


def _atomic_copy(stock_copy):
    def copy(src_path, dst_path, overwrite=False):
        """Copy through ``dst_path + '.tmp'`` and an atomic rename: a kill leaves the old file."""
        if not (overwrite and os.path.isfile(src_path)):
            return stock_copy(src_path, dst_path, overwrite)
        import shutil

        tmp = dst_path + ".tmp"
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
        return True

    return copy


def _fix_fairseq_iterators(module):
    """Part 6: fairseq's data loaders ask for pinned memory, which on a machine without a GPU does
    nothing but warn at every epoch; the warning is dropped there (with a GPU nothing changes)."""
    import warnings

    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator")


def _fix_fairseq_checkpoint_utils(module):
    from fairseq.file_io import PathManager

    PathManager.copy = staticmethod(_atomic_copy(PathManager.copy))
    stock_load = module.load_checkpoint

    def load_checkpoint(cfg, trainer, **passthrough_args):
        if trainer.data_parallel_rank == 0 and not cfg.no_save:
            _repair_last_checkpoint(cfg.save_dir, module)
        return stock_load(cfg, trainer, **passthrough_args)

    module.load_checkpoint = load_checkpoint
    stock_overwrite = module.overwrite_args_by_name

    def overwrite_args_by_name(cfg, overrides):
        unknown = sorted(set(overrides) - _config_keys(cfg))
        if unknown:
            raise ValueError(f"--model-overrides: {', '.join(map(repr, unknown))} not in the checkpoint's "
                             "configuration (a typo?)")
        return stock_overwrite(cfg, overrides)

    module.overwrite_args_by_name = overwrite_args_by_name
    stock_load_to_cpu = module.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(*args, **kwargs):
        # optimizers without a dataclass config (--optimizer sgd) save it as an argparse
        # Namespace, which torch >= 2.6 refuses to load by default: such runs could not resume
        import argparse

        import torch

        with torch.serialization.safe_globals([argparse.Namespace]):
            return stock_load_to_cpu(*args, **kwargs)

    module.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def _config_keys(cfg):
    """Every key at every level of a checkpoint's configuration (as overrides match them)."""
    from argparse import Namespace

    from omegaconf import DictConfig

    if isinstance(cfg, Namespace):
        return set(vars(cfg))
    keys = set()
    for key in cfg.keys():
        keys.add(key)
        value = cfg._get_node(key)
        if isinstance(value, (DictConfig, Namespace)) or isinstance(getattr(value, "_val", None), Namespace):
            keys |= _config_keys(cfg[key])
    return keys


def _readable_checkpoint(path):
    """Whether ``path`` is a complete torch zip archive (every member's CRC checked)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def _repair_last_checkpoint(save_dir, checkpoint_utils):
    """Remove stray ``*.pt.tmp`` files; replace an unreadable ``checkpoint_last.pt`` by the newest
    intact checkpoint (by modification time). Example: ``checkpoint_last.pt`` cut at 3 of 41 MB
    while ``checkpoint_1_200.pt`` is whole: the latter is copied over it and training goes on."""
    if not os.path.isdir(save_dir):
        return
    import logging

    logger = logging.getLogger("rmt_compat")
    names = os.listdir(save_dir)
    for name in names:
        if name.endswith(".pt.tmp"):
            os.remove(os.path.join(save_dir, name))
    last = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.isfile(last) or _readable_checkpoint(last):
        return
    candidates = sorted((os.path.join(save_dir, n) for n in names if n.endswith(".pt") and n.startswith("checkpoint")
                         and n != "checkpoint_last.pt"), key=os.path.getmtime, reverse=True)
    intact = next((path for path in candidates if _readable_checkpoint(path)), None)
    if intact is None:
        raise RuntimeError(f"{last} is unreadable (truncated?) and {save_dir} holds no intact checkpoint: "
                           "remove it to start from scratch")
    logger.warning(f"{last} is unreadable (truncated?): resuming from {intact}, the newest intact checkpoint")
    checkpoint_utils.PathManager.copy(intact, last, overwrite=True)


def _fix_fairseq_distributed_utils(module):
    stock_call_main = module.call_main

    def call_main(cfg, main, **kwargs):
        import torch

        _check_precision_device(cfg)
        dist = cfg.distributed_training
        torchrun = all(key in os.environ for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"))
        on_cpu = cfg.common.cpu or not torch.cuda.is_available()
        if not on_cpu or not (dist.distributed_world_size > 1 or torchrun):
            return stock_call_main(cfg, main, **kwargs)
        if dist.distributed_backend == "nccl":
            dist.distributed_backend = "gloo"  # nccl needs GPUs
        slurm = "SLURM_JOB_NODELIST" in os.environ or "SLURM_STEP_NODELIST" in os.environ
        if torchrun or slurm or dist.distributed_init_method is not None:
            return stock_call_main(cfg, main, **kwargs)
        # fairseq spawns one process per GPU; on the CPU, one per rank of this machine
        port = dist.distributed_port if dist.distributed_port > 0 else _free_port()
        dist.distributed_init_method = f"tcp://localhost:{port}"
        kwargs["start_rank"], dist.distributed_rank = dist.distributed_rank, None
        torch.multiprocessing.spawn(fn=module.distributed_main, args=(main, cfg, kwargs),
                                    nprocs=dist.distributed_world_size, join=True)

    module.call_main = call_main
    # broadcast_object unpickles what rank 0 of this job pickled (the checkpoint state, with
    # omegaconf objects); torch >= 2.6 refuses those by default (weights_only=True)
    module.torch = _TorchLoadingOwnObjects(module.torch)


class _TorchLoadingOwnObjects:
    """``torch`` for fairseq.distributed.utils, whose only ``torch.load`` reads another rank's bytes."""

    def __init__(self, torch):
        self._torch = torch

    def load(self, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self._torch.load(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def _check_precision_device(cfg):
    """fairseq's --fp16/--bf16/--amp need a GPU (bf16 also a TPU); on the CPU they died deep inside
    the trainer (``'NoneType' object has no attribute 'xla_device'``, ``Torch not compiled with
    CUDA enabled``). Stop at start-up instead."""
    import importlib.util

    import torch

    common = cfg.common
    on_cpu = common.cpu or not torch.cuda.is_available()
    tpu = common.tpu and importlib.util.find_spec("torch_xla") is not None  # fairseq sets tpu for --bf16
    flags = [flag for flag, on in [("--fp16", common.fp16), ("--memory-efficient-fp16", common.memory_efficient_fp16),
                                   ("--bf16", common.bf16), ("--memory-efficient-bf16", common.memory_efficient_bf16),
                                   ("--amp", common.amp)] if on]
    if on_cpu and not tpu and flags:
        raise ValueError(f"{flags[0]} needs a GPU; on the CPU train in fp32 (drop {flags[0]})")


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _fix_fairseq_distributed_model(module):
    stock_ddp, stock_wrap = module.DistributedDataParallel, module.DistributedFairseqModel

    def DistributedFairseqModel(args, model, process_group, device):
        # torch's DDP needs exactly one forward per backward; legacy_ddp reduces after the backward
        if args.ddp_backend in {"c10d", "pytorch_ddp"} and getattr(model, "several_forwards_per_backward", False):
            import logging

            logging.getLogger("rmt_compat").info(
                f"--ddp-backend {args.ddp_backend}: {type(model).__name__} runs several forwards per "
                "backward, using legacy_ddp (gradients reduced after the backward)")
            args.ddp_backend = "legacy_ddp"
        return stock_wrap(args, model, process_group, device)

    class DistributedDataParallel(stock_ddp):
        """torch's DDP, without the device ids fairseq passes for a model on the CPU."""

        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)

    module.DistributedDataParallel = DistributedDataParallel
    module.DistributedFairseqModel = DistributedFairseqModel
    setattr(module, RELIED_ON["legacy_ddp for several forwards per backward"][1], True)


def _fix_fairseq_dataclass_utils(module):
    stock_convert = module.convert_namespace_to_omegaconf

    def convert_namespace_to_omegaconf(args):
        from omegaconf.errors import OmegaConfBaseException

        try:
            return stock_convert(args)
        except OmegaConfBaseException as e:
            key = str(e).partition("interpolation key '")[2].partition("'")[0]
            if not key:
                raise
            raise ValueError(f"--arch {getattr(args, 'arch', None)} reads '{key}', which --task "
                             f"{getattr(args, 'task', None)} does not have: pick an architecture made for "
                             "that task") from None

    module.convert_namespace_to_omegaconf = convert_namespace_to_omegaconf


# ---------------------------------------------------------------- import hook
def _after_dataclasses(module):
    _patch_dataclass_defaults()


def _after_numpy(module):
    _patch_numpy()


# Patched right after they load. dataclasses and numpy are hooked themselves (not only the old
# packages) because another import hook, e.g. pytest's for its plugins (hydra is one), may load
# the old packages without asking us.
_POST_IMPORT_FIXES = {
    "dataclasses": _after_dataclasses,
    "numpy": _after_numpy,
    "hydra.core.plugins": _fix_hydra_plugins,
    "hydra._internal.utils": _fix_hydra_utils,
    "fairseq.utils": _fix_fairseq_utils,
    "fairseq.dataclass.utils": _fix_fairseq_dataclass_utils,
    "fairseq.trainer": _fix_fairseq_trainer,
    "fairseq.checkpoint_utils": _fix_fairseq_checkpoint_utils,
    "fairseq.data.iterators": _fix_fairseq_iterators,
    "fairseq.distributed.utils": _fix_fairseq_distributed_utils,
    "fairseq.models.distributed_fairseq_model": _fix_fairseq_distributed_model,
}


def apply():
    """Apply the patches for whatever of dataclasses / numpy is already imported (idempotent)."""
    if "dataclasses" in sys.modules:
        _patch_dataclass_defaults()
    if "numpy" in sys.modules:
        _patch_numpy()


class _Loader:
    def __init__(self, loader, fix):
        self._loader = loader
        self._fix = fix

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._fix(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Runs each fix right after its module has been executed; loads nothing itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in _TRIGGERS:
            apply()
        fix = _POST_IMPORT_FIXES.get(fullname)
        if fix is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            spec = importlib.machinery.BuiltinImporter.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, fix)
        return spec


def install():
    """Called from ``rmt_compat.pth`` at interpreter start: cheap, imports nothing heavy."""
    if not enabled() or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    apply()
