"""The `ofa-lightning` command end to end: real LightningCLI runs in subprocesses, on CPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
QUICKSTART = REPO / "configs" / "quickstart.yaml"
PRETRAIN = REPO / "configs" / "pretrain" / "shapes.yaml"
TOKENIZER = REPO / "configs" / "tokenizer" / "shapes_vq.yaml"
# shrink any preset to a few thousand parameters so every config runs in seconds
TINY_MODEL = ("{encoder_layers: 1, decoder_layers: 1, embed_dim: 32, ffn_dim: 64, "
              "attention_heads: 2, resnet_type: resnet18, trunk_stride: 8}")


def run_cli(*args: str, cwd: Path, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ofa_lightning.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})
    if check and done.returncode != 0:
        raise AssertionError(f"ofa-lightning {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done


# a seconds-long run of any config, whatever it trains
TINY_TRAINER = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                "--trainer.log_every_n_steps", "1", "--trainer.precision", "32-true",
                "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4",
                "--data.init_args.max_eval_samples", "4"]
# the ShapesWorld tokenizer config, shrunk (the codebook stays: the pretraining vocabulary
# is sized to it)
TINY_TOKENIZER = [*TINY_TRAINER, "--model.init_args.model_overrides",
                  "{ch: 8, z_channels: 8, embed_dim: 8, norm_groups: 4}"]


def tiny_fit_args(steps: int = 2, *extra: str) -> list[str]:
    """Overrides that make any OFAModule config a seconds-long run; outputs go under the
    working directory (the configs' relative runs/ paths), so each run gets its own cwd."""
    return [*TINY_TRAINER, "--trainer.max_steps", str(steps), "--trainer.val_check_interval",
            str(steps), "--model.model_overrides", TINY_MODEL,
            "--data.init_args.tokenizer_texts", "200", *extra]


def tiny_predict_args() -> list[str]:
    return ["--model.model_overrides", TINY_MODEL, "--trainer.precision", "32-true",
            "--trainer.limit_predict_batches", "1", "--data.init_args.eval_batch_size", "4",
            "--data.init_args.max_eval_samples", "4", "--data.init_args.tokenizer_texts", "200"]


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "runs" / "quickstart" / "checkpoints" / "last.ckpt"


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    (metrics,) = run_dir.rglob("metrics.csv")
    rows = csv.DictReader(metrics.open())
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_help_lists_the_subcommands(tmp_path):
    out = run_cli("--help", cwd=tmp_path).stdout
    for command in ("fit", "validate", "test", "predict", "tasks", "convert"):
        assert command in out


def test_tasks_lists_plugins_with_official_instructions(tmp_path):
    out = run_cli("tasks", cwd=tmp_path).stdout
    assert "what does the image describe?" in out
    assert 'which region does the text " {} " describe?' in out
    assert "tasks.vqa.VQATask" in out


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_every_config_parses_and_runs_two_steps(config, tmp_path):
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# ofa-lightning "), f"{config} must start with its command"
    if config == TOKENIZER:
        run_cli("fit", "--config", str(config), *TINY_TOKENIZER, cwd=tmp_path)
        assert logged(tmp_path, "train/loss")
        return
    pretraining = config.parent == PRETRAIN.parent
    if pretraining:  # its image infilling reads the tokenizer that config trains
        run_cli("fit", "--config", str(TOKENIZER), *TINY_TOKENIZER, cwd=tmp_path)
    # configs run as written (the quickstart in bf16); only GPU/DDP trainer configs are
    # moved onto one CPU process; the others are layered on the pretraining config (those
    # beside it) or on the quickstart
    on_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    extra = on_cpu if "trainer" in config.parts else ["--trainer.precision", "bf16-mixed"]
    base = PRETRAIN if pretraining else QUICKSTART
    configs = ["--config", str(base)] if config not in (QUICKSTART, PRETRAIN) else []
    run_cli("fit", *configs, "--config", str(config), *tiny_fit_args(), *extra, cwd=tmp_path)
    assert logged(tmp_path / "runs" / "pretrain" if pretraining else tmp_path, "train/loss")


def test_fit_then_predict_from_the_checkpoint_alone(tmp_path):
    run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(), cwd=tmp_path)
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint.is_file()
    from datamodules.shapes_world import ShapesWorld

    image = tmp_path / "scene.png"
    ShapesWorld(seed=99).scene(0, split="test").image.save(image)
    elsewhere = tmp_path / "elsewhere"  # nothing but the checkpoint and the image
    elsewhere.mkdir()
    vqa = run_cli("predict", "--ckpt_path", str(checkpoint), "--image", str(image), "--task", "vqa",
                  "--text", "how many shapes are there?", cwd=elsewhere).stdout
    assert str(image) in vqa
    grounding = run_cli("predict", "--ckpt_path", str(checkpoint), "--image", str(image),
                        "--task", "visual_grounding", "--text", "the red circle",
                        "--output_dir", str(elsewhere), cwd=elsewhere).stdout
    drawn = elsewhere / "scene_visual_grounding.png"
    assert f"-> {drawn}" in grounding and drawn.is_file()
    free = run_cli("predict", "--ckpt_path", str(checkpoint), "--image", str(image),
                   "--instruction", " what does the image describe?", cwd=elsewhere)
    assert free.returncode == 0
    bad = run_cli("predict", "--ckpt_path", str(checkpoint), "--image", str(image), "--task",
                  "detection", cwd=elsewhere, check=False)
    assert bad.returncode != 0 and "has no task 'detection'" in bad.stderr
    # LightningCLI's predict with the run's config: every test record of every task
    run_cli("predict", "--config", str(QUICKSTART), *tiny_predict_args(),
            "--ckpt_path", str(checkpoint), cwd=tmp_path)
    records = [json.loads(line) for line in
               (tmp_path / "runs/quickstart/predictions/predictions.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"caption", "vqa", "visual_grounding"}
    assert all(len(r["prediction"]) == 4 for r in records if r["task"] == "visual_grounding")
    # the checkpoint also seeds single-task fine-tuning, with the vocabulary its run saved
    finetune = tmp_path / "finetune"
    finetune.mkdir()
    (vocab,) = tmp_path.glob("runs/quickstart/logs/*/vocab")
    run_cli("fit", "--config", str(QUICKSTART), "--config", str(REPO / "configs/finetune/vqa.yaml"),
            *tiny_fit_args(), "--model.init_from", str(checkpoint),
            "--data.init_args.vocab", str(vocab), cwd=finetune)
    assert logged(finetune, "val/vqa/accuracy")


def test_resume_from_last_checkpoint_continues_the_run(tmp_path):
    """Stop after 2 of 4 steps, resume from last.ckpt: steps 2-3 log the losses an
    uninterrupted run logs (weights, optimiser state and the data stream all continue).
    A constant learning rate keeps the schedule independent of where a leg ends."""
    constant_lr = ["--model.warmup_ratio", "0", "--model.end_lr_factor", "1.0",
                   "--trainer.val_check_interval", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(4), *constant_lr, cwd=straight)
    run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(2), *constant_lr, cwd=resumed)
    run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(4), *constant_lr,
            "--ckpt_path", str(last_checkpoint(resumed)), cwd=resumed)
    expected = dict(logged(straight, "train/loss"))
    got: dict[int, float] = {}
    for metrics in sorted(resumed.rglob("metrics.csv")):
        got.update((int(r["step"]), float(r["train/loss"]))
                   for r in csv.DictReader(metrics.open()) if r.get("train/loss"))
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3], (got, expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_mixture_phases_come_from_the_yaml_and_travel_in_the_checkpoint(tmp_path):
    import torch

    phases = "[{start: 0, weights: {caption: 0, visual_grounding: 0}}, {start: 8, weights: {}}]"
    run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(2),
            "--data.init_args.phases", phases, cwd=tmp_path)
    state = torch.load(last_checkpoint(tmp_path), weights_only=True)["MultiTaskDataModule"]
    assert state["phases"] == [[0, {"caption": 0.0, "visual_grounding": 0.0}], [8, {}]]
    bad = run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(2),
                  "--data.init_args.phases", "[{start: 0, weights: {vga: 1}}]", cwd=tmp_path,
                  check=False)
    assert bad.returncode != 0
    assert "unknown tasks ['vga']; the mixture has ['caption', 'vqa', 'visual_grounding']" \
        in bad.stderr and "`phases: null` drops it" in bad.stderr


