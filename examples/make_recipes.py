#!/usr/bin/env python3
"""Render the paper's recipes from their tables: examples/<dataset>/recipes.yaml gives, per row
of the RMT paper's tables, <row>.sh (data preparation, fairseq-train, fairseq-eval-lm),
configs/<row>.yaml (the same training run for fairseq-hydra-train) and README.md (the table).

The tables use fairseq's own names: a section is a hydra config group (task, model, criterion,
optimizer, lr_scheduler, optimization) and a key is a dataclass field, so one entry becomes both
the flag (``bptt_depth: 1`` -> ``--bptt-depth 1``) and the hydra value (``criterion.bptt_depth:
1``). A row overrides the table's ``defaults`` section by section; ``batch`` is the number of
streams per update over all ``gpus`` (per-GPU ``--batch-size`` = batch / GPUs).

    python examples/make_recipes.py           # (re)write the files
    python examples/make_recipes.py --check   # exit 1 if a file differs from its table
"""

import argparse
import shlex
import sys
import textwrap
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parent
DATASETS = ("wikitext103", "enwik8")
FLAG_SECTIONS = ("task", "criterion", "optimizer", "lr_scheduler", "optimization")
# On the command line the named --arch gives the backbone and these are spelled out in every row.
MEMORY_FIELDS = ("num_mem_tokens", "memory_layout", "mem_len", "memory_target_token")
# Logistics (not the paper's): validate and keep the best checkpoint every 4000 updates.
VALIDATE_EVERY = 4000
LOG_INTERVAL = 200
# SMOKE=1 (not the paper's run): checks that a row starts, trains, validates and evaluates on any
# data-bin in a minute or two on a CPU. The row keeps its memory, BPTT and segment length; the
# size is the *_tiny architectures', one process. Given as hydra config values, so that the recipes'
# README can give the same run for fairseq-hydra-train; fairseq-train flags given to a script come
# after these, so they override them.
SMOKE_VALUES = {"model": {"n_layer": 2, "d_model": 64, "n_head": 2, "d_head": 32, "d_inner": 128},
                "distributed_training": {"distributed_world_size": 1},
                "dataset": {"batch_size": 2, "max_valid_steps": 2},
                "optimization": {"max_update": 20},
                "common": {"log_interval": 5}}
SMOKE_TEST_SHARDS = 50  # a smoke evaluation scores the first 1/50 of the test split (shard 0 of 50)
TEST_SET = '"${TEST_SET[@]}"'  # the scripts' --gen-subset test; in a smoke run, with its first shard
GENERATED = "Rendered from examples/{dir}/recipes.yaml by examples/make_recipes.py: edit the table, not this file."


def load_table(dataset):
    return yaml.safe_load((EXAMPLES / dataset / "recipes.yaml").read_text())


def merged(defaults, row):
    """``row`` over ``defaults``, dicts merged key by key at every level.

    Example: merged({"task": {"a": 1, "b": 2}}, {"task": {"b": 3}}) == {"task": {"a": 1, "b": 3}}
    """
    out = dict(defaults)
    for key, value in row.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipes(dataset):
    """{row name: the row with the table's defaults filled in}."""
    table = load_table(dataset)
    return {name: merged(table["defaults"], row) for name, row in table["rows"].items()}


# ----------------------------------------------------------------------------- flags
def flag(name):
    return "--" + name.replace("_", "-")


def flag_value(value):
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def flags(section, keys=None):
    """fairseq-train flags for one table section; a boolean becomes a bare flag when true (false is
    every boolean's default: the test checks the resolved value)."""
    out = []
    for key, value in section.items():
        if key == "_name" or (keys is not None and key not in keys):
            continue
        if isinstance(value, bool):
            out += [flag(key)] if value else []
        elif value is not None:
            out += [flag(key), flag_value(value)]
    return out


def quote(word):
    if word.startswith("$") or word.startswith('"$'):
        return word  # a shell expansion, quoted where written
    if "'" in word and not any(c in word for c in '"$`\\'):
        return f'"{word}"'
    return shlex.quote(word)


