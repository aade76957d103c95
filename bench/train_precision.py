"""Benchmark: training and inference speed of the default backbone in fp32 and in bf16 autocast on this CPU.

Why `training_precision()` (finetune/precision.py) trains small images in fp32 on CPUs without AMX while
evaluation stays in bf16: one update (forward + backward + AdamW, the trainer's frozen BatchNorm
statistics, channels_last) and one inference forward are timed in each precision, at several sizes, with
the whole backbone trained or its first half frozen. Random pixels and labels: only the speed is measured.
Run it alone on the machine.

    python bench/train_precision.py [--sizes 32,64,96,128,224] [--batch 32]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import timm
import torch


def _model(frozen_half: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).to(memory_format=torch.channels_last)
    if frozen_half:
        for block in [model.conv_stem, model.bn1, *model.blocks[: len(model.blocks) // 2]]:
            block.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-4)


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_images_per_s(size: int, batch: int, bf16: bool, frozen_half: bool, seconds: float = 6.0) -> float:
    model, optimizer = _model(frozen_half)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()  # the trainer's default: pretrained statistics kept
    inputs = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (batch,))

    def step() -> None:
        with _autocast(bf16):
            loss = torch.nn.functional.cross_entropy(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - started)


@torch.inference_mode()
def inference_ms_per_image(size: int, batch: int, bf16: bool, seconds: float = 4.0) -> float:
    model, _ = _model(frozen_half=False)
    model.eval()
    inputs = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with _autocast(bf16):
        model(inputs)
        passes, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(inputs)
            passes += 1
    return (time.perf_counter() - started) / (passes * batch) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,96,128,224")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AMX {torch.cpu._is_amx_tile_supported()}")  # fmt: skip
    print("| size | trained | fp32 img/s | bf16 img/s | fp32 / bf16 |")
    print("| --- | --- | --- | --- | --- |")
    sizes = [int(size) for size in args.sizes.split(",")]
    for frozen_half in (False, True):
        for size in sizes:
            fp32 = train_images_per_s(size, args.batch, bf16=False, frozen_half=frozen_half)
            bf16 = train_images_per_s(size, args.batch, bf16=True, frozen_half=frozen_half)
            trained = "second half" if frozen_half else "whole backbone"
            print(f"| {size} | {trained} | {fp32:.0f} | {bf16:.0f} | {fp32 / bf16:.2f}x |", flush=True)
    print("\n| size | inference fp32 ms/img | bf16 ms/img | fp32 / bf16 time |")
    print("| --- | --- | --- | --- |")
    for size in sizes:
        fp32 = inference_ms_per_image(size, 64, bf16=False)
        bf16 = inference_ms_per_image(size, 64, bf16=True)
        print(f"| {size} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
