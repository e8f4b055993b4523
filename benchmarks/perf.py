"""Speed and memory of scoring and of `run`, each figure a ratio measured side by side in one
run or an absolute figure labelled with the machine it came from.

1. Scorer images/s against the limit its parts set when measured alone at the same batch size:
   1 / (1/encoder + 1/index search + 1/preprocess)  -> `scorer_vs_parts_ratio` (target >= 0.9).
2. `run` frames/s end to end from Kafka (consume, decode, score, produce, commit; a separate
   process, timed by the broker's own record timestamps) against its slowest stage measured
   alone: the scorer, and consume-plus-decode of the same topic  -> `run_vs_slowest_stage_ratio`
   (target >= 0.8).
3. k-NN search on the model's own bank: FAISS against scikit-learn NearestNeighbors (what
   pytorch-ood uses) and numpy  -> `faiss_vs_sklearn_speedup`.
4. Growth with the bank: 10k, 100k, 1M random unit features, Flat, IVF and HNSW: build and search
   time, index bytes, recall of the top 50 against Flat. Quality on the real bank: AUROC of
   IVF / HNSW search against exact search.
5. Latency per frame, p50 / p99, at a low and at a saturating input rate (broker timestamps:
   score record written minus frame produced).
6. Peak memory (VmHWM) of the `run` process.

    python benchmarks/perf.py [--model BUNDLE] [--out benchmarks/results/perf.json]

Without --model it fits the `quick` recipe on Fashion-MNIST first (about 1.5 minutes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdns_monitor.broker import Broker, start_broker
from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector
from sdns_monitor.evaluation import ood_metrics
from sdns_monitor.frames import decode_bytes
from sdns_monitor.index import ReferenceIndex

BATCH = 64


def best_rate(fn: Callable[[], Any], items: int, repeat: int = 5, min_s: float = 0.5) -> float:
    """Items per second of `fn` (the best of `repeat` timings of enough calls for `min_s`)."""
    fn()  # warm up
    best = 0.0
    for _ in range(repeat):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                break
        best = max(best, calls * items / elapsed)
    return best


# ---------------------------------------------------------------------------- 1. scorer
def scorer_vs_parts(det: Detector, frames: np.ndarray) -> dict[str, float]:
    batch = frames[:BATCH]
    prepared = det.prepare(batch)
    feats = det.features(prepared)

    def search() -> None:
        det.index.kernel_scores(feats, det.k, det.temperature)
        if det.lowlevel is not None:
            det.lowlevel.part_scores(prepared)

    parts = {
        "preprocess": best_rate(lambda: det.prepare(batch), BATCH),
        "encoder": best_rate(lambda: det.features(prepared), BATCH),
        "index_search": best_rate(search, BATCH),
    }
    limit = 1 / sum(1 / v for v in parts.values())
    scorer = best_rate(lambda: det.anomaly_scores(det.prepare(batch)), BATCH)
    return {
        **{f"{k}_images_per_s": v for k, v in parts.items()},
        "parts_limit_images_per_s": limit,
        "scorer_images_per_s": scorer,
        "scorer_vs_parts_ratio": scorer / limit,
    }


# ---------------------------------------------------------------------------- 2, 5, 6. run
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def _topics(broker: Broker, *names: str, partitions: int = 2) -> dict[str, str]:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    run_id = uuid.uuid4().hex[:8]
    out = {n: f"{n}-{run_id}" for n in names}
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    admin.create_topics([NewTopic(t, partitions, 1) for t in out.values()])
    admin.close()
    return out


def _produce(broker: Broker, topic: str, values: list[bytes], rate: float | None = None) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    t0 = time.perf_counter()
    for i, value in enumerate(values):
        if rate is not None:
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        producer.send(topic, key=b"cam%d" % (i % 4), value=value)
    producer.flush()
    producer.close()


def _read(broker: Broker, topic: str, n: int, timeout_ms: int = 60_000) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=timeout_ms,
    )
    out = []
    for m in consumer:
        out.append(m)
        if len(out) >= n:
            break
    consumer.close()
    return out


def consume_decode_rate(broker: Broker, topic: str, n: int, det: Detector) -> float:
    """Frames/s of a consumer that only reads and decodes (one thread), from the same topic."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=30_000,
    )
    seen, t0 = 0, None
    for m in consumer:
        if t0 is None:
            t0 = time.perf_counter()
        det.prepare(decode_bytes(m.value))
        seen += 1
        if seen >= n:
            break
    consumer.close()
    assert t0 is not None
    return (seen - 1) / (time.perf_counter() - t0)


