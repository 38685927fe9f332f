"""The ``ofa-lightning`` command: the composition root.

``fit``/``validate``/``test``/``predict --config`` are LightningCLI subcommands over
OFAModule and a datamodule; ``tasks``, ``convert`` and the checkpoint-only ``predict`` (an
image and an instruction, nothing else) are small commands of their own.
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Sequence

EXTRA_COMMANDS = {
    "tasks": "list the task plugins, their instructions and metrics",
    "convert": "official OFA checkpoint (fairseq .pt, bare or HF state dict) -> ofa-lightning",
    "predict": "with --ckpt_path and --image (no --config): answer an instruction about an image",
}


# --- LightningCLI ------------------------------------------------------------------------------
def _lightning_cli(argv: Sequence[str]) -> None:
    """OFAModule runs (the default), or any LightningModule a config names by class path
    (``model: {class_path: ofa_lightning.tokenizer.training.VQTokenizerModule}``): such a run
    gets the same trainer defaults, progress bar and summary, but no vocabulary links."""
    from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    class RunCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            # always on, configurable as --progress_bar.* / --model_summary.*
            parser.add_lightning_class_args(RichProgressBar, "progress_bar")
            parser.add_lightning_class_args(RichModelSummary, "model_summary")

        def before_instantiate_classes(self) -> None:
            self._run_yaml = self._parser(self.subcommand).dump(self.config[self.subcommand],
                                                                 skip_none=False)

    class OFALightningCLI(RunCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            super().add_arguments_to_parser(parser)
            # one vocabulary and one task list, built by the datamodule, shared by the model
            parser.link_arguments("data", "model.vocab", compute_fn=lambda dm: dm.vocab,
                                  apply_on="instantiate")
            parser.link_arguments("data", "model.tasks", compute_fn=lambda dm: dm.tasks,
                                  apply_on="instantiate")

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            self.model.run_config = self._run_yaml

    description = "OFA as a Lightning research template. Also: " + "; ".join(
        f"ofa-lightning {name}: {text}" for name, text in EXTRA_COMMANDS.items())
    # From the shell LightningCLI reads sys.argv itself; passing it again as `args` would
    # only earn a warning on every run.
    args = None if list(argv) == sys.argv[1:] else list(argv)
    common = dict(subclass_mode_data=True, auto_configure_optimizers=False, args=args,
                  parser_kwargs={"description": description},
                  trainer_defaults={"logger": {"class_path": f"{CSVLogger.__module__}.CSVLogger"}},
                  save_config_kwargs={"overwrite": True})
    if _names_model_class(argv):
        RunCLI(subclass_mode_model=True, **common)
        return
    from datamodules.multitask import MultiTaskDataModule
    from ofa_lightning.module import OFAModule

    OFALightningCLI(OFAModule, MultiTaskDataModule, **common)


def _config_files(argv: Sequence[str]) -> list[str]:
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _read_config(file: str) -> dict[str, Any]:
    """A config file's top level, or {} when it does not read (LightningCLI reports that)."""
    import yaml

    try:
        data = yaml.safe_load(open(file)) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _names_model_class(argv: Sequence[str]) -> bool:
    """Whether a config (or ``--model``) picks the LightningModule by class path."""
    if any(a == "--model" or a.startswith("--model=") or a.startswith("--model.class_path")
           for a in argv):
        return True
    return any(isinstance(_read_config(f).get("model"), dict)
               and "class_path" in _read_config(f)["model"] for f in _config_files(argv))


def check_task_class_paths(argv: Sequence[str]) -> None:
    """Resolve every task class path of the ``--config`` files before LightningCLI does, so
    a typo is reported with the module it names and the tasks that do exist."""
    from ofa_lightning.plugins import resolve_task_class

    for file in _config_files(argv):
        data = _read_config(file).get("data") or {}
        init = data.get("init_args") or {} if isinstance(data, dict) else {}
        specs = list(init.get("tasks") or []) + ([init["task"]] if init.get("task") else [])
        for spec in specs:
            if isinstance(spec, dict) and "class_path" in spec:
                try:
                    resolve_task_class(spec["class_path"])
                except ValueError as error:
                    raise ValueError(f"{file}: {error}") from error