def shell_line(words):
    return " ".join(quote(w) for w in words)


def model_overrides(overrides):
    """--model-overrides takes a Python dict literal: {'mem_len': 640, 'same_length': True}."""
    return repr(dict(overrides))


def train_lines(row):
    """The fairseq-train command, one line per config group, for the script."""
    section_names = {"criterion": "rmt_lm"}  # the others name themselves with _name
    lines = [
        ["--user-dir", "rmt_plugin", "--task", "rmt_lm", *flags(row["task"])],
        ["--arch", row["arch"], *flags(row["model"], keys=MEMORY_FIELDS)],
    ]
    for section in FLAG_SECTIONS[1:]:
        name = row[section].get("_name", section_names.get(section))
        head = [flag(section), name] if name else []
        lines.append(head + flags(row[section]))
    lines.append(["--distributed-world-size", '"$GPUS"', "--batch-size", f"$(({row['batch']} / GPUS))"])
    lines.append(["--save-dir", '"$SAVE"', "--no-epoch-checkpoints", "--keep-interval-updates", "1",
                  "--validate-interval-updates", str(VALIDATE_EVERY), "--save-interval-updates", str(VALIDATE_EVERY)])
    lines.append(["--log-format", "json", "--log-interval", str(LOG_INTERVAL), "--tensorboard-logdir", '"$SAVE/tb"',
                  '"$@"'])
    return lines


def eval_words(args, subset=("--gen-subset", "test")):
    """fairseq-eval-lm's flags for one evaluation of a row (examples/reproduce.py runs them too)."""
    words = list(subset)
    for key, value in args.items():
        words += [flag(key), model_overrides(value) if key == "model_overrides" else flag_value(value)]
    return words


# ----------------------------------------------------------------------------- smoke runs
def smoke_summary(row):
    """What a smoke run changes, in words: its --help text and its banner say the same."""
    cutoffs = ", the paper's adaptive-softmax cutoffs inside DATA's vocabulary" if row["model"][
        "adaptive_softmax_cutoff"] else ""
    model, dataset = SMOKE_VALUES["model"], SMOKE_VALUES["dataset"]
    return (f"the row's memory, BPTT and segment length at {model['n_layer']} layers, d_model {model['d_model']}, "
            f"one process, batch {dataset['batch_size']}, {SMOKE_VALUES['optimization']['max_update']} updates, "
            f"{dataset['max_valid_steps']} validation steps, the evaluations on the first 1/{SMOKE_TEST_SHARDS} of "
            f"the test split{cutoffs}")


def smoke_help(dataset, name, row):
    text = (f"SMOKE  1: a smoke run, NOT the paper's: {smoke_summary(row)}; SAVE defaults to "
            f"checkpoints/{dataset}/{name}-smoke, and a DATA that holds a dict.txt is used as it is "
            "(PREPARE=0). Flags given to the script override these values (--max-update 200 --d-model 128 ...).")
    return textwrap.wrap(text, 100, initial_indent="#   ", subsequent_indent="#         ")


def smoke_banner(dataset, name, row):
    """Bash: a smoke run says so before anything else, and keeps its checkpoints apart."""
    return ['if [[ "$SMOKE" == 1 ]]; then',
            f'  echo "SMOKE RUN of {name}.sh, NOT the paper\'s run: {smoke_summary(row)}"',
            f"  SAVE=${{SAVE:-checkpoints/{dataset}/{name}-smoke}}",
            "fi"]


