"""Learning-rate schedule of the official recipes: linear warm-up, then polynomial decay."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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
