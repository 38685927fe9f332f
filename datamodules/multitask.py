"""MultiTaskDataModule: a weighted mixture of tasks for training, one dataloader per task
for evaluation; TaskDataModule is the single-task case.

The training stream
-------------------
Training draws from an endless sequence of *global sample indices* ``g = 0, 1, 2, ...``;
sample ``g`` is a pure function of ``(seed, g)``:

* its task is drawn with ``random.Random(f"{seed}/{g}")`` in proportion to the tasks'
  ``weight``, or, from the ``start`` of a :class:`MixturePhase` on, to that phase's weights
  (a curriculum: which tasks the model sees is a function of ``g`` too);
* its record is ``task.source.record("train", n)`` with ``n = g`` for an endless source,
  and for a finite source of ``N`` records ``n = perm_p(g mod N)``, where ``p = g // N`` is
  the pass and ``perm_p`` a pseudo-random permutation of ``range(N)`` drawn from
  ``(seed, task, p)``, so every pass over ``g`` visits the records in a new order.

Sharding (contiguous): with ``B = batch_size`` and ``W`` processes, global batch ``i`` is
the samples ``[start + i*B*W, start + (i+1)*B*W)``; rank ``r`` takes the ``r``-th
contiguous block of ``B``: ``[start + (i*W + r)*B, start + (i*W + r + 1)*B)``. The ranks'
batches of one step, concatenated in rank order, are exactly the batch of one process
with ``batch_size = B*W``. Within a rank, DataLoader worker ``w`` of ``K`` builds the
rank's local batches ``i ≡ w (mod K)``; the DataLoader returns worker batches round-robin,
so the stream is the same for every ``num_workers``. The dataset yields whole, collated
batches (the DataLoader runs with ``batch_size=None``), so a skipped record shrinks its
batch and never shifts the batch boundaries.

Resuming: a resumed run continues the exact stream. The datamodule's ``state_dict`` (in
every checkpoint) holds the stream position, the global sample index reached at
``global_step``; the first time the training dataloader is iterated in a fit, it starts
there. Without that state the start is ``global_step * batch_size * world_size *
accumulate_grad_batches``, read when the dataloader is *iterated*. Reading
``trainer.global_step`` is not enough on its own: when the model asks for
``trainer.estimated_stepping_batches`` in ``configure_optimizers`` and ``max_epochs`` is
set, Lightning builds the training dataloader, iterates it and prefetches a batch before
it restores the step counter. Because the saved position counts samples, a resumed run
may also change the number of processes and still continue where the old one stopped.
A checkpoint taken inside a gradient-accumulation window replays that window's batches.

Evaluation: ``val_dataloader()`` / ``test_dataloader()`` return one map-style DataLoader
per task, in the order of ``tasks`` (``dataloader_idx`` -> ``self.tasks[idx]``). Samples
are built in ``__getitem__``, so Lightning's distributed sampler shards them.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import random
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from datamodules.sources import locate
from ofa_lightning.data import Batch, Sample, collate
from ofa_lightning.task import RecordError, SampleContext, Task, require_fields
from ofa_lightning.vocab import BPE_FILES, SAVE_FILENAME, UnifiedVocab

__all__ = ["MultiTaskDataModule", "TaskDataModule", "TrainStream", "StreamLoader", "EvalDataset",
           "MixturePhase", "build_vocab", "build_sample", "permute"]

VOCAB_DIRNAME = "vocab"


# ---------------------------------------------------------------------------- samples
def build_sample(task: Task, split: str, index: int, context: SampleContext,
                 train: bool) -> Sample:
    """Record ``index`` of ``split`` of the task's source, as a Sample.

    A RecordError from the source or the task comes back prefixed with where the record
    lives (``data/val.jsonl:17: ...``); any other error gets that location as a note.
    """
    source = task.source
    where = locate(source, split, index)
    try:
        record = source.record(split, index)
        require_fields(record, task.required_fields, task.name, where)
        return task.build_sample(record, context, train)
    except RecordError as error:
        message = str(error)
        raise RecordError(message if where in message else f"{where}: {message}") from error
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(f"while building a {task.name!r} sample from {where}")
        raise


def _try_sample(task: Task, split: str, index: int, context: SampleContext, train: bool,
                skip_bad_records: bool) -> Sample | None:
    try:
        return build_sample(task, split, index, context, train)
    except RecordError as error:
        if not skip_bad_records:
            raise
        warnings.warn(f"skipped: {error}", stacklevel=2)
        return None


@contextlib.contextmanager
def _seeded_global_rngs(key: str) -> Iterator[None]:
    """Seed ``random`` and torch's CPU generator from ``key``; restore both on exit."""
    seed = random.Random(key).getrandbits(63)
    generator = torch.default_generator  # (torch.manual_seed would also touch accelerators)
    python_state, torch_state = random.getstate(), generator.get_state()
    random.seed(seed)
    generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        generator.set_state(torch_state)


