"""GPU check: correctness and speed of the encoder paths and exact k-NN on one GPU, in one run.

Made for a GPU machine whose image has torch but neither faiss, TensorRT, kafka-python nor
pydantic (../shared/ENVIRONMENT.md): it imports torch alone, and loads this repository's
backbones from sdns_monitor/networks.py by path (with stand-ins for the two names that file
imports from pydantic and sdns_monitor.errors when those are not installed).

For cnn-small (28 px), resnet18-cifar (32 px) and vit-small/16 (224 px, the paper's encoder) at
several batch sizes: images/s of eager fp32, bf16 autocast, torch.compile and CUDA-graph replay,
each checked against eager fp32 (least cosine similarity of the features). Then exact k-NN as
a matrix product + top-k on the GPU against a float64 CPU reference. A table comes last.

    bash benchmarks/gpu_check.sh            # at most 6 minutes on one H200
    python benchmarks/gpu_check.py --cpu    # a smoke run of the same code on a CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 330.0  # leave time to print inside a 6-minute slot


def load_networks() -> types.ModuleType:
    """sdns_monitor/networks.py, without importing the package (it needs faiss, pydantic)."""
    if importlib.util.find_spec("pydantic") is None:
        stub = types.ModuleType("pydantic")

        class BaseModel:  # only what networks.py touches at import time
            pass

        stub.BaseModel = BaseModel  # type: ignore[attr-defined]
        stub.ConfigDict = dict  # type: ignore[attr-defined]
        stub.Field = lambda default=None, **_: default  # type: ignore[attr-defined]
        sys.modules["pydantic"] = stub
    if "sdns_monitor.errors" not in sys.modules:
        errors = types.ModuleType("sdns_monitor.errors")
        errors.ConfigError = ValueError  # type: ignore[attr-defined]
        sys.modules.setdefault("sdns_monitor", types.ModuleType("sdns_monitor"))
        sys.modules["sdns_monitor.errors"] = errors
    spec = importlib.util.spec_from_file_location(
        "_networks", ROOT / "sdns_monitor" / "networks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((F.normalize(a.float(), dim=1) * F.normalize(b.float(), dim=1)).sum(1).min())


def rate(fn: Callable[[], Any], n: int, sync: Callable[[], None], min_s: float = 0.3) -> float:
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        calls += 1
    sync()
    return calls * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU with small sizes")
    args = ap.parse_args()
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        sys.exit("no CUDA GPU visible; use --cpu for a smoke run")
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the reference
    bb = load_networks()
    models = {
        "cnn-small 28px": (bb.SmallCNN(1, 16), (1, 28), [1, 256, 4096]),
        "resnet18-cifar 32px": (bb.CifarResNet18(3), (3, 32), [1, 256, 2048]),
        "vit-small/16 224px": (
            bb.VisionTransformer(3, 224, 16, 384, 12, 6, 0.0),
            (3, 224),
            [1, 64, 256],
        ),
    }
    if args.cpu:
        models = {k: (m, s, [1, 8]) for k, (m, s, _) in list(models.items())[:2]}
    rows: list[tuple[str, int, str, float, float | None]] = []  # model, batch, path, img/s, cos
    notes: list[str] = []
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}",
        flush=True,
    )

    for name, (model, (c, s), batches) in models.items():
        model = model.to(dev).eval()
        for n in batches:
            if time.perf_counter() - started > DEADLINE_S:
                notes.append(f"skipped {name} batch {n}: time budget")
                continue
            x = torch.randn(n, c, s, s, device=dev)
            with torch.inference_mode():
                ref = model(x)
                rows.append((name, n, "eager fp32", rate(lambda m=model, x=x: m(x), n, sync), None))
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    bf = model(x)
                    r = rate(lambda m=model, x=x: m(x), n, sync)
                rows.append((name, n, "bf16 autocast", r, cosine(bf, ref)))
            if n > 1 and time.perf_counter() - started < DEADLINE_S - 60:
                t0 = time.perf_counter()
                compiled = torch.compile(model, dynamic=False)
                with torch.inference_mode():
                    out = compiled(x)
                    compile_s = time.perf_counter() - t0
                    r = rate(lambda m=compiled, x=x: m(x), n, sync)
                rows.append((name, n, f"compile ({compile_s:.0f} s to build)", r, cosine(out, ref)))
            if cuda and n > 1:
                static = x.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.inference_mode(), torch.cuda.stream(stream):
                    for _ in range(3):
                        model(static)  # warm-up on a side stream, as CUDA graphs require
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                bf16 = torch.autocast("cuda", dtype=torch.bfloat16)
                with torch.inference_mode(), torch.cuda.graph(graph), bf16:
                    graph_out = model(static)
                rows.append(
                    (
                        name,
                        n,
                        "CUDA graph bf16",
                        rate(graph.replay, n, sync),
                        cosine(graph_out, ref),
                    )
                )
            print(f"  {name} batch {n} done ({time.perf_counter() - started:.0f} s)", flush=True)

    # Exact k-NN: matrix product + top-k, against a float64 reference on the CPU.
    d, k = 384, 200
    bank_n = 1_000_000 if cuda else 20_000
    gen = torch.Generator(device="cpu").manual_seed(0)
    bank = F.normalize(torch.randn(bank_n, d, generator=gen), dim=1)
    queries = F.normalize(torch.randn(256, d, generator=gen), dim=1)
    knn: dict[str, Any] = {}
    for dtype in (torch.float32, torch.float16):
        b, q = bank.to(dev, dtype), queries.to(dev, dtype)

        def sims(q: torch.Tensor = q, b: torch.Tensor = b) -> Any:
            return torch.topk(q @ b.T, k, dim=1)

        top = sims()
        knn[str(dtype).removeprefix("torch.")] = (rate(sims, len(q), sync), top)
    ref_sims = torch.topk(queries.double() @ bank.double().T, k, dim=1)
    lines = []
    for dtype, (r, top) in knn.items():
        overlap = float(
            torch.tensor(
                [
                    len(set(a.tolist()) & set(bb_.tolist())) / k
                    for a, bb_ in zip(top.indices.cpu(), ref_sims.indices, strict=True)
                ]
            ).mean()
        )
        err = float((top.values.double().cpu() - ref_sims.values).abs().max())
        lines.append(
            f"| exact k-NN {dtype}, bank {bank_n:,} x {d}, top-{k} | {r:,.0f} queries/s | "
            f"top-k overlap {overlap:.4f}, max |sim error| {err:.1e} |"
        )

    print("\n| model | batch | path | images/s | cosine vs eager fp32 |")
    print("|---|---|---|---|---|")
    for name, n, path, r, cos in rows:
        print(f"| {name} | {n} | {path} | {r:,.0f} | {'' if cos is None else f'{cos:.5f}'} |")
    print("\n| search | speed | agreement with float64 CPU |\n|---|---|---|")
    print("\n".join(lines))
    for note in notes:
        print(note)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