def smoke_flags(row):
    """Bash: a smoke run's flags go before the script's arguments, its evaluations read one test shard.

    A smoke run may use another corpus's data-bin: of the paper's adaptive-softmax cutoffs it keeps
    those inside that data-bin's vocabulary, as the model requires (of WikiText-2's, only 20000).
    """
    cutoffs = row["model"]["adaptive_softmax_cutoff"]
    out = ["TEST_SET=(--gen-subset test)", 'if [[ "$SMOKE" == 1 ]]; then']
    if cutoffs:
        out += [
            '  VOCAB=$(( $(wc -l < "$DATA/dict.txt") + 4 ))  # dict.txt\'s symbols and fairseq\'s 4 specials',
            "  CUTOFF=",
            f"  for c in {cutoffs.replace(',', ' ')}; do",
            "    if (( c < VOCAB )); then CUTOFF=${CUTOFF:+$CUTOFF,}$c; fi",
            "  done",
            '  echo "smoke run: adaptive-softmax cutoffs ${CUTOFF:-none} (a vocabulary of $VOCAB)"',
            '  set -- --adaptive-softmax-cutoff "$CUTOFF" "$@"',
        ]
    smoke = [word for section in SMOKE_VALUES.values() for word in flags(section)]
    return out + [f'  set -- {shell_line(smoke)} "$@"',
                  f"  TEST_SET+=(--num-shards {SMOKE_TEST_SHARDS} --shard-id 0)",
                  "fi"]


# ----------------------------------------------------------------------------- renderers
def render_script(dataset, table, name, row):
    batch, gpus = row["batch"], row["gpus"]
    note = f" ({row['note']})" if row.get("note") else ""
    out = [
        "#!/usr/bin/env bash",
        f"# {table['title']}, {row['title']}: the RMT paper's {table['metric']} {row['paper']}{note}.",
        "# " + GENERATED.format(dir=dataset),
        f"# The model is the paper's: --arch {row['arch']} sets every architecture value explicitly,",
        "# so a change of the plugin's defaults does not change this recipe.",
        f"# Evaluations ({table['eval_metric']} of fairseq-eval-lm): " + "; ".join(
            f"{spec.get('title', 'the paper', )} {row['paper'] if key == 'paper' else spec['paper']}"
            for key, spec in row["evals"].items()) + ".",
        "#",
        f"# Usage: RAW=path/to/{table['raw']} bash examples/{dataset}/{name}.sh [extra fairseq-train flags]",
        *(["#   BPTT as the authors' training loop runs it (--bptt-mode authors); for BPTT as the method",
           "#   describes it, add --bptt-mode sliding (docs/authors_model.md)."]
          if row["criterion"]["bptt_depth"] > 0 else []),
        f"#   GPUS  GPUs on this node (default {gpus}): the paper's {batch} streams per update are",
        f"#         --distributed-world-size GPUS x --batch-size {batch}/GPUS (GPUS must divide {batch});",
        "#         over several nodes, fairseq's --distributed-* flags with the same product.",
        f"#   DATA  data-bin (default {table['data']}); SAVE  checkpoints (default checkpoints/{dataset}/{name})",
        "#   PREPARE  1: prepare DATA from RAW (the default); 0: use DATA, any data-bin, as it is",
        *smoke_help(dataset, name, row),
        f"# Hydra: fairseq-hydra-train --config-dir examples/{dataset}/configs --config-name {name} task.data=DATA",
        "set -euo pipefail",
        'if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then',
        '  sed -n "2,/^set -euo/{/^#/s/^# \\{0,1\\}//p}" "$0"',
        "  exit 0",
        "fi",
        f"RAW=${{RAW:-{table['raw']}}}",
        f"DATA=${{DATA:-{table['data']}}}",
        "SMOKE=${SMOKE:-0}",
        'if [[ -z "${PREPARE:-}" ]]; then  # a smoke run takes a data-bin that is there as it is',
        '  PREPARE=1',
        '  if [[ "$SMOKE" == 1 && -f "$DATA/dict.txt" ]]; then PREPARE=0; fi',
        "fi",
        "for var in SMOKE PREPARE; do",
        '  if [[ "${!var}" != 0 && "${!var}" != 1 ]]; then',
        '    echo "error: $var=${!var}: set $var=1 or $var=0" >&2',
        "    exit 1",
        "  fi",
        "done",
        *smoke_banner(dataset, name, row),
        f"SAVE=${{SAVE:-checkpoints/{dataset}/{name}}}",
        f"GPUS=${{GPUS:-{gpus}}}",
        f"if (( {batch} % GPUS )); then",
        f'  echo "error: GPUS=$GPUS does not divide the paper\'s batch of {batch} streams" >&2',
        "  exit 1",
        "fi",
        "",
        "# 1. data (idempotent: a rerun with valid outputs does nothing)",
        'if [[ "$PREPARE" == 1 ]]; then',
        "  " + shell_line(['"$RAW"' if w == "$RAW" else '"$DATA"' if w == "$DATA" else w for w in table["prepare"]]),
        'elif [[ -f "$DATA/dict.txt" ]]; then',
        '  echo "using the data-bin DATA=$DATA as it is (PREPARE=0: not prepared from RAW)"',
        "else",
        '  echo "error: DATA=$DATA holds no dict.txt, so it is no fairseq data-bin; with PREPARE=1 it is prepared from RAW" >&2',
        "  exit 1",
        "fi",
        "",
        *textwrap.wrap(f"Smoke run (SMOKE=1): {smoke_summary(row)}.", 100, initial_indent="# ",
                       subsequent_indent="# "),
        *smoke_flags(row),
        "",
        "# 2. train",
        'fairseq-train "$DATA" \\',
    ]
    lines = train_lines(row)
    out += [f"  {shell_line(words)}" + (" \\" if i < len(lines) - 1 else "") for i, words in enumerate(lines)]
    for i, (eval_name, spec) in enumerate(row["evals"].items()):
        number = row["paper"] if eval_name == "paper" else spec["paper"]
        title = spec.get("title", "the paper's setting: training segment length and memory")
        out += [
            "",
            f"# {3 + i}. evaluate, {title}: {table['metric']} {number} ({table['eval_metric']} below)",
            'fairseq-eval-lm "$DATA" --path "$SAVE/checkpoint_best.pt" --user-dir rmt_plugin --task rmt_lm \\',
            "  " + shell_line(eval_words(spec["args"], subset=[TEST_SET])),
        ]
    out += ["", 'if [[ "$SMOKE" == 1 ]]; then',
            f'  echo "SMOKE RUN of {name}.sh finished: it ran; its numbers are not the paper\'s (run without SMOKE=1 for that)"',
            "fi"]
    return "\n".join(out) + "\n"


