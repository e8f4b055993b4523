"""Camera alarms by simulation: the run between false alarms the test really gives, and how
many frames it takes to alarm a camera that changed.

    python benchmarks/alarms.py [--frames 2000000] [--model BUNDLE] [--out benchmarks/results/alarms.json]

Healthy streams are bootstrapped from held-out reference scores: a bundle's calibration scores
are split in two halves, one serving as the calibration set, the other resampled as healthy
frames (so the p-values carry the error of a finite calibration set, as a real camera's do).
Without --model, normal scores stand in (a calibration set of 1,000). The expected run between
false alarms (ERT) is measured at targets a simulation can reach (10^3 to 10^5 frames;
the default of `run`, 6.3 x 10^7 frames, is beyond any simulation, which is why the threshold
comes from Lorden's bound, checked here at smaller targets), for healthy frames as calibrated
and for healthy frames flagged 1.4 times as often as the alarm rate says (the demo's). Delays:
streams whose scores are shifted by d standard deviations of the healthy ones, at the default
threshold, 1,000 runs each; their frame AUROC measured against the healthy scores (Phi(d / sqrt
2) for normal scores; a bundle's real scores are skewed, so the same d separates them less).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdns_monitor.scoring import p_values  # noqa: E402
from sdns_monitor.sequential import DEFAULT_MARGIN, evidence, run_lengths, threshold  # noqa: E402

DEFAULT_ERT = 63_115_200.0
SHIFTS = (1.0, 1.5, 2.0, 2.33, 3.0)


def _healthy_sources(model: Path | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(calibration scores, held-out healthy scores to resample)."""
    if model is None:
        return np.sort(rng.normal(size=1000)), rng.normal(size=100_000)
    from sdns_monitor.bundle import load_bundle

    scores = rng.permutation(load_bundle(model).calibration)
    half = len(scores) // 2
    return np.sort(scores[:half]), scores[half:]


def _flag_rate_shift(calibration: np.ndarray, held: np.ndarray, factor: float) -> float:
    """How far to shift healthy scores for them to be flagged `factor` times as often at 1%."""
    spread = float(np.std(held))
    base = float(np.mean(p_values(held, calibration) < 0.01))
    low, high = 0.0, spread
    for _ in range(40):
        mid = (low + high) / 2
        rate = float(np.mean(p_values(held + mid, calibration) < 0.01))
        low, high = (mid, high) if rate < base * factor else (low, mid)
    return (low + high) / 2


def measure_ert(
    calibration: np.ndarray, held: np.ndarray, n: int, shift: float, rng: np.random.Generator
) -> dict[str, float]:
    frames = rng.choice(held, size=n, replace=True) + shift
    p = p_values(frames, calibration)
    e = evidence(p, DEFAULT_MARGIN)
    out: dict[str, float] = {"flag_rate_at_0.01": float(np.mean(p < 0.01))}
    for target in (1e3, 1e4, 1e5):
        alarms = run_lengths(e, threshold(target))
        out[f"ert_measured_at_{target:.0e}"] = n / len(alarms) if alarms else float("inf")
        out[f"alarms_at_{target:.0e}"] = len(alarms)
    return out


def _auroc(healthy: np.ndarray, changed: np.ndarray) -> float:
    """P(a changed frame scores above a healthy one), ties counted half: the frame AUROC of the
    shift, measured (for normal scores Phi(d / sqrt 2); real scores are skewed)."""
    ordered = np.sort(healthy)
    below = np.searchsorted(ordered, changed, side="left")
    ties = np.searchsorted(ordered, changed, side="right") - below
    return float(np.mean(below + 0.5 * ties) / len(ordered))


def measure_delays(
    calibration: np.ndarray, held: np.ndarray, runs: int, rng: np.random.Generator
) -> list[dict[str, float]]:
    h = threshold(DEFAULT_ERT)
    spread = float(np.std(held))
    rows = []
    for d in SHIFTS:
        delays = []
        for _ in range(runs):
            frames = rng.choice(held, size=400) + d * spread
            e = evidence(p_values(frames, calibration), DEFAULT_MARGIN)
            s, at = 0.0, 401
            for i, x in enumerate(e):
                s = max(0.0, s + float(x))
                if s > h:
                    at = i + 1
                    break
            delays.append(at)
        auroc = _auroc(held, held + d * spread)
        rows.append(
            {
                "shift_sd": d,
                "frame_auroc": round(auroc, 3),
                "median_delay": float(np.median(delays)),
                "p90_delay": float(np.percentile(delays, 90)),
                "missed_in_400": float(np.mean(np.array(delays) > 400)),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2_000_000, help="healthy frames per ERT run")
    ap.add_argument("--runs", type=int, default=1000, help="changed streams per shift")
    ap.add_argument("--model", type=Path, default=None, help="bootstrap from this bundle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/alarms.json")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    calibration, held = _healthy_sources(args.model, rng)
    worse = _flag_rate_shift(calibration, held, 1.4)
    ert = {
        "as calibrated": measure_ert(calibration, held, args.frames, 0.0, rng),
        "flagged 1.4x as often": measure_ert(calibration, held, args.frames, worse, rng),
    }
    delays = measure_delays(calibration, held, args.runs, rng)
    result = {
        "source": str(args.model) if args.model else "normal scores",
        "calibration_n": len(calibration),
        "margin": DEFAULT_MARGIN,
        "default_threshold": threshold(DEFAULT_ERT),
        "healthy_frames": args.frames,
        "ert": ert,
        "delays_at_default_threshold": delays,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"healthy streams: {result['source']}, calibration n = {len(calibration)}")
    print("| healthy frames | flag rate at 0.01 | ERT at target 1e3 | 1e4 | 1e5 |")
    print("|---|---|---|---|---|")
    for name, row in ert.items():
        cells = [
            f"{row[f'ert_measured_at_{t:.0e}']:.3g}"
            if row[f"alarms_at_{t:.0e}"]
            else f"> {args.frames:.0e} (no alarm)"
            for t in (1e3, 1e4, 1e5)
        ]
        print(f"| {name} | {row['flag_rate_at_0.01']:.4f} | " + " | ".join(cells) + " |")
    print(
        f"\ndelays at the default threshold h = {threshold(DEFAULT_ERT):.2f} (margin {DEFAULT_MARGIN})"
    )
    print("| shift (sd) | frame AUROC | median frames | 90% within | missed in 400 |")
    print("|---|---|---|---|---|")
    for row in delays:
        print(
            f"| {row['shift_sd']} | {row['frame_auroc']} | {row['median_delay']:.0f} | "
            f"{row['p90_delay']:.0f} | {row['missed_in_400']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
