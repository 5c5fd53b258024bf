"""The paper's recipes (examples/wikitext103, examples/enwik8) reproduce its rows, and run.

Every row of the paper's tables (tests/paper.py, written from the paper, not from the recipes)
must have a script whose fairseq-train and fairseq-eval-lm commands and a hydra config that
resolve, through fairseq's own parsers, to exactly that row: every model field, the segment
length, batch (GPUs x per-GPU batch), steps, optimiser, schedule, BPTT, losses and evaluation
settings. The scripts are run by bash as a user runs them, with stand-ins for the fairseq
commands that record their arguments; every recorded command is then run for real, in this
process, on a tiny stand-in corpus of the same format: the data preparation, 2 updates of
fairseq-train and every fairseq-eval-lm line. What a CPU and a stand-in corpus cannot take is
overridden, and only that (SHRINK, STAND_IN_PREPARE). One script and one hydra config also run
end to end through the real fairseq-train, fairseq-eval-lm and fairseq-hydra-train commands, and
two scripts run in their smoke mode (SMOKE=1) as a user runs them.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import eval_lm, train

from paper import BACKBONES, ROWS, TRAINING  # tests/paper.py

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent
DATASETS = tuple(ROWS)
ALL_ROWS = [(dataset, name) for dataset in DATASETS for name in ROWS[dataset]]
RECORDED = ("fairseq-train", "fairseq-eval-lm", "rmt-prepare-wikitext", "rmt-prepare-enwik8")

# The only overrides: a CPU-sized model and batch, one process, 2 updates, one validation step; the
# WikiText stand-in's vocabulary is smaller than the paper's adaptive-softmax cutoffs.
SHRINK = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--d-head", "16", "--d-inner", "64",
          "--distributed-world-size", "1", "--batch-size", "2", "--max-update", "2", "--max-valid-steps", "1",
          "--num-workers", "0"]
SHRINK_VOCAB = {"wikitext103": ["--adaptive-softmax-cutoff", "500,2000"], "enwik8": []}
# The stand-ins are not the real corpora, whose sizes and counts the preparation checks:
# (flags dropped, flags added) to the recipes' preparation command.
STAND_IN_PREPARE = {"wikitext103": (["--dataset", "wikitext-103"], []), "enwik8": ([], ["--no-verify"])}


def table(dataset):
    return yaml.safe_load((EXAMPLES / dataset / "recipes.yaml").read_text())


# --------------------------------------------------------------------------- the tables
def test_recipe_files_are_rendered_from_their_tables():
    proc = subprocess.run([sys.executable, EXAMPLES / "make_recipes.py", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dataset", DATASETS)
def test_tables_hold_exactly_the_papers_rows_and_numbers(dataset):
    rows = table(dataset)["rows"]
    assert list(rows) == list(ROWS[dataset])
    for name, row in rows.items():
        assert row["paper"] == ROWS[dataset][name]["paper"], name
        for eval_name, (number, _) in ROWS[dataset][name]["evals"].items():
            assert row["evals"][eval_name]["paper"] == number, f"{name}: {eval_name}"


# --------------------------------------------------------------------------- the scripts, as bash runs them
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Raw inputs in each corpus's format: WikiText token files and an enwik8 zip."""
    root = tmp_path_factory.mktemp("raw")
    data = (REPO / "examples" / "data" / "tiny-wikitext2" / "wiki.train.tokens").read_bytes()[:60_000]
    with zipfile.ZipFile(root / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", data)  # 54k / 3k / 3k bytes
    return {"wikitext103": REPO / "examples" / "data" / "tiny-wikitext2", "enwik8": root / "enwik8.zip"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, stand_ins):
    """{(dataset, row): [argv, ...]}: the commands each script runs, recorded by stand-ins on PATH."""
    root = tmp_path_factory.mktemp("recorded")
    shims = root / "bin"
    shims.mkdir()
    log = root / "commands.jsonl"
    for command in RECORDED:
        shim = shims / command
        shim.write_text(f'#!{sys.executable}\nimport json, sys\n'
                        f'open({str(log)!r}, "a").write(json.dumps(["{command}", *sys.argv[1:]]) + "\\n")\n')
        shim.chmod(0o755)
    commands = {}
    for dataset, name in ALL_ROWS:
        log.write_text("")
        env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", RAW=str(stand_ins[dataset]),
                   DATA=str(root / "data" / dataset), SAVE=str(root / "save" / dataset / name))
        for var in ("GPUS", "SMOKE", "PREPARE"):  # the paper's run, whatever the caller's shell sets
            env.pop(var, None)
        proc = subprocess.run(["bash", EXAMPLES / dataset / f"{name}.sh"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}.sh: {proc.stderr}"
        commands[dataset, name] = [json.loads(line) for line in log.read_text().splitlines()]
    return commands


def one(commands, program):
    (argv,) = [c[1:] for c in commands if c[0] == program]
    return argv


def parse_train(argv):
    """fairseq-train's parse of ``argv`` (arch defaults applied), as a flat namespace."""
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def parse_eval(argv):
    return options.parse_args_and_arch(options.get_eval_lm_parser(), argv)


def assert_is_the_paper_row(args, dataset, name):
    """``args``: fairseq's flat namespace of one training run."""
    paper = ROWS[dataset][name]
    model = dict(BACKBONES[dataset], num_mem_tokens=paper["num_mem_tokens"], mem_len=paper["mem_len"],
                 memory_layout=paper["memory_layout"], memory_target_token=paper["memory_token_loss_weight"] > 0)
    assert {k: getattr(args, k) for k in model} == model
    assert (args.task, args.tokens_per_sample, args.segments_per_sample) == ("rmt_lm", paper["tokens_per_sample"], 1)
    assert args.batch_size * args.distributed_world_size == paper["batch"]
    # BPTT as the authors' training loop runs it (docs/authors_model.md), where their numbers come from
    assert (args.criterion, args.bptt_depth, args.bptt_mode) == ("rmt_lm", paper["bptt_depth"], "authors")
    assert (args.memory_token_loss_weight, args.memory_only_loss_weight) == (paper["memory_token_loss_weight"], 0.0)
    assert args.max_update == paper["max_update"]
    assert {k: getattr(args, k) for k in TRAINING} == TRAINING


@pytest.mark.parametrize("dataset, name", ALL_ROWS)
def test_script_trains_and_evaluates_exactly_the_papers_row(recorded, dataset, name):
    commands = recorded[dataset, name]
    assert [c[0] for c in commands][:2] == [table(dataset)["prepare"][0], "fairseq-train"]
    args = parse_train(one(commands, "fairseq-train"))
    assert_is_the_paper_row(args, dataset, name)
    assert args.distributed_world_size == table(dataset)["rows"][name].get(
        "gpus", table(dataset)["defaults"]["gpus"])  # the multi-GPU form by default

    evals = [parse_eval(c[1:]) for c in commands if c[0] == "fairseq-eval-lm"]
    paper = ROWS[dataset][name]
    own = paper["paper_eval"]
    expected = [(own["tokens_per_sample"], own["batch_size"], own["model_overrides"])] + [
        (args["tokens_per_sample"], args["batch_size"], args["model_overrides"]) for _, args in paper["evals"].values()]
    assert [(e.tokens_per_sample, e.batch_size, eval(e.model_overrides)) for e in evals] == expected
    assert all(e.gen_subset == "test" and e.path.endswith("checkpoint_best.pt") for e in evals)


@pytest.mark.parametrize("dataset, name", ALL_ROWS)
def test_hydra_config_is_the_same_run_as_the_script(recorded, dataset, name):
    """Every value the config sets equals the script's (whose run is the paper's row, above).
    That fairseq-hydra-train reads such a config as written is shown by the real run below."""
    config = yaml.safe_load((EXAMPLES / dataset / "configs" / f"{name}.yaml").read_text())
    args = parse_train(one(recorded[dataset, name], "fairseq-train"))
    names = {"task": args.task, "model": "rmt", "criterion": args.criterion, "optimizer": args.optimizer,
             "lr_scheduler": args.lr_scheduler}
    assert set(config["model"]) - {"_name"} == set(BACKBONES[dataset]) | {"num_mem_tokens", "mem_len"}
    assert config.pop("hydra") == {"run": {"dir": "."}}  # hydra's own: run where the user stands
    for section, values in config.items():
        for key, value in values.items():
            if key == "_name":
                assert value == names[section], section
            elif key not in ("data", "save_dir", "tensorboard_logdir"):  # paths: the script's are variables
                assert value == getattr(args, key), f"{section}.{key}"


# --------------------------------------------------------------------------- every recipe runs
@pytest.fixture(scope="module")
def prepared(recorded, stand_ins):
    """Each dataset's preparation command, as the scripts give it, run on the stand-in."""
    data = {}
    for dataset in DATASETS:
        commands = [c for (d, _), cs in recorded.items() if d == dataset for c in cs if c[0].startswith("rmt-prepare")]
        assert all(c == commands[0] for c in commands), f"{dataset}: the recipes prepare the data differently"
        argv = list(commands[0])
        drop, add = STAND_IN_PREPARE[dataset]
        if drop:
            i = argv.index(drop[0])
            assert argv[i:i + len(drop)] == drop
            del argv[i:i + len(drop)]
        argv += add
        proc = subprocess.run([BIN / argv[0], *argv[1:], "--workers", "1"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data[dataset] = argv[argv.index("--destdir") + 1]
    return data


@pytest.mark.parametrize("dataset, name", ALL_ROWS)
def test_recipe_trains_2_updates_and_evaluates_on_a_stand_in(recorded, prepared, dataset, name):
    commands = recorded[dataset, name]
    train_argv = one(commands, "fairseq-train")
    assert train_argv[0] == prepared[dataset]
    # fairseq keeps the best validation loss seen on a function attribute: a fresh process would start
    # without it, and each run here must write its own checkpoint_best.pt
    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    train.main(convert_namespace_to_omegaconf(parse_train(train_argv + SHRINK + SHRINK_VOCAB[dataset])))
    save_dir = Path(train_argv[train_argv.index("--save-dir") + 1])
    assert (save_dir / "checkpoint_best.pt").is_file()
    for argv in [c[1:] for c in commands if c[0] == "fairseq-eval-lm"]:
        results = eval_lm.main(convert_namespace_to_omegaconf(parse_eval(argv)))
        assert math.isfinite(results["loss"]) and results["loss"] > 0, argv


def run_ok(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_a_script_runs_through_the_real_commands(prepared, tmp_path):
    """bash <row>.sh with the real fairseq-train and fairseq-eval-lm (PREPARE=0 takes the data-bin
    prepared above: the stand-in fails the real corpus's checks)."""
    dataset, name = "enwik8", "rmt_m20_bptt1"
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DATA=prepared[dataset], PREPARE="0",
               SAVE=str(tmp_path / "save"), GPUS="1")
    env.pop("SMOKE", None)
    log = run_ok(["bash", EXAMPLES / dataset / f"{name}.sh", *SHRINK, *SHRINK_VOCAB[dataset]], env=env)
    assert log.count("Loss (base 2)") == 1 + len(ROWS[dataset][name]["evals"])


# (dataset, row, fairseq-train flags the user adds): a row with memory and BPTT; a row with a cache,
# adaptive softmax and two evaluations, whose smoke run is shortened further by a flag
SMOKE_RUNS = [("enwik8", "rmt_m20_bptt1", []), ("wikitext103", "transformer_xl_mem150", ["--max-update", "10"])]


@pytest.mark.parametrize("dataset, name, flags", SMOKE_RUNS)
def test_smoke_mode_runs_a_row_quickly_on_another_data_bin(prepared, tmp_path, dataset, name, flags):
    """``SMOKE=1 DATA=... bash <row>.sh`` as the recipes' README gives it, from another directory,
    with DATA a data-bin that the recipe's RAW did not make (there is no RAW): it says first that
    it is a smoke run, uses DATA as it is, trains the tiny size for 20 updates (or what a flag
    says), validates, evaluates every evaluation of the row and ends by saying again that it was
    a smoke run, all within a minute."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", SMOKE="1", DATA=prepared[dataset],
               OMP_NUM_THREADS="1")
    for var in ("RAW", "SAVE", "GPUS", "PREPARE"):
        env.pop(var, None)
    start = time.monotonic()
    proc = subprocess.run(["bash", EXAMPLES / dataset / f"{name}.sh", *flags], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    elapsed = time.monotonic() - start
    log = proc.stdout
    assert proc.returncode == 0, log[-3000:]
    lines = log.splitlines()
    assert lines[0].startswith(f"SMOKE RUN of {name}.sh, NOT the paper's run"), lines[0]
    assert lines[-1].startswith(f"SMOKE RUN of {name}.sh finished") and "not the paper's" in lines[-1]
    assert f"using the data-bin DATA={prepared[dataset]} as it is" in log
    updates = flags[flags.index("--max-update") + 1] if flags else "20"
    assert f"num_updates: {updates} >= max_update: {updates}" in log
    params = int(re.search(r"num\. model params: ([\d,]+)", log).group(1).replace(",", ""))
    assert params < 1_000_000  # the tiny size, not the paper's 41M / 151M
    assert (tmp_path / "checkpoints" / dataset / f"{name}-smoke" / "checkpoint_best.pt").is_file()
    assert log.count("Loss (base 2)") == 1 + len(ROWS[dataset][name]["evals"])
    assert elapsed < 60, f"a smoke run took {elapsed:.0f} s"


def test_a_hydra_config_runs_through_fairseq_hydra_train(prepared, tmp_path):
    dataset, name = "wikitext103", "rmt_xl_150_10_bptt1"
    shrink = {"model.n_layer": 2, "model.d_model": 32, "model.n_head": 2, "model.d_head": 16, "model.d_inner": 64,
              "model.adaptive_softmax_cutoff": f"'{SHRINK_VOCAB[dataset][1]}'",
              "distributed_training.distributed_world_size": 1, "dataset.batch_size": 2,
              "optimization.max_update": 2, "dataset.max_valid_steps": 1, "dataset.num_workers": 0}
    # relative paths, from where the user stands (hydra must not move into outputs/DATE/TIME)
    paths = {"task.data": os.path.relpath(prepared[dataset], tmp_path), "checkpoint.save_dir": "save",
             "common.tensorboard_logdir": "tb"}
    overrides = [f"{key}={value}" for key, value in {**paths, **shrink}.items()]
    log = run_ok([BIN / "fairseq-hydra-train", "--config-dir", os.path.relpath(EXAMPLES / dataset / "configs", tmp_path),
                  "--config-name", name, *overrides], cwd=tmp_path)
    assert (tmp_path / "save" / "checkpoint_best.pt").is_file(), log[-2000:]
    assert not (tmp_path / "outputs").exists()
    assert "memory_token_loss" in log  # the paper's Tr-XL + RMT loss, logged on its own


@pytest.mark.parametrize("dataset, name", ALL_ROWS)
def test_script_help_names_the_papers_numbers_and_runs_nothing(dataset, name, tmp_path):
    proc = subprocess.run(["bash", EXAMPLES / dataset / f"{name}.sh", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PATH="/usr/bin:/bin"))  # no fairseq to run
    assert proc.returncode == 0, proc.stderr
    paper = ROWS[dataset][name]
    for number in [paper["paper"]] + [number for number, _ in paper["evals"].values()]:
        assert number in proc.stdout
    assert f"--arch {table(dataset)['rows'][name]['arch']}" in proc.stdout


def test_reproduction_report_prints_each_evaluation_beside_the_paper(recorded, prepared, tmp_path):
    """examples/reproduce.py runs the row's evaluations as its script does and prints ours beside the
    published numbers; each of ours equals fairseq-eval-lm's loss for that evaluation."""
    dataset, name = "enwik8", "transformer_xl_seg512_mem512"  # two evaluations, one with a cache override
    commands = recorded[dataset, name]
    train_argv = one(commands, "fairseq-train")
    save_dir = tmp_path / "save"
    i = train_argv.index("--save-dir")
    train_argv = train_argv[:i + 1] + [str(save_dir)] + train_argv[i + 2:]
    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    train.main(convert_namespace_to_omegaconf(parse_train(train_argv + SHRINK + SHRINK_VOCAB[dataset])))
    checkpoint = save_dir / "checkpoint_best.pt"
    report = run_ok([sys.executable, EXAMPLES / "reproduce.py", dataset, name, "--path", checkpoint,
                     "--data", prepared[dataset]], cwd=tmp_path)
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    evals = [c[1:] for c in commands if c[0] == "fairseq-eval-lm"]
    assert [r[2] for r in rows] == ["1.071", "1.06"] and len(evals) == 2
    for row, argv in zip(rows, evals):
        argv = [prepared[dataset], "--path", str(checkpoint)] + argv[argv.index("--path") + 2:]
        expected = float(eval_lm.main(convert_namespace_to_omegaconf(parse_eval(argv)))["loss"])
        assert float(row[3].rstrip(" |")) == pytest.approx(expected, abs=6e-4)
