"""An `eval --report DIR` read back for the page (`--eval`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdns_monitor.detector import Detector
from sdns_monitor.errors import DataError


@dataclass(frozen=True)
class EvalReport:
    """What an `eval --report DIR` holds: one record per OOD set (eval_bundle.read_eval_report)
    and the score histograms eval drew, as PNG bytes."""

    records: list[dict[str, Any]]
    histograms: list[bytes]


def read_eval(eval_dir: Path, det: Detector) -> EvalReport:
    """The eval report in `eval_dir`; DataError unless it was made with `det`'s bundle."""
    from sdns_monitor.eval_bundle import read_eval_report

    records = read_eval_report(eval_dir)
    made_by = records[0].get("model", {})
    if made_by.get("hash") != det.hash:
        raise DataError(
            f"--eval {eval_dir} was made with bundle {made_by.get('name')} "
            f"({str(made_by.get('hash'))[:12]}), not {det.name} ({det.hash[:12]}); "
            "evaluate this bundle or pass its own --model"
        )
    names = [str(r.get("histogram", "")) for r in records]
    files = [Path(eval_dir) / n for n in names if n and Path(n).name == n]
    return EvalReport(records, [f.read_bytes() for f in files if f.is_file()])
