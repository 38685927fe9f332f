"""Where does a ShapesWorld VQA checkpoint compute, and where does it lose, an answer?

Not a test: it reads a checkpoint written by ``ofa-lightning fit`` (the quickstart's, say)
and prints the two measurements the README quotes about yes/no questions:

1. **Phrasing shift**: "how many <colour> shapes are there?" for every colour of held-out
   scenes, asked as trained and with a word repeated once or twice before the colour
   ("how many many red shapes are there?"), scored as zero or not. A model whose colour
   detectors are bound to a word position falls towards chance on the shifted forms.
2. **Linear probes**: can "<colour> is in the scene" be read, on held-out scenes, from the
   encoder output at the colour word, at the question's last token, and from the decoder's
   first state, for the count and the existence phrasing? Readable at the colour word but
   not in the decoder means the answer is computed and then not carried to where it is read.

    python benchmarks/vqa_probes.py runs/quickstart/checkpoints/last.ckpt [--scenes 1000]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from typing import Iterator

import torch
from torch import nn

from datamodules.shapes_world import ShapesWorld
from ofa_lightning.data import Batch, collate
from ofa_lightning.predictor import Predictor
from ofa_lightning.task import SampleContext

COUNT = "how many {} shapes are there?"
EXIST = "is there a {} shape?"
SHIFTED_COUNTS = {"as trained": COUNT, "one word later": "how many many {} shapes are there?",
                  "two words later": "how many many many {} shapes are there?"}


class Probe:
    """The checkpoint's VQA task run on hand-made questions about ShapesWorld scenes."""

    def __init__(self, checkpoint: str, batch_size: int = 100) -> None:
        self.predictor = Predictor.from_checkpoint(checkpoint)
        if "vqa" not in self.predictor.tasks:
            raise SystemExit(f"{checkpoint}: its run has no vqa task (tasks: "
                             f"{', '.join(self.predictor.tasks)})")
        self.task = self.predictor.tasks["vqa"]
        self.context = SampleContext(self.predictor.vocab, self.predictor.image_size)
        self.batch_size = batch_size

    def batches(self, records: list[dict]) -> Iterator[Batch]:
        vocab = self.predictor.vocab
        for start in range(0, len(records), self.batch_size):
            chunk = records[start:start + self.batch_size]
            yield collate([self.task.build_query(r, self.context) for r in chunk], vocab.pad)

    @torch.no_grad()
    def answers(self, records: list[dict]) -> list[str]:
        predictor = self.predictor
        return [answer for batch in self.batches(records)
                for answer in self.task.predict(predictor.model, batch, predictor.vocab)]

    @torch.no_grad()
    def states(self, records: list[dict], colour_ids: list[int]) -> dict[str, torch.Tensor]:
        """Per record: the encoder output at the colour word and at the last question token,
        and the decoder's state at the first answer position."""
        model, vocab = self.predictor.model, self.predictor.vocab
        found: dict[str, list[torch.Tensor]] = {"colour word": [], "last token": [],
                                                "decoder": []}
        offset = 0
        for batch in self.batches(records):
            encoded = model.encode(batch.src_tokens, batch.patch_images, batch.patch_masks)
            hidden = encoded.hidden.float()
            text_start = hidden.size(1) - batch.src_tokens.size(1)  # patches come first
            ids = torch.tensor(colour_ids[offset:offset + len(batch.src_tokens)])
            offset += len(ids)
            colour_at = (batch.src_tokens == ids[:, None]).int().argmax(1)
            last_at = batch.src_tokens.ne(vocab.pad).sum(1) - 2  # the token before eos
            rows = torch.arange(len(ids))
            found["colour word"].append(hidden[rows, text_start + colour_at])
            found["last token"].append(hidden[rows, text_start + last_at])
            decoder = model.decoder(batch.src_tokens[:, :1], encoded)  # bos only
            found["decoder"].append(decoder.features[:, 0].float())
        return {name: torch.cat(parts) for name, parts in found.items()}


