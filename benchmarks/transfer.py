"""Does multitask pretraining transfer? Measured on ShapesWorld, on this machine's CPU.

Not a test: it trains and prints numbers. Everything derives from one config,
``configs/pretrain/shapes.yaml`` (the eight pretraining tasks), so the comparison is about
the recipe users run, not a copy of it:

1. **pretrain** on every task of the config but the ``--target`` one, ``--pretrain_steps``;
2. **fine-tune** the target task from that checkpoint for ``--budget`` steps;
3. **scratch**: the target task from random weights, the same ``--budget`` steps, the same
   vocabulary, batch, learning-rate schedule and validation set;
4. **zero-shot grounded VQA**: the pretrained model answers a question about a given region,
   an instruction it never saw (``" what colour is the region? region: <bins>"``), composed
   of a VQA question and the region syntax of grounded captioning. Reported against the
   majority answer per question, the accuracy of knowing nothing about the image.

(2) against (3) is the transfer at equal fine-tuning compute; the pretraining compute is on
top (the usual question: given a pretrained model, is a small budget enough?).

    python benchmarks/transfer.py [--target visual_grounding] [--pretrain_steps 2000]
        [--budget 300] [--out runs/transfer]
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "shapes.yaml"
GROUNDED_VQA_TASK = {
    "class_path": "tasks.grounded_vqa.GroundedVQATask",
    "init_args": {"decode_mode": "trie", "source": {
        "class_path": "datamodules.sources.ShapesWorldSource",
        "init_args": {"kind": "grounded_vqa", "val_size": 300}}},
}


def task_name(spec: dict[str, Any]) -> str:
    """The ``name`` of a task given by class path in a config."""
    from ofa_lightning.plugins import resolve_task_class

    return resolve_task_class(spec["class_path"]).name


def run_config(base: dict[str, Any], directory: Path, *, tasks: list[dict[str, Any]],
               steps: int, validations: int, vocab: str | None = None,
               init_from: str | None = None) -> dict[str, Any]:
    """``base`` with its task list, length, output folder, vocabulary and start replaced.

    The config's curriculum (``data.phases``) is dropped: its phases name tasks and sample
    counts of the full recipe, which the benchmark's task lists and budgets replace, so every
    run here draws its tasks at their own weights from the first step."""
    config = copy.deepcopy(base)
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=max(1, steps // validations),
                   default_root_dir=str(directory))
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(directory), "name": "logs"}}
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(directory / "checkpoints"),
                                           "save_last": True}}]
    data = config["data"]["init_args"]
    data["tasks"] = tasks
    data["phases"] = None
    if vocab is not None:
        data["vocab"] = vocab
    if init_from is not None:
        config["model"]["init_from"] = init_from
    return config


def fit(config: dict[str, Any], directory: Path, command: str = "fit") -> float:
    """Run ``ofa-lightning <command>`` on ``config`` in a fresh process; its wall time.

    ``directory`` is emptied first: a previous benchmark's logs and checkpoints left there
    would be read as this run's (a second logger version, a stale last.ckpt).
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    with open(directory / "output.log", "w") as log:
        subprocess.run([sys.executable, "-m", "ofa_lightning.cli", command, "--config", str(path)],
                       cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def validation_curve(directory: Path, task: str) -> list[tuple[int, dict[str, float]]]:
    """(step, {metric: value}) per validation of ``task`` in a run's metrics.csv."""
    rows = list(csv.DictReader(open(_single(directory.glob("logs/version_*/metrics.csv")))))
    prefix = f"val/{task}/"
    curve = []
    for row in rows:
        values = {k[len(prefix):]: float(v) for k, v in row.items() if k.startswith(prefix) and v}
        if values:
            curve.append((int(row["step"]), values))
    return curve


def _single(paths: Any) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise RuntimeError(f"expected exactly one file, found {found}")
    return found[0]


def majority_accuracy(val_size: int) -> float:
    """Accuracy of always giving the most frequent answer of each region question."""
    from datamodules.sources import ShapesWorldSource

    source = ShapesWorldSource("grounded_vqa", val_size=val_size)
    answers: dict[str, Counter] = {}
    for record in source.records("val"):
        (answer, _), = record["answers"].items()
        answers.setdefault(record["question"], Counter())[answer] += 1
    return sum(c.most_common(1)[0][1] for c in answers.values()) / val_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="visual_grounding")
    parser.add_argument("--pretrain_steps", type=int, default=2000)
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--validations", type=int, default=3, help="per fine-tuning run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "transfer",
                        help="its pretrain/, finetune/, scratch/, zero_shot/ are overwritten")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="image tokenizer for image_infilling (default: the config's)")
    args = parser.parse_args()

    base = yaml.safe_load(PRETRAIN_CONFIG.read_text())
    specs = base["data"]["init_args"]["tasks"]
    if args.tokenizer is not None:
        for spec in specs:
            if "tokenizer" in spec.get("init_args", {}):
                spec["init_args"]["tokenizer"] = str(args.tokenizer.resolve())
    names = [task_name(s) for s in specs]
    if args.target not in names:
        sys.exit(f"--target {args.target!r} is not a task of {PRETRAIN_CONFIG}: {names}")
    target = specs[names.index(args.target)]
    others = [s for s, n in zip(specs, names) if n != args.target]
    out: Path = args.out.resolve()

    seconds = {}
    pre_dir = out / "pretrain"
    seconds["pretrain"] = fit(run_config(base, pre_dir, tasks=others, steps=args.pretrain_steps,
                                         validations=4), pre_dir)
    vocab = str(_single(pre_dir.glob("logs/version_*/vocab")))
    checkpoint = str(pre_dir / "checkpoints" / "last.ckpt")
    for name, init in (("finetune", checkpoint), ("scratch", None)):
        directory = out / name
        seconds[name] = fit(run_config(base, directory, tasks=[target], steps=args.budget,
                                       validations=args.validations, vocab=vocab,
                                       init_from=init), directory)
    zero_dir = out / "zero_shot"
    zero = run_config(base, zero_dir, tasks=[GROUNDED_VQA_TASK], steps=1, validations=1,
                      vocab=vocab, init_from=checkpoint)
    seconds["zero_shot"] = fit(zero, zero_dir, command="validate")

    print(f"\nTransfer on ShapesWorld: target {args.target!r}, pretraining on {len(others)} "
          f"tasks for {args.pretrain_steps} steps, fine-tuning budget {args.budget} steps")
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    for name in ("finetune", "scratch"):
        for step, values in validation_curve(out / name, args.target):
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items()))
            print(f"  {name:8s} step {step + 1:5d}: {shown}")
    (_, zero_values), = validation_curve(zero_dir, "grounded_vqa") or [(0, {"accuracy": math.nan})]
    val_size = GROUNDED_VQA_TASK["init_args"]["source"]["init_args"]["val_size"]
    max_eval = base["data"]["init_args"].get("max_eval_samples") or val_size
    print(f"zero-shot grounded VQA accuracy {zero_values.get('accuracy', math.nan):.3f} "
          f"(majority answer per question: {majority_accuracy(min(val_size, max_eval)):.3f})")


if __name__ == "__main__":
    main()
