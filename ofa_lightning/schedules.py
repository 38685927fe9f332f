"""Learning-rate schedule of the official recipes: linear warm-up, then polynomial decay."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def warmup_polynomial_decay(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.06,
                            end_factor: float = 0.0, power: float = 1.0) -> LambdaLR:
    """Warm up linearly over ``warmup_ratio * total_steps`` steps, then decay as
    ``(1 - progress) ** power`` down to ``end_factor`` times the base learning rate
    (fairseq's ``polynomial_decay`` with OFA's ``--warmup-ratio``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}; set max_steps "
                         f"(or max_epochs with a finite dataset) on the Trainer")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return end_factor + (1.0 - end_factor) * (1.0 - progress) ** power

    return LambdaLR(optimizer, factor)


def optimizers_with_schedule(params: Iterable[nn.Parameter],
                             optimizer_factory: Callable[[Iterable[nn.Parameter]], Optimizer],
                             scheduler_factory: Callable[[Optimizer], LRScheduler] | None,
                             total_steps: Callable[[], int], warmup_ratio: float,
                             end_factor: float) -> dict[str, Any]:
    """A LightningModule's ``configure_optimizers`` answer: the injected optimiser, and the
    injected scheduler or else this warm-up + decay, stepped per optimizer step.
    ``total_steps`` is asked only for the default schedule, so a run with its own scheduler
    needs no step budget."""
    optimizer = optimizer_factory(params)
    if scheduler_factory is not None:
        scheduler = scheduler_factory(optimizer)
    else:
        scheduler = warmup_polynomial_decay(optimizer, total_steps(), warmup_ratio, end_factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