def hydra_config(dataset, name, row):
    gpus = row["gpus"]
    return {
        # hydra would run in outputs/DATE/TIME, and every relative path (task.data, save_dir) would
        # point elsewhere: run where the user stands, as fairseq's own config.yaml does
        "hydra": {"run": {"dir": "."}},
        "common": {"user_dir": "rmt_plugin", "log_format": "json", "log_interval": LOG_INTERVAL,
                   "tensorboard_logdir": f"checkpoints/{dataset}/{name}/tb"},
        "task": {"_name": "rmt_lm", "data": load_table(dataset)["data"], **row["task"]},
        "model": {"_name": "rmt", **row["model"]},
        "criterion": {"_name": "rmt_lm", **row["criterion"]},
        "optimizer": row["optimizer"],
        "lr_scheduler": row["lr_scheduler"],
        "optimization": row["optimization"],
        "dataset": {"batch_size": row["batch"] // gpus, "validate_interval_updates": VALIDATE_EVERY},
        "distributed_training": {"distributed_world_size": gpus},
        "checkpoint": {"save_dir": f"checkpoints/{dataset}/{name}", "no_epoch_checkpoints": True,
                       "save_interval_updates": VALIDATE_EVERY, "keep_interval_updates": 1},
    }


def render_config(dataset, table, name, row):
    note = f" ({row['note']})" if row.get("note") else ""
    head = [
        "# @package _group_",
        f"# {table['title']}, {row['title']}: the RMT paper's {table['metric']} {row['paper']}{note}.",
        "# " + GENERATED.format(dir=dataset),
        f"# fairseq-hydra-train --config-dir examples/{dataset}/configs --config-name {name} task.data=DATA",
        f"# ({row['gpus']} GPUs x {row['batch'] // row['gpus']} streams; on G GPUs set "
        "distributed_training.distributed_world_size=G",
        f"#  dataset.batch_size={row['batch']}/G). Evaluate with the fairseq-eval-lm lines of {name}.sh.",
        "# Paths are relative to where you run it. The model section sets every value: to change the",
        "# size, override its fields (model.n_layer=2 model.d_model=64 ...); model._name stays rmt.",
    ]
    body = yaml.safe_dump(hydra_config(dataset, name, row), sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(head) + "\n" + body


def render_readme(dataset, table, rows):
    out = [
        f"# {table['title']}: the RMT paper's rows as fairseq recipes",
        "",
        f"<!-- {GENERATED.format(dir=dataset)} -->",
        "",
        f"One recipe per row of the paper's {table['title']} table (Bulatov et al., NeurIPS 2022,"
        f" {table['metric']}). Each `<row>.sh` prepares the data (`{table['prepare'][0]}`), trains with the stock",
        "`fairseq-train` and evaluates with `fairseq-eval-lm` in the paper's setting (the test set as 10",
        "streams, as the authors evaluated it; " + (
            "`Loss (base 2)` is bits per character, over the characters other than newline as in the paper"
            if dataset == "enwik8" else "`Perplexity` is the test perplexity") + ") and, where",
        "given, a published evaluation setting. `configs/<row>.yaml` is the same training run for",
        "`fairseq-hydra-train`. Common to every row: Adam (0.9, 0.999), lr 2.5e-4, cosine schedule without",
        "warm-up, gradient clipping 0.25, dropout 0.1, no attention dropout, post-LayerNorm, relative",
        "attention, tied weights, same_length and clamp_len off, one segment per stream and update.",
        "The model is the authors' (LM-RMT) parameter for parameter and BPTT runs as their training loop",
        "does (`--bptt-mode authors`); for BPTT as the method describes it, add `--bptt-mode sliding` to",
        "a script's arguments (they go to `fairseq-train`). What is the authors' and what is ours:",
        "[docs/authors_model.md](../../docs/authors_model.md). The architecture values are set",
        "explicitly by the named `--arch`, so they stay the paper's whatever the plugin's defaults.",
        "`python examples/reproduce.py " + dataset + " ROW --path CHECKPOINT` prints a row's evaluations",
        "beside the paper's numbers.",
        "",
        "```bash",
        f"RAW=path/to/{table['raw']} GPUS=4 bash examples/{dataset}/{next(iter(rows))}.sh",
        f"fairseq-hydra-train --config-dir examples/{dataset}/configs --config-name {next(iter(rows))} "
        f"task.data={table['data']}",
        "```",
        "",
        "| row | paper | `--arch` + memory | BPTT | segment | GPUs × batch | steps | recipe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        memory = " ".join(flags(row["model"], keys=MEMORY_FIELDS))
        extra = "; ".join(
            f"{spec['title']}: {spec['paper']}" for key, spec in row["evals"].items() if key != "paper"
        )
        paper = f"{row['paper']}" + (f" ({row['note']})" if row.get("note") else "") + (f"; {extra}" if extra else "")
        aux = row["criterion"]["memory_token_loss_weight"]
        bptt = f"{row['criterion']['bptt_depth']}" + (f", memory-token loss {aux}" if aux else "")
        out.append(
            f"| {row['title']} | {paper} | `{row['arch']}` `{memory}` | {bptt} | {row['task']['tokens_per_sample']} "
            f"| {row['gpus']} × {row['batch'] // row['gpus']} | {row['optimization']['max_update']:,} "
            f"| [`{name}.sh`]({name}.sh), [yaml](configs/{name}.yaml) |"
        )
    return "\n".join(out + readme_smoke(dataset, table, rows)) + "\n"


def continued(lines):
    """Shell lines joined by a backslash at the end of every line but the last."""
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


def readme_smoke(dataset, table, rows):
    """The README's section on smoke runs, with a script's and fairseq-hydra-train's command."""
    name, row = next((n, r) for n, r in rows.items() if r["model"]["num_mem_tokens"])  # a row with memory
    level = " --level byte" if dataset == "enwik8" else ""
    data = "data-bin/tiny-wikitext2" + ("-bytes" if level else "")
    save = f"checkpoints/{dataset}/{name}-smoke"
    hydra = [f"{section}.{key}={value}" for section, values in SMOKE_VALUES.items() for key, value in values.items()]
    hydra += ["model.adaptive_softmax_cutoff=null"] if row["model"]["adaptive_softmax_cutoff"] else []
    hydra += [f"checkpoint.save_dir={save}-hydra", f"common.tensorboard_logdir={save}-hydra/tb"]
    cutoffs = (" Of the paper's adaptive-softmax cutoffs it keeps those inside DATA's vocabulary (none for the"
               " tiny corpus's 6,632 symbols, 20000 for WikiText-2's 33,280)."
               if row["model"]["adaptive_softmax_cutoff"] else "")
    text = (f"`SMOKE=1` runs a row at a tiny size, to check that it starts, trains, validates and evaluates: "
            f"{smoke_summary(row)}. It is not the paper's run and its numbers say nothing about the paper's; it "
            "says so in its first and last line (`SMOKE RUN of <row>.sh, NOT the paper's run`) and saves to "
            f"`checkpoints/{dataset}/<row>-smoke` (a rerun continues from the checkpoint there, as every fairseq run does: remove it, or give another `SAVE`, to start anew). A "
            "`DATA` that already holds a `dict.txt` is used as it is, whatever made it (the script prepares "
            "nothing); `PREPARE=0` does the same in a full run, `PREPARE=1` prepares `DATA` from `RAW` even in a "
            f"smoke run.{cutoffs} Here on the corpus every clone embeds (`examples/data/tiny-wikitext2`):")
    return [
        "",
        "## Smoke run: check a set-up in a minute, on any data-bin",
        "",
        *textwrap.wrap(text, 100),
        "",
        "```bash",
        f"rmt-prepare-wikitext --input examples/data/tiny-wikitext2{level}    # -> {data}",
        f"SMOKE=1 DATA={data} bash examples/{dataset}/{name}.sh",
        "# flags after the script go to fairseq-train after the smoke values, so they override them",
        "# (another size needs another SAVE: a run continues from the checkpoint in SAVE)",
        f"SMOKE=1 DATA={data} SAVE={save}-d128 bash examples/{dataset}/{name}.sh \\",
        "  --max-update 200 --n-layer 4 --d-model 128 --n-head 4 --d-head 32 --d-inner 512",
        "# the same smoke run from the hydra config, its values overridden on the command line:",
        f"fairseq-hydra-train --config-dir examples/{dataset}/configs --config-name {name} \\",
        *continued(textwrap.wrap(" ".join([f"task.data={data}"] + hydra), 98, initial_indent="  ",
                                 subsequent_indent="  ")),
        "```",
        "",
        *textwrap.wrap(f"Evaluate a hydra smoke run with the script's `fairseq-eval-lm` lines, "
                       f"`--path {save}-hydra/checkpoint_best.pt` and `--num-shards {SMOKE_TEST_SHARDS} --shard-id 0` "
                       f"(the first 1/{SMOKE_TEST_SHARDS} of the test split).", 100),
    ]


def rendered_files():
    """{path: text} of every file rendered from the tables."""
    files = {}
    for dataset in DATASETS:
        table, rows = load_table(dataset), recipes(dataset)
        for name, row in rows.items():
            files[EXAMPLES / dataset / f"{name}.sh"] = render_script(dataset, table, name, row)
            files[EXAMPLES / dataset / "configs" / f"{name}.yaml"] = render_config(dataset, table, name, row)
        files[EXAMPLES / dataset / "README.md"] = render_readme(dataset, table, rows)
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered_files().items():
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755 if path.suffix == ".sh" else 0o644)
    if args.check and stale:
        sys.exit("error: out of date with their recipes.yaml (run python examples/make_recipes.py): "
                 + ", ".join(str(p.relative_to(EXAMPLES.parent)) for p in stale))
    for path in stale if not args.check else []:
        print(f"wrote {path.relative_to(EXAMPLES.parent)}")


if __name__ == "__main__":
    main()