def _start_run(broker: Broker, model: Path, names: dict[str, str], group: str) -> Any:
    env = {**os.environ, "SDNS_SESSION_TIMEOUT_MS": "6000", "SDNS_HEARTBEAT_INTERVAL_MS": "1000"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdns_monitor.cli",
            "run",
            "--topic",
            names["frames"],
            "--model",
            str(model),
            "--scores-topic",
            names["scores"],
            "--alert-topic",
            names["alerts"],
            "--bootstrap-servers",
            broker.bootstrap_servers,
            "--group-id",
            group,
            "--from-beginning",
            "--metrics-port",
            "off",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_end_to_end(
    broker: Broker, model: Path, det: Detector, frames: np.ndarray
) -> dict[str, Any]:
    values = [_png(f) for f in frames]
    n = len(values)
    names = _topics(broker, "frames", "scores", "alerts", "decode")
    _produce(broker, names["decode"], values)
    decode_rate = consume_decode_rate(broker, names["decode"], n, det)
    proc = _start_run(broker, model, names, f"g-{names['frames']}")
    try:
        _produce(broker, names["frames"], values[:1])  # warm-up: model loaded, group joined
        _read(broker, names["scores"], 1, timeout_ms=120_000)
        burst_ms = time.time() * 1000
        _produce(broker, names["frames"], values)  # saturating: as fast as the producer goes
        _read(broker, names["scores"], 1 + n, timeout_ms=120_000)
        quiet_ms = time.time() * 1000
        _produce(broker, names["frames"], values[:200], rate=20.0)  # a quiet stream
        # The scores topic has two partitions: phases are told apart by when frames were sent.
        records = _read(broker, names["scores"], 1 + n + 200)
        sent = np.array([json.loads(m.value)["source"]["timestamp_ms"] for m in records])
        written = np.array([m.timestamp for m in records])
        burst = (sent >= burst_ms) & (sent < quiet_ms)
        run_rate = (burst.sum() - 1) / max(
            (written[burst].max() - written[burst].min()) / 1000, 1e-9
        )
        saturated = (written - sent)[burst]
        quiet = (written - sent)[sent >= quiet_ms]
        peak = _peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {
        "frames": n,
        "run_frames_per_s": run_rate,
        "consume_decode_frames_per_s": decode_rate,
        "latency_ms_saturating": {
            "p50": float(np.percentile(saturated, 50)),
            "p99": float(np.percentile(saturated, 99)),
        },
        "latency_ms_20fps": {
            "p50": float(np.percentile(quiet, 50)),
            "p99": float(np.percentile(quiet, 99)),
            "frames": len(quiet),
        },
        "run_peak_rss_mb": peak,
    }


# ---------------------------------------------------------------------------- 3, 4. k-NN
def knn_libraries(bank: np.ndarray, queries: np.ndarray, k: int) -> dict[str, float]:
    from sklearn.neighbors import NearestNeighbors

    index = ReferenceIndex(bank)
    q = torch.from_numpy(queries)
    faiss_rate = best_rate(lambda: index.search(q, k), len(queries), repeat=3)
    nn = NearestNeighbors(n_neighbors=k).fit(bank)
    sklearn_rate = best_rate(lambda: nn.kneighbors(queries), len(queries), repeat=3)

    def numpy_topk() -> None:
        sims = queries @ bank.T
        np.partition(sims, -k, axis=1)[:, -k:]

    numpy_rate = best_rate(numpy_topk, len(queries), repeat=3)
    return {
        "faiss_queries_per_s": faiss_rate,
        "sklearn_queries_per_s": sklearn_rate,
        "numpy_queries_per_s": numpy_rate,
        "faiss_vs_sklearn_speedup": faiss_rate / sklearn_rate,
        "faiss_vs_numpy_speedup": faiss_rate / numpy_rate,
    }


def _factory(kind: str, n: int) -> str:
    if kind == "IVF":
        return f"IVF{max(16, min(4096, int(np.sqrt(n))))},Flat"
    return {"Flat": "Flat", "HNSW": "HNSW32"}[kind]


def bank_growth(sizes: list[int], dim: int, kinds: list[str], k: int = 50) -> list[dict[str, Any]]:
    """Random unit features (the worst case for approximate search: no clusters), indexed
    and searched as `ReferenceIndex` does it."""
    import faiss

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((500, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows = []
    for n in sizes:
        bank = rng.standard_normal((n, dim), dtype=np.float32)
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        exact = None
        for kind in kinds:
            factory = _factory(kind, n)
            index = ReferenceIndex(bank, factory)
            t0 = time.perf_counter()
            built = index._faiss_index()
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, ids = built.search(queries, k)
            search_s = time.perf_counter() - t0
            if kind == "Flat":
                exact = ids
            recall = None
            if exact is not None:
                recall = float(
                    np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact, strict=True)])
                )
            rows.append(
                {
                    "n": n,
                    "index": factory,
                    "build_s": build_s,
                    "search_queries_per_s": len(queries) / search_s,
                    "index_mb": faiss.serialize_index(built).nbytes / 2**20,
                    "recall_at_50": recall,
                }
            )
            print(
                f"  bank {n:>8} {factory:<14} build {build_s:7.2f} s  "
                f"{len(queries) / search_s:9.0f} q/s  recall {recall}",
                flush=True,
            )
            del index, built
    return rows