def permute(position: int, size: int, key: int) -> int:
    """``position``'s image under a pseudo-random permutation of ``range(size)`` chosen by
    ``key`` (a 4-round Feistel network over the next even power of two, walking cycles back
    into range): O(1) time and memory for any size."""
    if not 0 <= position < size:
        raise ValueError(f"permute: position {position} is outside range({size})")
    bits = max(2, (size - 1).bit_length())
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    x = position
    while True:
        left, right = x >> half, x & mask
        for round_ in range(4):
            left, right = right, left ^ (_mix(right, key, round_) & mask)
        x = (left << half) | right
        if x < size:
            return x


def _mix(value: int, key: int, round_: int) -> int:
    """splitmix64's finaliser over (value, key, round)."""
    z = (value * 0x9E3779B97F4A7C15 + key + round_ * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


# ---------------------------------------------------------------------------- the mixture
@dataclass(frozen=True)
class MixturePhase:
    """From global sample ``start`` on (``step * batch_size * devices * accumulation``), draw
    tasks in proportion to ``weights`` (task name -> weight, 0 leaves a task out); a task
    not named keeps its own ``weight``.

    Phases let a run decide what a model sees when (one task alone first, a task's share
    raised once others have been learnt) without giving up a stream that is a function of
    the sample index: resuming and sharding work as without them. The ShapesWorld curricula
    measured so far are in the README. Counting in samples, not steps, keeps a phase
    boundary in place when a resumed run changes the number of processes.
    """

    start: int
    weights: dict[str, float] = field(default_factory=dict)


def mixture_weights(tasks: Sequence[Task], phases: Sequence[MixturePhase]) -> list[list[float]]:
    """Each phase's weight per task (the tasks' own weights first), checked: phases start
    at sample 0 or later in increasing order, name only known tasks, and leave some task a
    positive weight."""
    names = [t.name for t in tasks]
    table = [[t.weight for t in tasks]]
    previous = -1
    for i, phase in enumerate(phases):
        where = f"phases[{i}] (start {phase.start})"
        if phase.start <= previous:
            raise ValueError(f"{where}: phases must start at sample 0 or later, each after "
                             f"the previous one ({previous})")
        unknown = sorted(set(phase.weights) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown tasks {unknown}; the mixture has {names} (a "
                             f"curriculum from another config? `phases: null` drops it)")
        row = [float(phase.weights.get(name, task.weight)) for name, task in zip(names, tasks)]
        if min(row) < 0 or max(row) == 0:
            raise ValueError(f"{where}: weights must be >= 0 with one positive, got "
                             f"{dict(zip(names, row))}")
        table.append(row)
        previous = phase.start
    return table


# ---------------------------------------------------------------------------- training
class TrainStream(IterableDataset):
    """The endless training stream of a task mixture for one rank, as collated Batches.

    See the module docstring for the sampling and sharding rules; :meth:`task_index`,
    :meth:`record_index` and :meth:`global_indices` expose them. ``start`` (a global sample
    index) may be changed before iterating; the datamodule sets it when iteration begins.
    """

    def __init__(self, tasks: Sequence[Task], context: SampleContext, batch_size: int,
                 seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1,
                 skip_bad_records: bool = False, phases: Sequence[MixturePhase] = ()) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainStream: need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if batch_size < 1 or start < 0:
            raise ValueError(f"TrainStream: need batch_size >= 1 and start >= 0, got "
                             f"batch_size={batch_size}, start={start}")
        self.tasks = list(tasks)
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.skip_bad_records = skip_bad_records
        self._phase_starts = [0] + [phase.start for phase in phases]
        self._cumulative = [list(itertools.accumulate(row))
                            for row in mixture_weights(self.tasks, phases)]
        self._sizes = [t.source.size("train") for t in self.tasks]
        self._keys: dict[int, tuple[int, int]] = {}  # task -> (pass, permutation key)

    def task_index(self, g: int) -> int:
        """Which task (position in ``tasks``) global sample ``g`` belongs to."""
        cumulative = self._cumulative[bisect.bisect_right(self._phase_starts, g) - 1]
        u = random.Random(f"{self.seed}/{g}").random() * cumulative[-1]
        return min(bisect.bisect_right(cumulative, u), len(self.tasks) - 1)

    def record_index(self, task_index: int, g: int) -> int:
        """The index into the task's train split that global sample ``g`` reads."""
        size = self._sizes[task_index]
        if size is None:
            return g
        if size == 0:
            raise ValueError(f"task {self.tasks[task_index].name!r}: its source "
                             f"{self.tasks[task_index].source.describe()} has no train records")
        epoch, position = divmod(g, size)
        cached = self._keys.get(task_index)
        if cached is None or cached[0] != epoch:  # one pass per task at a time is enough
            name = self.tasks[task_index].name
            cached = (epoch, random.Random(f"{self.seed}/{name}/{epoch}").getrandbits(64))
            self._keys[task_index] = cached
        return permute(position, size, cached[1])

    def global_indices(self, local_batch: int) -> range:
        """Global sample indices of this rank's ``local_batch``-th batch."""
        first = self.start + (local_batch * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def sample(self, g: int) -> Sample | None:
        """Global sample ``g`` (None when it was a bad record and bad records are skipped).

        The task builds it with Python's ``random`` and torch's CPU generator seeded from
        ``(seed, g)`` (their states are restored afterwards), so random choices inside
        ``build_sample`` (a caption among the references, an augmentation) are part of the
        deterministic stream too, whatever the process or DataLoader worker.
        """
        t = self.task_index(g)
        with _seeded_global_rngs(f"{self.seed}/{g}/sample"):
            return _try_sample(self.tasks[t], "train", self.record_index(t, g), self.context,
                               train=True, skip_bad_records=self.skip_bad_records)

    def batches(self, first: int = 0, step: int = 1) -> Iterator[Batch]:
        """This rank's local batches ``first, first + step, ...``, collated."""
        for local_batch in itertools.count(first, step):
            samples = [s for s in map(self.sample, self.global_indices(local_batch))
                       if s is not None]
            if samples:
                yield collate(samples, self.context.vocab.pad)

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        if worker is None:
            return self.batches()
        return self.batches(worker.id, worker.num_workers)


class StreamLoader(DataLoader):
    """A DataLoader over a stream of whole batches (a dataset with a ``start`` sample index)
    that asks for the start position each time it is iterated, i.e. after Lightning has
    restored a checkpoint (workers are started after that)."""

    def __init__(self, dataset: IterableDataset, position: Callable[[], int],
                 **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._position = position

    def __iter__(self) -> Any:
        self.dataset.start = self._position()
        return super().__iter__()


# ---------------------------------------------------------------------------- evaluation
class EvalDataset(Dataset):
    """The first ``size`` records of one task's held-out split; samples built on access.

    With ``skip_bad_records`` a bad record gives None (reported through warnings), which
    the datamodule's collate function drops.
    """

    def __init__(self, task: Task, split: str, context: SampleContext,
                 max_samples: int | None = None, skip_bad_records: bool = False) -> None:
        size = task.source.size(split)
        if size is None:
            raise ValueError(f"task {task.name!r}: {split} split of {task.source.describe()} "
                             f"is endless; evaluation needs a finite split")
        self.task, self.split, self.context = task, split, context
        self.size = size if max_samples is None else min(size, max_samples)
        self.skip_bad_records = skip_bad_records

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample | None:
        if not 0 <= index < self.size:
            raise IndexError(f"{self.task.name} {self.split}: index {index} outside [0, {self.size})")
        return _try_sample(self.task, self.split, index, self.context, train=False,
                           skip_bad_records=self.skip_bad_records)


def collate_present(samples: Sequence[Sample | None], pad_id: int) -> Batch:
    """collate() over the samples that were built (skipped records are None)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise RecordError(f"every record of an evaluation batch of {len(samples)} was bad "
                          f"(see the warnings above); fix the data or lower eval_batch_size")
    return collate(kept, pad_id)


# ---------------------------------------------------------------------------- vocabulary
def build_vocab(tasks: Sequence[Task], vocab: str | None = None, vocab_size: int = 1000,
                tokenizer_texts: int = 2000, num_codes: int = 8192,
                num_bins: int = 1000) -> UnifiedVocab:
    """The vocabulary of a datamodule.

    ``vocab`` is a directory with OFA's BPE files (``encoder.json``, ``vocab.bpe``,
    ``dict.txt``: the official ids) or one written by ``UnifiedVocab.save`` (a run's
    ``vocab/``). With ``vocab=None`` a byte-level BPE of ``vocab_size`` text entries is
    trained on ``texts(tokenizer_texts)`` of every task's source (each with a leading
    space, the form tasks encode), plus each task's instruction as often as
    ``tokenizer_texts`` (every sample carries it).
    """
    if vocab is not None:
        directory = Path(vocab)
        if (directory / SAVE_FILENAME).is_file():
            return UnifiedVocab.load(directory)
        if all((directory / name).is_file() for name in BPE_FILES):
            return UnifiedVocab.from_bpe_dir(directory)
        found = sorted(p.name for p in directory.iterdir())[:10] if directory.is_dir() else None
        raise FileNotFoundError(
            f"vocab={str(vocab)!r}: expected a directory with OFA's BPE files "
            f"({', '.join(BPE_FILES)}) or with {SAVE_FILENAME} (written by UnifiedVocab.save, "
            f"e.g. a run's {VOCAB_DIRNAME}/); "
            + ("it does not exist" if found is None else f"it holds {found or 'nothing'}")
            + ". Use vocab=null to train one from the data.")
    if tokenizer_texts < 1:
        raise ValueError(f"tokenizer_texts must be >= 1, got {tokenizer_texts}")

    def texts() -> Iterator[str]:
        for task in tasks:
            instruction = getattr(task, "instruction", "").replace("{}", " ")
            if instruction.strip():
                yield from itertools.repeat(instruction, tokenizer_texts)
            # tasks encode text as " " + text (as OFA does), so train on that form
            yield from (text if text.startswith(" ") else " " + text
                        for text in task.source.texts(tokenizer_texts))

    return UnifiedVocab.train(texts(), vocab_size=vocab_size, num_codes=num_codes,
                              num_bins=num_bins)


# ---------------------------------------------------------------------------- datamodules
class MultiTaskDataModule(pl.LightningDataModule):
    """A weighted mixture of tasks (``task.weight``) for training; one dataloader per task
    for validation and test (``self.tasks[dataloader_idx]``).

    The vocabulary is built here, at construction, so the CLI can hand it to the model
    (``self.vocab``; ``self.context`` is what tasks build samples with). ``setup("fit")``
    saves it to ``<trainer.log_dir>/vocab/``.

    Args:
        tasks: task plugins, each with a source; names must differ.
        batch_size: training samples per process and step.
        eval_batch_size: samples per evaluation batch (default: batch_size).
        image_size: side images are resized to.
        vocab: a directory with OFA BPE files or a saved vocabulary; None trains one.
        vocab_size: text entries of a trained vocabulary.
        num_codes, num_bins: image-code and location tokens of a trained vocabulary
            (OFA: 8192 and 1000; a run without image generation can drop the codes, and
            small images need fewer bins, which makes the softmax smaller).
        tokenizer_texts: training records per task read to train the vocabulary.
        num_workers, pin_memory: DataLoader settings (the stream is the same for any
            num_workers).
        seed: the training stream's seed (independent of Lightning's global seed).
        skip_bad_records: skip records that raise RecordError (with a warning) instead
            of failing.
        max_eval_samples: evaluate on at most this many records per task and split.
        phases: a curriculum, :class:`MixturePhase` s that change the tasks' weights from
            a global sample index on.
    """

    def __init__(self, tasks: list[Task], batch_size: int = 32, eval_batch_size: int | None = None,
                 image_size: int = 256, vocab: str | None = None, vocab_size: int = 1000,
                 tokenizer_texts: int = 2000, num_codes: int = 8192, num_bins: int = 1000,
                 num_workers: int = 0, pin_memory: bool = False,
                 seed: int = 0, skip_bad_records: bool = False,
                 max_eval_samples: int | None = None,
                 phases: list[MixturePhase] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        _check_tasks(self.tasks)
        self.phases = list(phases or ())
        mixture_weights(self.tasks, self.phases)  # fail at construction, not at the first step
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("image_size", image_size, 1), ("num_workers", num_workers, 0),
                                 ("max_eval_samples", max_eval_samples, 0)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{type(self).__name__}: {name} must be an int >= {low}, "
                                 f"got {value!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.skip_bad_records = skip_bad_records
        self.max_eval_samples = max_eval_samples
        self.vocab = build_vocab(self.tasks, vocab, vocab_size, tokenizer_texts, num_codes,
                                 num_bins)
        self.context = SampleContext(self.vocab, image_size)
        # the stream position: (global sample index, global_step) where the current
        # iteration started, or the pair loaded from a checkpoint
        self._anchor: tuple[int, int] | None = None
        self._loaded_anchor: tuple[int, int] | None = None

    # --- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if stage != "fit" or trainer is None:
            return
        # a new fit: forget positions of an earlier one (a checkpoint's is loaded after setup)
        self._anchor = self._loaded_anchor = None
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        if log_dir is not None and trainer.is_global_zero:
            self.vocab.save(Path(log_dir) / VOCAB_DIRNAME)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        stream = TrainStream(self.tasks, self.context, self.batch_size, seed=self.seed,
                             rank=rank, world_size=world, skip_bad_records=self.skip_bad_records,
                             phases=self.phases)
        return StreamLoader(stream, self._start_position, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """``ofa-lightning predict --config``: the test split of every task."""
        return self._eval_dataloaders("test")

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (global sample index at ``global_step``) and what
        the stream depends on, so a resumed run continues it and warns when it cannot."""
        step = self._global_step()
        return {"samples": self.samples_seen(step), "global_step": step, **self._mixture()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self._mixture()
        state = {"phases": [], **state}  # checkpoints from before phases existed had none
        changed = [f"{k}: {state.get(k)!r} -> {v!r}" for k, v in now.items() if state.get(k) != v]
        if changed:
            warnings.warn(f"resuming with a different training mixture ({'; '.join(changed)}): "
                          f"the stream continues at sample {state['samples']} but is not the "
                          f"one the checkpoint was trained on", stacklevel=2)
        self._loaded_anchor = (int(state["samples"]), int(state["global_step"]))

    def _mixture(self) -> dict[str, Any]:
        """What the training stream is a function of, besides the sample index."""
        return {"seed": self.seed, "tasks": [t.name for t in self.tasks],
                "weights": [t.weight for t in self.tasks],
                "phases": [[p.start, dict(p.weights)] for p in self.phases]}

    # --- the stream position ------------------------------------------------------------------
    def samples_seen(self, global_step: int) -> int:
        """Global sample index the stream is at after ``global_step`` optimizer steps."""
        anchor = self._anchor or self._loaded_anchor or (0, 0)
        return anchor[0] + (global_step - anchor[1]) * self._samples_per_step()

    def _start_position(self) -> int:
        """Called each time the training dataloader is iterated.

        The first time in a fit it returns the checkpoint's position when one was loaded,
        without asking ``trainer.global_step``: Lightning may iterate (and prefetch from)
        the dataloader before it restores the step counter, namely when the model asks
        for ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` and
        ``max_epochs`` is set. Later iterations (new epochs) continue from the step count.
        """
        if self._anchor is not None:
            return self.samples_seen(self._global_step())
        if self._loaded_anchor is not None:
            self._anchor = self._loaded_anchor
        else:
            step = self._global_step()
            trainer = self.trainer
            if trainer is not None and trainer.ckpt_path is not None:
                warnings.warn(
                    f"resuming from {trainer.ckpt_path}, which holds no {type(self).__name__} "
                    f"state: the training stream restarts at global_step ({step}) x "
                    f"{self._samples_per_step()} samples per step, which is only right if "
                    f"Lightning restored the step before iterating the training dataloader",
                    stacklevel=2)
            self._anchor = (step * self._samples_per_step(), step)
        return self._anchor[0]

    def _samples_per_step(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return self.batch_size
        return self.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def _global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # --- evaluation -----------------------------------------------------------------------------
    def eval_dataset(self, task: Task, split: str) -> EvalDataset:
        return EvalDataset(task, split, self.context, self.max_eval_samples, self.skip_bad_records)

    def _eval_dataloaders(self, split: str) -> list[DataLoader]:
        return [DataLoader(self.eval_dataset(task, split), batch_size=self.eval_batch_size,
                           shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory,
                           collate_fn=partial(collate_present, pad_id=self.vocab.pad))
                for task in self.tasks]


class TaskDataModule(MultiTaskDataModule):
    """One task: ``TaskDataModule(task, batch_size=..., ...)`` takes the arguments of
    :class:`MultiTaskDataModule` after ``task``."""

    def __init__(self, task: Task, **kwargs: Any) -> None:
        super().__init__([task], **kwargs)


def _check_tasks(tasks: Sequence[Task]) -> None:
    if not tasks:
        raise ValueError("a datamodule needs at least one task")
    for i, task in enumerate(tasks):
        if not isinstance(task, Task):
            raise ValueError(f"tasks[{i}] is a {type(task).__name__}, not a Task; give task "
                             f"plugins such as class_path: tasks.caption.CaptionTask")
        if task.source is None:
            raise ValueError(f"task {task.name!r} (tasks[{i}]) has no source; give it one "
                             f"(init_args.source, e.g. datamodules.sources.ShapesWorldSource)")
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task names must differ (they key metrics and dataloaders); "
                         f"repeated: {repeated}")
