"""OFAModule: the LightningModule around OFAModel, for any mix of task plugins.

The network is built in ``configure_model`` (so FSDP can shard it as it is created); the
optimiser and schedule are injected; validation generates with each task's own settings and
feeds that task's metrics, logged as ``val/<task>/<metric>``. Every checkpoint carries the
resolved model config, the vocabulary and the run's config, so ``predict`` needs nothing else.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Literal, Mapping, get_args

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ofa_lightning.checkpoint import FIT_CHECKPOINT_KEY, load_checkpoint, load_state_dict_strict
from ofa_lightning.config import OFAConfig
from ofa_lightning.data import Batch
from ofa_lightning.distributed import destroy_process_group_at_exit
from ofa_lightning.losses import label_smoothed_cross_entropy
from ofa_lightning.model import OFAModel
from ofa_lightning.schedules import optimizers_with_schedule
from ofa_lightning.task import Task
from ofa_lightning.vocab import UnifiedVocab

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
LossNormalization = Literal["tokens", "samples"]


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as the official recipes (betas 0.9/0.999, eps 1e-8, weight decay 0.01)."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _metric_values(name: str, value: Any) -> dict[str, torch.Tensor]:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {name: value}


def _plain(value: Any) -> Any:
    """Predictions as JSON-ready values (boxes come back as tensors)."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