def approximate_quality(
    det: Detector, id_frames: np.ndarray, ood_frames: np.ndarray
) -> list[dict[str, Any]]:
    """AUROC of the SDNS score with approximate search on the model's bank, against exact."""
    bank = det.bundle.features
    id_feats, ood_feats = (
        det.features(det.prepare(id_frames)),
        det.features(det.prepare(ood_frames)),
    )
    out = []
    for kind in ("Flat", "IVF", "HNSW"):
        index = ReferenceIndex(bank, _factory(kind, len(bank)))
        a = index.kernel_scores(id_feats, det.k, det.temperature)
        b = index.kernel_scores(ood_feats, det.k, det.temperature)
        out.append({"index": _factory(kind, len(bank)), "auroc": ood_metrics(a, b).auroc})
    exact = out[0]["auroc"]
    for row in out:
        row["auroc_change"] = row["auroc"] - exact
    return out


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/perf.json"))
    ap.add_argument("--frames", type=int, default=4000, help="frames streamed through run")
    ap.add_argument("--bank-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = ap.parse_args()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sdns-perf-"))
    try:
        model, recipe = args.model, "given"
        if model is None:
            from trainer.config import make_config
            from trainer.fit import fit

            model, recipe = tmp / "quick.sdns", "quick"
            print("fitting the quick recipe on fashion-mnist:train", flush=True)
            fit(
                "fashion-mnist:train",
                model,
                make_config("quick"),
                device="cpu",
                log=lambda _m: None,
            )
        det = Detector.load(model, device="cpu")
        fashion = load_dataset("fashion-mnist:test", size=det.manifest.input.size).images
        mnist = load_dataset("mnist:test", size=det.manifest.input.size).images
        results: dict[str, Any] = {
            "model": {
                "name": det.name,
                "hash": det.hash,
                "recipe": recipe,
                "score": det.score_mode,
                "bank": len(det.index),
            },
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}, no GPU"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(),
            "batch_size": BATCH,
        }
        print("scorer vs its parts", flush=True)
        results["scorer"] = scorer_vs_parts(det, fashion)
        print("run end to end", flush=True)
        with start_broker(log=tmp / "tansu.log") as broker:
            e2e = run_end_to_end(broker, model, det, fashion[: args.frames])
        slowest = min(results["scorer"]["scorer_images_per_s"], e2e["consume_decode_frames_per_s"])
        e2e["slowest_stage_frames_per_s"] = slowest
        e2e["run_vs_slowest_stage_ratio"] = e2e["run_frames_per_s"] / slowest
        results["run"] = e2e
        print("k-NN libraries", flush=True)
        queries = det.features(det.prepare(fashion[:2000])).numpy()
        results["knn"] = knn_libraries(det.bundle.features, queries, det.k or 200)
        print("bank growth (random unit features)", flush=True)
        results["bank_growth"] = bank_growth(
            args.bank_sizes, det.bundle.features.shape[1], ["Flat", "IVF", "HNSW"]
        )
        results["approximate_search_quality"] = approximate_quality(
            det, fashion[:3000], mnist[:3000]
        )
        results["scorer_vs_parts_ratio"] = results["scorer"]["scorer_vs_parts_ratio"]
        results["run_vs_slowest_stage_ratio"] = e2e["run_vs_slowest_stage_ratio"]
        results["faiss_vs_sklearn_speedup"] = results["knn"]["faiss_vs_sklearn_speedup"]
        results["wall_seconds"] = time.perf_counter() - started
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict[str, Any]) -> str:
    s, e, k = r["scorer"], r["run"], r["knn"]
    lines = [
        f"model {r['model']['name']} ({r['model']['recipe']}, score {r['model']['score']}, "
        f"bank {r['model']['bank']}); {r['machine']}; batch {r['batch_size']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| preprocess / encoder / index search alone (images/s) | {s['preprocess_images_per_s']:.0f} / "
        f"{s['encoder_images_per_s']:.0f} / {s['index_search_images_per_s']:.0f} |",
        f"| limit of the parts / scorer (images/s) | {s['parts_limit_images_per_s']:.0f} / "
        f"{s['scorer_images_per_s']:.0f} |",
        f"| **scorer vs parts** (target >= 0.9) | **{r['scorer_vs_parts_ratio']:.2f}** |",
        f"| run end to end / consume+decode alone (frames/s) | {e['run_frames_per_s']:.0f} / "
        f"{e['consume_decode_frames_per_s']:.0f} |",
        f"| **run vs slowest stage** (target >= 0.8) | **{r['run_vs_slowest_stage_ratio']:.2f}** |",
        f"| latency p50 / p99 at 20 frames/s (ms) | {e['latency_ms_20fps']['p50']:.0f} / "
        f"{e['latency_ms_20fps']['p99']:.0f} |",
        f"| latency p50 / p99 saturated (ms) | {e['latency_ms_saturating']['p50']:.0f} / "
        f"{e['latency_ms_saturating']['p99']:.0f} |",
        f"| peak RSS of run (MB) | {e['run_peak_rss_mb']:.0f} |",
        f"| k-NN queries/s: FAISS / scikit-learn / numpy | {k['faiss_queries_per_s']:.0f} / "
        f"{k['sklearn_queries_per_s']:.0f} / {k['numpy_queries_per_s']:.0f} |",
        f"| **FAISS vs scikit-learn** | **{r['faiss_vs_sklearn_speedup']:.1f}x** |",
        "",
        "| bank | index | build (s) | queries/s | MB | recall@50 |",
        "|---|---|---|---|---|---|",
    ]
    for g in r["bank_growth"]:
        recall = "" if g["recall_at_50"] is None else f"{g['recall_at_50']:.3f}"
        lines.append(
            f"| {g['n']} | {g['index']} | {g['build_s']:.2f} | "
            f"{g['search_queries_per_s']:.0f} | {g['index_mb']:.0f} | {recall} |"
        )
    lines += [
        "",
        "| index on the model's bank | AUROC F-MNIST -> MNIST | change vs exact |",
        "|---|---|---|",
    ]
    for q in r["approximate_search_quality"]:
        lines.append(f"| {q['index']} | {q['auroc']:.4f} | {q['auroc_change']:+.4f} |")
    lines.append(f"\nwall time {r['wall_seconds'] / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
