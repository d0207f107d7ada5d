"""Time the model fingerprint's weight checksum (kvtier.hf.models) on model-shaped tensors.

Random bf16 tensors of a Llama-3-8B (or SmolLM2-135M) layout, on the GPU when there is one;
best of a few runs after one warm-up, and whether one ulp in one element changes the digest.
Also times `_tripwire`, the sample every lookup of the cached fingerprint reads.
Writes JSON and prints a table.

  python scripts/bench_fingerprint.py --shape 8b --out bench-out
  python scripts/bench_fingerprint.py --shape 135m --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvtier.hf.models import _tripwire, _weights_digest

# name: (vocab, hidden, kv width, intermediate, layers)
SHAPES = {"8b": (128256, 4096, 1024, 14336, 32), "135m": (49152, 576, 192, 1536, 30)}


def model_tensors(shape: str, device: str) -> list[tuple[str, torch.Tensor]]:
    vocab, hidden, kv, inter, layers = SHAPES[shape]
    shapes = [("embed", (vocab, hidden))]
    for layer in range(layers):
        shapes += [(f"{layer}.{n}", s) for n, s in [("q", (hidden, hidden)), ("k", (kv, hidden))]]
        shapes += [(f"{layer}.v", (kv, hidden)), (f"{layer}.o", (hidden, hidden))]
        shapes += [(f"{layer}.gate", (inter, hidden)), (f"{layer}.up", (inter, hidden))]
        shapes += [(f"{layer}.down", (hidden, inter)), (f"{layer}.norm", (hidden,))]
    shapes += [("norm", (hidden,)), ("lm_head", (vocab, hidden))]
    generator = torch.Generator(device=device).manual_seed(0)
    return [
        (name, torch.randn(size, device=device, dtype=torch.bfloat16, generator=generator))
        for name, size in shapes
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    tensors = model_tensors(args.shape, args.device)
    params = sum(t.numel() for _, t in tensors)
    digest = _weights_digest(tensors)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _weights_digest(tensors)  # ends in .cpu() copies: the device work is done
        seconds.append(time.perf_counter() - start)
    _tripwire(tensors)  # warm-up
    tripwire = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _tripwire(tensors)  # ends in .cpu() copies too
        tripwire.append(time.perf_counter() - start)
    flat = tensors[len(tensors) // 2][1].view(-1)
    flat[12345] = torch.nextafter(flat[12345], flat[12345] + 1)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {
        "shape": args.shape,
        "device": name,
        "params": params,
        "best_s": min(seconds),
        "runs_s": seconds,
        "one_ulp_changes_digest": _weights_digest(tensors) != digest,
        "tripwire_best_s": min(tripwire),
        "tripwire_runs_s": tripwire,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fingerprint_{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'shape':<6} {'device':<16} {'params':>8} {'best s':>8}  ulp seen  tripwire ms")
    print(
        f"{args.shape:<6} {name:<16} {params / 1e9:7.2f}B {min(seconds):8.3f}  "
        f"{result['one_ulp_changes_digest']!s:<8}  {min(tripwire) * 1e3:.2f}"
    )


if __name__ == "__main__":
    main()
