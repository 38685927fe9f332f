"""Speed of the OFA network on this machine: eval forward, beam search, training step.

Not a test: it prints numbers. Setting (issue #2): a preset (default the real ``tiny``),
batch 8, 256 px images, 16 source and 16 target tokens, in fp32 and in bf16 autocast. It
also counts the FLOPs of each workload and measures a plain matmul in the same run, so the
achieved fraction of this machine's peak is known without trusting a datasheet.

    python benchmarks/bench_model.py --threads 2 [--preset tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ofa_lightning.config import OFAConfig
from ofa_lightning.losses import label_smoothed_cross_entropy
from ofa_lightning.model import OFAModel

# The official OFA code, same setting, fp32 seconds (../shared/ENV.md's anchors, taken on the
# reference 2-core machine; compare the matmul roofs when this run is on another CPU).
OFFICIAL_SECONDS = {"forward": 0.76, "beam5": 1.6, "train_step": 2.55}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048) -> float:
    """Achieved FLOP/s of one large square matmul: the roof this run is compared against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=5, warmup=2)
    return 2 * size ** 3 / seconds


def make_batch(config: OFAConfig, batch: int, image: int, src_len: int, tgt_len: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, 50000, (batch, src_len), generator=generator)
    src[:, 0], src[:, -1] = 0, 2
    target = torch.randint(4, 50000, (batch, tgt_len), generator=generator)
    target[:, -1] = 2
    prev = torch.cat([torch.zeros(batch, 1, dtype=torch.long), target[:, :-1]], dim=1)
    return {k: v.to(device) for k, v in {
        "src_tokens": src, "patch_images": torch.randn(batch, 3, image, image, generator=generator),
        "patch_masks": torch.ones(batch, dtype=torch.bool), "prev_output_tokens": prev,
        "target": target}.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16, help="source and target length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = OFAConfig.from_name(args.preset)
    model = OFAModel(config).to(device)
    data = make_batch(config, args.batch, args.image, args.tokens, args.tokens, device)
    inputs = {k: data[k] for k in ("src_tokens", "patch_images", "patch_masks", "prev_output_tokens")}
    # fused AdamW: one kernel over all parameters (CPU and CUDA), what OFAModule uses too
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset} ({params / 1e6:.2f}M params), batch {args.batch}, "
          f"{args.image}px images, {args.tokens}+{args.tokens} tokens, device {device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs)

    def beam5() -> None:
        model.eval()
        model.generate(data["src_tokens"], data["patch_images"], data["patch_masks"], beam=5,
                       max_len_b=args.tokens, min_len=args.tokens, no_repeat_ngram_size=3)

    def train_step() -> None:
        model.train()
        out = model(**inputs)
        loss = label_smoothed_cross_entropy(out.logits, data["target"], 0.1, config.pad_id)
        (loss.loss / loss.num_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    workloads = {"forward": forward, "beam5": beam5, "train_step": train_step}
    flops = {name: count_flops(fn) for name, fn in workloads.items()}
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        peak = matmul_peak(dtype, device)
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())
        print(f"\n[{dtype_name}] matmul roof measured now: {peak / 1e12:.3f} TFLOP/s")
        print(f"{'workload':<12}{'seconds':>9}{'GFLOP':>9}{'TFLOP/s':>9}{'of roof':>9}"
              f"{'vs official fp32':>18}")
        for name, fn in workloads.items():
            with autocast:
                seconds = timed(fn, device, args.repeats)
            rate = flops[name] / seconds
            ratio = seconds / OFFICIAL_SECONDS[name]
            print(f"{name:<12}{seconds:>9.3f}{flops[name] / 1e9:>9.1f}{rate / 1e12:>9.3f}"
                  f"{rate / peak:>9.1%}{ratio:>17.2f}x")
    print("\nofficial fp32 anchors (s):", OFFICIAL_SECONDS, "(train step quoted as 2.3-2.8 s; "
          "2.55 s used; measured on the reference machine, whose fp32 / bf16 matmul roofs were "
          "0.28-0.33 / 1.0-2.0 TFLOP/s)")


if __name__ == "__main__":
    main()
