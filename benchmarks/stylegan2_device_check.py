"""A short GPU check of the pure-PyTorch StyleGAN2 generator (needs only torch).

    python3 benchmarks/stylegan2_device_check.py

Loads plugins/stylegan/networks.py by path (so it runs where adaptkit's other
dependencies are missing, e.g. on a lent GPU machine) and checks, on CUDA:
CPU and GPU give the same images (float64), the effective-kernel probe that keeps
LoRA exact on modulated convolutions is exact, and the rosinality 256x256 generator
runs forward (fp32 and bf16 autocast) and backward. Prints the forward time.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent.parent / "plugins" / "stylegan" / "networks.py"


def main() -> None:
    spec = importlib.util.spec_from_file_location("stylegan2_nn", HERE)
    nn_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nn_module)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    torch.manual_seed(0)
    g = nn_module.Generator(32, 64, 4, {4: 64, 8: 64, 16: 32, 32: 32}, 3).double()
    w = g.mapping(torch.randn(4, 64, dtype=torch.float64))
    cpu = g.synthesis(w, "const")
    gpu = g.cuda().synthesis(w.cuda(), "const").cpu()
    print(f"32x32 generator, float64: max |CPU - CUDA| = {(cpu - gpu).abs().max().item():.2e}")

    conv = nn_module.ModulatedConv2d(16, 8, 3, 4).cuda()
    delta = torch.randn_like(conv.weight)
    conv.register_forward_hook(lambda module, args, out: out + F.conv2d(args[0], delta, padding=1))
    print(f"effective-kernel probe on CUDA: max error {(conv.effective_weight() - conv.weight - delta).abs().max().item():.2e}")

    big = nn_module.Generator(256, 512, 8, nn_module.default_channels(2), 3).cuda()
    z = torch.randn(8, 512, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(3):
                big([z])
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                image, _ = big([z])
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 100
        print(f"256x256 generator, batch 8, {str(dtype)[6:]}: {ms:.1f} ms per forward, finite: {torch.isfinite(image).all().item()}")
    image, _ = big([z])
    image.mean().backward()
    print(f"backward reaches the first conv: {big.conv1.conv.weight.grad.abs().sum().item() > 0}")


if __name__ == "__main__":
    main()
