"""Inference from a checkpoint alone: image(s) + an instruction or a task -> decoded output.

Everything needed travels inside checkpoints written by ``fit``: the model config, the
vocabulary and the run's resolved YAML (which names the task plugins and image size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml
from PIL import Image

from ofa_lightning.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict
from ofa_lightning.data import Sample, collate
from ofa_lightning.generation import GenerationConfig, generate
from ofa_lightning.model import OFAModel
from ofa_lightning.task import SampleContext, Task, image_to_tensor, open_image
from ofa_lightning.vocab import UnifiedVocab

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# free-form instructions decode like captions (the official caption evaluation settings)
FREE_FORM_GENERATION = GenerationConfig(beam=5, max_len_b=16, min_len=1, no_repeat_ngram_size=3)


def _instantiate_tasks(specs: list[Any]) -> list[Task]:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--tasks", type=list[Task])
    return parser.instantiate_classes(parser.parse_object({"tasks": specs})).tasks


def image_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file or folder")
    return [path]


@dataclass
class Predictor:
    model: OFAModel
    vocab: UnifiedVocab
    tasks: dict[str, Task]
    image_size: int

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Predictor":
        loaded = load_checkpoint(path)
        if loaded.source_format != "fit" or loaded.vocab_state is None:
            raise CheckpointError(f"{path} is a {loaded.source_format} checkpoint, not one "
                                  f"written by `ofa-lightning fit`: it carries no vocabulary or "
                                  f"tasks; fine-tune it first (--model.init_from)")
        model = OFAModel(loaded.config).eval()
        load_state_dict_strict(model, loaded.state_dict, source=path)
        run = yaml.safe_load(loaded.run_config) if loaded.run_config else {}
        data = (run.get("data") or {}).get("init_args", {})
        specs = data.get("tasks") or ([data["task"]] if data.get("task") else [])
        tasks = _instantiate_tasks(specs)
        return cls(model, UnifiedVocab.from_state(loaded.vocab_state), {t.name: t for t in tasks},
                   int(data.get("image_size", model.config.patch_image_size)))

    def _task(self, name: str) -> Task:
        if name not in self.tasks:
            raise ValueError(f"this checkpoint's run has no task {name!r}; it has "
                             f"{sorted(self.tasks)}")
        return self.tasks[name]

    def run(self, image: str | Path, instruction: str | None = None, task: str | None = None,
            text: str | None = None, output_dir: str | Path = ".") -> Iterator[str]:
        """One line of output per image; tasks that draw their prediction (grounding,
        detection, ...) also write it to ``<output_dir>/<image>_<task>.png``."""
        context = SampleContext(self.vocab, self.image_size)
        for file in image_files(image):
            if task is None:
                yield f"{file}: {self._free_form(file, instruction or '', context)}"
                continue
            plugin = self._task(task)
            fields: Mapping[str, Any] = {"id": file.name, "image": str(file), **plugin.query_fields(text)}
            sample = plugin.build_query(fields, context)
            prediction = plugin.predict(self.model, collate([sample], self.vocab.pad), self.vocab)[0]
            shown = _readable(prediction)
            drawn = plugin.visualize(Image.open(file), prediction)
            if drawn is None:
                yield f"{file}: {shown}"
                continue
            out = Path(output_dir) / f"{file.stem}_{plugin.name}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            drawn.save(out)
            yield f"{file}: {shown} -> {out}"

    @torch.no_grad()
    def _free_form(self, file: Path, instruction: str, context: SampleContext) -> str:
        pixels, _ = image_to_tensor(open_image(str(file), str(file), file.name), context.image_size)
        sample = Sample.seq2seq("free_form", self.vocab, self.vocab.encode(instruction), [],
                                image=pixels)
        batch = collate([sample], self.vocab.pad)
        hypotheses = generate(self.model, batch.src_tokens, batch.patch_images, batch.patch_masks,
                              config=FREE_FORM_GENERATION)
        return self.vocab.decode(hypotheses[0][0].tokens).strip()


def _readable(prediction: Any) -> Any:
    """Tensors as (rounded) lists, for printing."""
    if isinstance(prediction, torch.Tensor):
        values = prediction.tolist()
        return [round(v, 1) for v in values] if prediction.is_floating_point() else values
    return prediction