def colour_questions(world: ShapesWorld, split: str, scenes: int, form: str,
                     rng: random.Random) -> tuple[list[dict], list[str], torch.Tensor]:
    """One question per scene about a colour present or absent, half and half."""
    records, colours, present = [], [], []
    for index in range(scenes):
        scene = world.scene(index, split)
        shown = sorted({o.colour for o in scene.objects}, key=world.colours.index)
        absent = [c for c in world.colours if c not in shown]
        ask_absent = absent and rng.random() < 0.5
        colour = rng.choice(absent if ask_absent else shown)
        records.append({"image": scene.image, "question": form.format(colour)})
        colours.append(colour)
        present.append(not ask_absent)
    return records, colours, torch.tensor(present, dtype=torch.long)


def held_out_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor,
                      test_y: torch.Tensor, steps: int = 500) -> float:
    """Logistic regression on standardised features, scored on the held-out rows."""
    torch.manual_seed(0)
    mean, std = train.mean(0), train.std(0) + 1e-5
    linear = nn.Linear(train.size(1), 2)
    optimiser = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    train, test = (train - mean) / std, (test - mean) / std
    for _ in range(steps):
        loss = nn.functional.cross_entropy(linear(train), train_y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return (linear(test).argmax(1) == test_y).float().mean().item()


def phrasing_shift(probe: Probe, world: ShapesWorld, scenes: int) -> None:
    print(f"count questions, every colour of {scenes} held-out scenes, zero or not:")
    for name, form in SHIFTED_COUNTS.items():
        records, truth = [], []
        for index in range(scenes):
            scene = world.scene(index, "val")
            shown = {o.colour for o in scene.objects}
            for colour in world.colours:
                records.append({"image": scene.image, "question": form.format(colour)})
                truth.append(colour in shown)
        answers = probe.answers(records)
        right = sum((a != "zero") == t for a, t in zip(answers, truth)) / len(truth)
        common = ", ".join(f"{a} {n}" for a, n in Counter(answers).most_common(3))
        print(f"  {name:15s} {right:.3f}  {form!r} (answers: {common})")


def routing_probes(probe: Probe, world: ShapesWorld, scenes: int) -> None:
    vocab = probe.predictor.vocab
    print(f"linear probes for 'the colour is in the scene' ({scenes} training scenes, "
          f"{scenes // 2} held out):")
    for form in (COUNT, EXIST):
        rng = random.Random(0)
        sets = [colour_questions(world, split, n, form, rng)
                for split, n in (("train", scenes), ("val", scenes // 2))]
        (train, train_c, train_y), (test, test_c, test_y) = sets
        ids = [[vocab.encode(f" {c}")[0] for c in colours] for colours in (train_c, test_c)]
        train_states, test_states = probe.states(train, ids[0]), probe.states(test, ids[1])
        scores = {where: held_out_accuracy(train_states[where], train_y,
                                           test_states[where], test_y)
                  for where in train_states}
        print(f"  {form!r}: " + ", ".join(f"{where} {acc:.3f}" for where, acc in scores.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by `ofa-lightning fit` with a vqa task")
    parser.add_argument("--scenes", type=int, default=1000, help="probe training scenes")
    parser.add_argument("--shift_scenes", type=int, default=60, help="scenes per phrasing")
    args = parser.parse_args()
    torch.set_num_threads(2)
    probe = Probe(args.checkpoint)
    world = getattr(probe.task.source, "world", None)
    if not isinstance(world, ShapesWorld):
        parser.error(f"{args.checkpoint}: its vqa task does not read ShapesWorld "
                     f"(source {type(probe.task.source).__name__})")
    phrasing_shift(probe, world, args.shift_scenes)
    routing_probes(probe, world, args.scenes)


if __name__ == "__main__":
    main()