def test_task_loss_weights_come_from_the_command_line_and_name_the_tasks(tmp_path):
    """The module's tasks are linked from the datamodule before it is built, so a misspelt
    task name fails at once with the run's task names."""
    import torch

    run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(2),
            "--model.task_loss_weights", "{vqa: 4.0}", cwd=tmp_path)
    saved = torch.load(last_checkpoint(tmp_path), weights_only=False)["hyper_parameters"]
    assert saved["task_loss_weights"] == {"vqa": 4.0}
    bad = run_cli("fit", "--config", str(QUICKSTART), *tiny_fit_args(2),
                  "--model.task_loss_weights", "{qva: 4.0}", cwd=tmp_path, check=False)
    assert bad.returncode != 0
    assert "names 'qva', which is not a task of this run; its tasks: caption, vqa, " \
           "visual_grounding" in bad.stderr


@pytest.mark.parametrize("normalization", ["tokens", "samples"])
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, normalization):
    """Same global batch: 2 gloo processes x 4 samples == 1 process x 8 samples, whether the
    loss is divided by the global batch's tokens or its samples. BatchNorm is frozen so that
    per-process batch statistics cannot differ."""
    frozen = "{encoder_layers: 1, decoder_layers: 1, embed_dim: 32, ffn_dim: 64, attention_heads: 2, " \
             "resnet_type: resnet18, trunk_stride: 8, freeze_bn: true}"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    common = ["--config", str(QUICKSTART), *tiny_fit_args(3), "--model.model_overrides", frozen,
              "--model.loss_normalization", normalization]
    run_cli("fit", *common, "--data.init_args.batch_size", "8", cwd=single)
    run_cli("fit", *common, "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2", cwd=ddp)
    one, two = dict(logged(single, "train/loss")), dict(logged(ddp, "train/loss"))
    assert sorted(one) == sorted(two) == [0, 1, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def test_unknown_task_class_path_names_module_and_known_tasks(tmp_path):
    config = yaml.safe_load(QUICKSTART.read_text())
    config["data"]["init_args"]["tasks"][0]["class_path"] = "tasks.caption.NoSuchTask"
    path = tmp_path / "bad.yaml"
    path.write_text("# ofa-lightning fit --config bad.yaml\n" + yaml.safe_dump(config))
    done = run_cli("fit", "--config", str(path), *tiny_fit_args(), cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "NoSuchTask" in done.stderr and "'tasks.caption'" in done.stderr
    assert "CaptionTask" in done.stderr and "tasks.vqa.VQATask" in done.stderr  # what exists


PLUGIN = """
from tasks.caption import CaptionTask


class PictureTask(CaptionTask):
    \"\"\"A plugin that lives outside the package: captioning under another instruction.\"\"\"

    name = "picture"
    instruction = " what is in the picture?"
"""


def test_a_plugin_outside_the_package_runs_by_class_path(tmp_path):
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "picture_task.py").write_text(PLUGIN)
    config = yaml.safe_load(QUICKSTART.read_text())
    config["data"]["init_args"]["tasks"] = [{
        "class_path": "picture_task.PictureTask",
        "init_args": {"source": {"class_path": "datamodules.sources.ShapesWorldSource",
                                 "init_args": {"kind": "caption"}}}}]
    config["data"]["init_args"]["phases"] = None  # the quickstart curriculum names its tasks
    path = tmp_path / "picture.yaml"
    path.write_text("# ofa-lightning fit --config picture.yaml\n" + yaml.safe_dump(config))
    run_cli("fit", "--config", str(path), *tiny_fit_args(), cwd=tmp_path,
            env={"PYTHONPATH": str(plugins)})
    assert logged(tmp_path, "val/picture/cider")


def test_transfer_benchmark_runs_one_task_of_the_pretraining_config(tmp_path):
    """benchmarks/transfer.py trains single tasks from the pretraining config, whose
    curriculum names the other tasks: the derived config must still train."""
    spec = importlib.util.spec_from_file_location("transfer", REPO / "benchmarks" / "transfer.py")
    transfer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transfer)
    base = yaml.safe_load(PRETRAIN.read_text())
    grounding = [t for t in base["data"]["init_args"]["tasks"]
                 if transfer.task_name(t) == "visual_grounding"]
    config = transfer.run_config(base, tmp_path / "run", tasks=grounding, steps=2, validations=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_cli("fit", "--config", str(path), *tiny_fit_args(), cwd=tmp_path)
    assert logged(tmp_path / "run", "train/loss")
