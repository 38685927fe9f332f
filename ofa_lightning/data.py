"""What tasks hand to the model: one Sample per record, one padded Batch per step.

The model never learns which task a batch came from: every task reduces to token ids, an
optional image and a per-sample loss weight, so any mix of tasks collates into one Batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ofa_lightning.vocab import UnifiedVocab


@dataclass
class Sample:
    """One training or evaluation example, already tokenised."""

    task: str
    source: torch.Tensor  # (S,) bos + instruction + eos
    target: torch.Tensor  # (T,) output tokens + eos; unscored positions hold pad
    prev_output: torch.Tensor  # (T,) decoder input (teacher forcing), starts with bos
    image: torch.Tensor | None = None  # (3, H, W) normalised, or None for text-only sources
    code_target: bool = False  # the decoder emits image codes (code LayerNorm, 2-D positions)
    weight: float = 1.0  # per-sample loss weight (answer confidence, pretraining's 2.0)
    meta: dict[str, Any] = field(default_factory=dict)  # what evaluation needs: refs, box, id

    @classmethod
    def seq2seq(cls, task: str, vocab: UnifiedVocab, source_ids: Sequence[int],
                target_ids: Sequence[int], **fields: Any) -> "Sample":
        """The usual layout: source = bos+x+eos, target = y+eos, decoder input = bos+y."""
        source = torch.tensor([vocab.bos, *source_ids, vocab.eos], dtype=torch.long)
        target = torch.tensor([*target_ids, vocab.eos], dtype=torch.long)
        prev_output = torch.tensor([vocab.bos, *target_ids], dtype=torch.long)
        return cls(task, source, target, prev_output, **fields)

    def with_target(self, vocab: UnifiedVocab, target_ids: Sequence[int], **changes: Any) -> "Sample":
        """This (query) sample with a target: target = y+eos, decoder input = bos+y."""
        target = torch.tensor([*target_ids, vocab.eos], dtype=torch.long)
        prev_output = torch.tensor([vocab.bos, *target_ids], dtype=torch.long)
        return dataclasses.replace(self, target=target, prev_output=prev_output, **changes)

    def with_source_prompt(self, vocab: UnifiedVocab) -> "Sample":
        """This sample in OFA's ``prompt_type=prev_output`` layout: the decoder reads the
        instruction (the source without bos and eos) before the target, and only the target
        and eos are scored. The first answer position then attends to the image with a
        query that depends on the instruction, where the plain layout gives it bos alone."""
        prompt = self.source[1:-1]
        prev_output = torch.cat([self.prev_output[:1], prompt, self.prev_output[1:]])
        target = torch.cat([torch.full_like(prompt, vocab.pad), self.target])
        return dataclasses.replace(self, prev_output=prev_output, target=target)


@dataclass
class Batch:
    """Samples of any tasks, right-padded; the field names are the model's argument names."""

    src_tokens: torch.Tensor  # (B, S)
    patch_images: torch.Tensor | None  # (B, 3, H, W); zeros where a sample has no image
    patch_masks: torch.Tensor | None  # (B,) bool, False = no image for this sample
    prev_output_tokens: torch.Tensor  # (B, T)
    target: torch.Tensor  # (B, T), pad where nothing is scored
    code_masks: torch.Tensor | None  # (B,) bool, or None when no sample decodes image codes
    weights: torch.Tensor  # (B,) float
    tasks: list[str]
    meta: list[dict[str, Any]]

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return {"src_tokens": self.src_tokens, "patch_images": self.patch_images,
                "patch_masks": self.patch_masks, "prev_output_tokens": self.prev_output_tokens,
                "code_masks": self.code_masks}

    def source_prompts(self, pad_id: int) -> list[torch.Tensor]:
        """Per sample, the instruction a ``prev_output`` decoder is forced to read first:
        the source without padding, bos and eos (:meth:`Sample.with_source_prompt`)."""
        return [row[row.ne(pad_id)][1:-1] for row in self.src_tokens.cpu()]

    def __len__(self) -> int:
        return self.src_tokens.shape[0]


def pad_sequences(rows: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Right-pad 1-D tensors into one (len(rows), max_len) tensor."""
    out = torch.full((len(rows), max(row.numel() for row in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :row.numel()] = row
    return out


def _stack_images(samples: Sequence[Sample]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    shapes = {tuple(s.image.shape) for s in samples if s.image is not None}
    if not shapes:
        return None, None
    if len(shapes) > 1:
        found = ", ".join(f"{s.task}: {tuple(s.image.shape)}" for s in samples if s.image is not None)
        raise ValueError(f"images in one batch must share a size; found {found}. "
                         f"Give the tasks of one datamodule the same image_size.")
    shape = shapes.pop()
    images = torch.stack([s.image if s.image is not None else torch.zeros(shape) for s in samples])
    masks = torch.tensor([s.image is not None for s in samples])
    return images, masks


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Pad a list of samples from any mix of tasks into one Batch."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    images, masks = _stack_images(samples)
    code = torch.tensor([s.code_target for s in samples])
    return Batch(
        src_tokens=pad_sequences([s.source for s in samples], pad_id),
        patch_images=images,
        patch_masks=masks,
        prev_output_tokens=pad_sequences([s.prev_output for s in samples], pad_id),
        target=pad_sequences([s.target for s in samples], pad_id),
        code_masks=code if code.any() else None,
        weights=torch.tensor([s.weight for s in samples], dtype=torch.float),
        tasks=[s.task for s in samples],
        meta=[s.meta for s in samples],
    )