class OFAModule(LightningModule):
    def __init__(
        self,
        model: str = "nano",
        model_overrides: dict[str, Any] | None = None,
        vocab: UnifiedVocab | None = None,
        tasks: list[Task] | None = None,
        init_from: str | None = None,
        label_smoothing: float = 0.1,
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory | None = None,
        warmup_ratio: float = 0.06,
        end_lr_factor: float = 0.0,
        loss_normalization: LossNormalization = "tokens",
        task_loss_weights: dict[str, float] | None = None,
    ) -> None:
        """
        Args:
            model: a preset name (``OFAConfig.from_name``), refined by ``model_overrides``.
            vocab: the vocabulary; with the CLI it is linked from the datamodule.
            tasks: the task plugins; with the CLI they are linked from the datamodule.
            init_from: weights to start from: an official OFA checkpoint (fairseq ``.pt``,
                bare or HF state dict), this project's own file, or a ``.ckpt`` of an
                earlier ``fit`` (fine-tuning the quickstart, say).
            lr_scheduler: replaces the default warm-up + linear decay over the run.
            loss_normalization: ``"tokens"`` (official, fairseq): the batch's summed token
                losses over its token count, so a task's pull on the shared weights grows
                with its target length: a 2-token yes/no answer weighs a seventh of a
                14-token detection target. ``"samples"``: each sample's mean token loss
                (times its loss weight), averaged over the samples, so a task pulls in
                proportion to its share of the stream whatever its target length.
            task_loss_weights: ``{task name: factor}``; the factor multiplies the loss weight
                of that task's training samples (on top of the task's own, the VQA answer
                confidence say). Unlike the task's sampling ``weight`` it leaves the stream
                alone: the other tasks keep their samples, and only the pull on the shared
                weights changes. Validation losses stay unweighted.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["vocab", "tasks", "optimizer", "lr_scheduler"])
        if vocab is None:
            raise ValueError("OFAModule needs a vocabulary (with the CLI, the datamodule's is "
                             "linked in automatically)")
        self.vocab = vocab
        self.tasks = list(tasks or [])
        self.config = OFAConfig.from_name(model, **{"vocab_size": len(vocab),
                                                    **(model_overrides or {})})
        if self.config.vocab_size != len(vocab):
            raise ValueError(f"model vocab_size={self.config.vocab_size} but the vocabulary has "
                             f"{len(vocab)} entries")
        self.init_from = init_from
        self.label_smoothing = label_smoothing
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.warmup_ratio = warmup_ratio
        self.end_lr_factor = end_lr_factor
        if loss_normalization not in get_args(LossNormalization):
            choices = " or ".join(map(repr, get_args(LossNormalization)))
            raise ValueError(f"loss_normalization must be {choices}, got {loss_normalization!r}")
        self.loss_normalization = loss_normalization
        self.task_loss_weights = _checked_task_loss_weights(task_loss_weights or {}, self.tasks)
        self.model: OFAModel | None = None
        self.run_config: str | None = None  # the CLI's resolved YAML, saved in checkpoints
        self.val_metrics = nn.ModuleList(nn.ModuleDict(t.metrics()) for t in self.tasks)
        self.test_metrics = nn.ModuleList(nn.ModuleDict(t.metrics()) for t in self.tasks)

    # --- building ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = OFAModel(self.config)
        if self.init_from:
            self._load_initial_weights(self.init_from)

    def _load_initial_weights(self, path: str) -> None:
        loaded = load_checkpoint(path)
        if loaded.vocab_state is not None and UnifiedVocab.from_state(loaded.vocab_state) != self.vocab:
            raise ValueError(
                f"init_from={path} was trained with another vocabulary than this run's; give the "
                f"datamodule that run's vocabulary (--data.init_args.vocab <run log dir>/vocab)")
        if loaded.config.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"init_from={path} has a {loaded.config.vocab_size}-entry vocabulary, this run's "
                f"has {self.config.vocab_size}; use the vocabulary the checkpoint was trained with")
        _warn_config_changed(loaded.config, self.config, f"init_from={path}")
        load_state_dict_strict(self.model, loaded.state_dict, source=path)
        log.info("initialised weights from %s (%s)", path, loaded.source_format)

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()  # called in every process, after its group exists

    def configure_optimizers(self) -> Any:
        return optimizers_with_schedule(
            self.trainer.model.parameters(), self.optimizer_factory, self.scheduler_factory,
            lambda: int(self.trainer.estimated_stepping_batches), self.warmup_ratio,
            self.end_lr_factor)

    # --- training ---------------------------------------------------------------------------
    def _loss(self, batch: Batch, weighted: bool = True, per_sample: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Summed label-smoothed loss and nll, and what to divide them by: the number of
        scored tokens, or with ``per_sample`` the number of samples (each sample's tokens
        then weigh 1 / its token count). ``weighted`` applies the per-sample loss weights
        (training); evaluation leaves them out, so validation losses of tasks with
        different weights read on one scale."""
        scored = batch.target.ne(self.vocab.pad)  # (B, T); logits only where a token is scored
        out = self.model(**batch.model_inputs(), logits_mask=scored)
        weights = self._training_weights(batch) if weighted else torch.ones_like(batch.weights)
        if per_sample:
            weights = weights / scored.sum(1).clamp(min=1)
        token_weights = weights[:, None].expand_as(batch.target)[scored]
        loss = label_smoothed_cross_entropy(out.logits[None], batch.target[scored][None],
                                            self.label_smoothing, self.vocab.pad,
                                            weights=token_weights[None])
        return loss.loss, loss.nll_loss, len(batch) if per_sample else loss.num_tokens

    def _training_weights(self, batch: Batch) -> torch.Tensor:
        if not self.task_loss_weights:
            return batch.weights
        factors = [self.task_loss_weights.get(task, 1.0) for task in batch.tasks]
        return batch.weights * torch.tensor(factors, dtype=batch.weights.dtype,
                                            device=batch.weights.device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss_sum, nll_sum, count = self._loss(
            batch, per_sample=self.loss_normalization == "samples")
        # Normalise by the tokens (fairseq's way) or samples of the whole global batch: DDP
        # averages gradients over ranks, so scaling by world_size / global count makes the
        # result equal to one process seeing the whole batch.
        world = self.trainer.world_size
        global_count = self.all_gather(torch.tensor(float(count), device=self.device)).sum() \
            if world > 1 else torch.tensor(float(count), device=self.device)
        loss = loss_sum * world / global_count
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=world > 1,
                 batch_size=len(batch))
        self.log("train/nll_loss", nll_sum.detach() * world / global_count, sync_dist=world > 1,
                 batch_size=len(batch))
        return loss

    # --- evaluation ---------------------------------------------------------------------------
    def _evaluate(self, batch: Batch, batch_idx: int, dataloader_idx: int, stage: str,
                  metrics: nn.ModuleList) -> None:
        task = self.tasks[dataloader_idx]
        loss_sum, _, tokens = self._loss(batch, weighted=False)
        self.log(f"{stage}/{task.name}/loss", loss_sum / max(tokens, 1), batch_size=len(batch),
                 add_dataloader_idx=False, sync_dist=True)
        predictions = task.predict(self.model, batch, self.vocab)
        task.update_metrics(metrics[dataloader_idx], predictions, batch.meta)
        # A task's metrics are logged at its loader's last batch, not at epoch end: logged
        # there, Lightning files them under this loader, so the results table of `validate`
        # and `test` shows each task's metrics in its own column only.
        if batch_idx + 1 == self._loader_batches(stage, dataloader_idx):
            self._log_task_metrics(stage, task, metrics[dataloader_idx])

    def _loader_batches(self, stage: str, dataloader_idx: int) -> float:
        trainer = self.trainer
        if trainer.sanity_checking:
            counts = trainer.num_sanity_val_batches
        else:
            counts = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
        return counts[dataloader_idx]

    def _log_task_metrics(self, stage: str, task: Task, task_metrics: nn.ModuleDict) -> None:
        for name, metric in task_metrics.items():
            if not metric.update_called:
                continue
            # compute() already gathered every process's state; sync_dist only averages
            # equal values (and spares DDP runs Lightning's warning about it)
            for key, value in _metric_values(name, metric.compute()).items():
                self.log(f"{stage}/{task.name}/{key}", torch.as_tensor(value, dtype=torch.float32),
                         add_dataloader_idx=False, prog_bar=stage == "val", batch_size=1,
                         sync_dist=True)
            metric.reset()

    def _log_metrics(self, stage: str, metrics: nn.ModuleList) -> None:
        """Whatever a loader of unknown length left unlogged (reset metrics are skipped)."""
        for task, task_metrics in zip(self.tasks, metrics):
            self._log_task_metrics(stage, task, task_metrics)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, dataloader_idx, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, dataloader_idx, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
                     ) -> list[dict[str, Any]]:
        """One record per sample: task, record id and the task's decoded prediction."""
        task = self.tasks[dataloader_idx]
        predictions = task.predict(self.model, batch, self.vocab)
        return [{"task": task.name, "id": meta.get("id"), "prediction": _plain(prediction)}
                for prediction, meta in zip(predictions, batch.meta)]

    # --- checkpoints ----------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(FIT_CHECKPOINT_KEY, {}).get("model_config")
        if saved is not None:
            _warn_config_changed(OFAConfig.from_dict(saved), self.config, "the resumed checkpoint")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[FIT_CHECKPOINT_KEY] = {"model_config": self.config.to_dict(),
                                      "vocab": self.vocab.to_state(),
                                      "run_config": self.run_config}


def _checked_task_loss_weights(factors: Mapping[str, float], tasks: list[Task]
                               ) -> dict[str, float]:
    names = [task.name for task in tasks]
    for name, factor in factors.items():
        if name not in names:
            raise ValueError(f"task_loss_weights names {name!r}, which is not a task of this "
                             f"run; its tasks: {', '.join(names) or '(none)'}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                or not math.isfinite(factor) or factor < 0:
            raise ValueError(f"task_loss_weights[{name!r}] must be a finite number >= 0, "
                             f"got {factor!r}")
    return {name: float(factor) for name, factor in factors.items()}


def _warn_config_changed(saved: OFAConfig, current: OFAConfig, source: str) -> None:
    """Weights keep loading (a deliberate architecture change is the user's call), but a
    silent one, such as a preset whose values changed since the weights were trained, is
    named."""
    changed = saved.function_differences(current)
    if changed:
        rank_zero_warn(f"{source} was trained with another model config than this run's "
                       f"({'; '.join(changed)}); its weights are loaded into this run's model")