# --- extra commands ----------------------------------------------------------------------------
def _parse_override(text: str) -> tuple[str, Any]:
    """``field=value`` with value read as a Python literal when it is one (256, 0.1, True)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} is not of the form field=value")
    name, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def _convert_parser(commands: Any) -> None:
    convert = commands.add_parser(
        "convert", help=EXTRA_COMMANDS["convert"],
        description="Read an official checkpoint without arbitrary unpickling, check it loads "
                    "strictly into the matching architecture, and write this project's format.")
    convert.add_argument("source", help="official checkpoint file")
    convert.add_argument("destination", help="output file (.pt)")
    convert.add_argument("--ema", action="store_true",
                         help="take the EMA weights stored by --store-ema runs (VQA checkpoints)")
    convert.add_argument("--set", dest="overrides", action="append", type=_parse_override,
                         default=[], metavar="FIELD=VALUE",
                         help="replace a config field, e.g. --set code_image_size=256")


def _convert(args: argparse.Namespace) -> None:
    from ofa_lightning.checkpoint import convert

    loaded = convert(args.source, args.destination, use_ema=args.ema, **dict(args.overrides))
    print(f"wrote {args.destination} (from a {loaded.source_format} checkpoint): {loaded.config}")


def _tasks(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from ofa_lightning.plugins import installed_tasks, resolve_task_class

    table = Table(title="ofa-lightning task plugins (entry-point group ofa_lightning.tasks)")
    for column in ("name", "class path", "instruction", "metrics", "record fields"):
        table.add_column(column)
    for name, path in sorted(installed_tasks().items()):
        description = resolve_task_class(path)().describe()
        table.add_row(name, path, repr(description["instruction"]), ", ".join(description["metrics"]),
                      ", ".join(description["fields"]))
    Console(width=200).print(table)


def _predict_parser(commands: Any) -> None:
    predict = commands.add_parser(
        "predict", help=EXTRA_COMMANDS["predict"],
        description="Answer an instruction about an image (or every image of a folder) with a "
                    "checkpoint written by `ofa-lightning fit`; nothing else is needed. For "
                    "visual grounding a PNG with the box drawn is written.")
    predict.add_argument("--ckpt_path", required=True)
    predict.add_argument("--image", required=True, help="an image file or a folder of images")
    what = predict.add_mutually_exclusive_group(required=True)
    what.add_argument("--instruction", help="free text, e.g. ' what colour is the circle?'")
    what.add_argument("--task", help="a task of the checkpoint's run: caption, vqa, visual_grounding, ...")
    predict.add_argument("--text", help="the task's text field: the question (vqa) or the "
                                        "referring expression (visual_grounding)")
    predict.add_argument("--output_dir", default=".", help="where grounding PNGs go")


def _predict(args: argparse.Namespace) -> None:
    from ofa_lightning.predictor import Predictor

    predictor = Predictor.from_checkpoint(args.ckpt_path)
    for result in predictor.run(args.image, instruction=args.instruction, task=args.task,
                                text=args.text, output_dir=args.output_dir):
        print(result)


def _extra_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofa-lightning")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("tasks", help=EXTRA_COMMANDS["tasks"])
    _convert_parser(commands)
    _predict_parser(commands)
    return parser


def _is_extra_command(argv: Sequence[str]) -> bool:
    if not argv or argv[0] not in EXTRA_COMMANDS:
        return False
    # `predict --config ...` is LightningCLI's predict; `predict --ckpt_path --image` is ours
    return argv[0] != "predict" or not any(a.startswith(("--config", "-c")) for a in argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _is_extra_command(argv):
        try:
            check_task_class_paths(argv)
        except ValueError as error:
            sys.exit(f"ofa-lightning: error: {error}")
        _lightning_cli(argv)
        return
    from ofa_lightning.checkpoint import CheckpointError
    from ofa_lightning.task import RecordError

    args = _extra_parser().parse_args(argv)
    try:
        {"convert": _convert, "tasks": _tasks, "predict": _predict}[args.command](args)
    except (CheckpointError, RecordError, FileNotFoundError, ValueError) as error:
        sys.exit(f"ofa-lightning {args.command}: error: {error}")


if __name__ == "__main__":
    main()
