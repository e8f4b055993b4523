"""An image-ingestion HTTP service that keeps out-of-distribution uploads out of a data set.

It embeds `sdns_monitor.Detector` in-process (no Kafka): every upload is decoded by the same
decoder `sdns-monitor run` uses, scored, and then

- `--mode reject` (default): stored if it looks like the model's reference data, refused with
  HTTP 422 and its score and p-value if not;
- `--mode tag`: always stored, with a sidecar `NAME.json` holding the verdict.

Stored images land in `--store` under the SHA-256 of their bytes (uploading twice stores once),
as the uploaded PNG, JPEG or WebP bytes (other inputs are stored as PNG), so the folder is a data
set for the rest of the tool: `sdns-monitor score --model M folder:STORE`, `calibrate`, `fit`.

    python examples/ingest_service.py --model models/cam1.sdns --store data/accepted --port 8080
    curl -H 'content-type: image/png' --data-binary @frame.png http://127.0.0.1:8080/upload

Endpoints:
    POST /upload   body = image bytes (JPEG, PNG, WebP, GIF or .npy), optional content-type.
                   201 stored: {"accepted": true, "stored": NAME, "score", "p_value", "flagged"}
                   422 refused as out-of-distribution: {"accepted": false, "score", "p_value",
                   "alarm_rate"}; 400 not an image: {"error": ONE-LINE REASON};
                   413 larger than --max-bytes.
    GET /healthz   200 {"status": "ok", "model": NAME, "hash": BUNDLE HASH}
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdns_monitor.detector import Detector, check_rule
from sdns_monitor.errors import FrameError, SdnsError
from sdns_monitor.frames import decode_bytes


class Ingest:
    """Decides on uploads and stores them. Thread-safe: the detector runs under a lock (one model,
    one batch at a time; decoding and file I/O run outside it)."""

    def __init__(
        self, detector: Detector, store: Path, mode: str, alarm_rate: float | None = None
    ) -> None:
        if mode not in ("reject", "tag"):
            raise ValueError(f"mode must be reject or tag, got {mode!r}")
        self.detector, self.store, self.mode = detector, store, mode
        self.alarm_rate = detector.alarm_rate if alarm_rate is None else alarm_rate
        self._lock = threading.Lock()
        store.mkdir(parents=True, exist_ok=True)

    def upload(self, data: bytes, content_type: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one upload."""
        try:
            frames = decode_bytes(data, content_type)
        except FrameError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        if len(frames) != 1:
            return HTTPStatus.BAD_REQUEST, {
                "error": f"the upload holds {len(frames)} frames; send one image per request"
            }
        with self._lock:
            result = self.detector.score(frames, alarm_rate=self.alarm_rate)
        verdict = {
            "score": float(result.scores[0]),
            "p_value": float(result.p_values[0]),
            "flagged": bool(result.flags[0]),
            "alarm_rate": self.alarm_rate,
        }
        if verdict["flagged"] and self.mode == "reject":
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"accepted": False, **verdict}
        name = self._save(data, frames[0])
        if self.mode == "tag":
            sidecar = {
                **verdict,
                "content_type": content_type,
                "model": {"name": self.detector.name, "hash": self.detector.hash},
                "received_at_ms": int(time.time() * 1000),
            }
            _write_atomic(self.store / f"{Path(name).stem}.json", json.dumps(sidecar).encode())
        return HTTPStatus.CREATED, {"accepted": True, "stored": name, **verdict}

    def _save(self, data: bytes, frame: np.ndarray) -> str:
        digest = hashlib.sha256(data).hexdigest()[:32]
        suffix = _folder_suffix(data)
        if suffix is None:  # GIF or .npy, which `folder:` specs do not read: store as PNG
            suffix, data = ".png", _png(frame)
        name = digest + suffix
        if not (self.store / name).exists():
            _write_atomic(self.store / name, data)
        return name


def _folder_suffix(data: bytes) -> str | None:
    """The file suffix of PNG, JPEG and WebP bytes (what `folder:` specs read), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(buf, format="PNG")
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file, so a reader of the store never sees half a file."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def make_server(ingest: Ingest, host: str, port: int, max_bytes: int) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for `ingest`; port 0 picks a free port."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "sdns-ingest/1"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                det = ingest.detector
                self._reply(HTTPStatus.OK, {"status": "ok", "model": det.name, "hash": det.hash})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such page {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/upload":
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"POST to /upload, not {self.path}"})
                return
            length = self.headers.get("content-length")
            if length is None or not length.isdigit():
                self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "send a content-length"})
                return
            if int(length) > max_bytes:
                self.close_connection = True  # the unread body must not be taken as a request
                self._reply(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"upload of {length} bytes exceeds {max_bytes}"},
                )
                return
            data = self.rfile.read(int(length))
            status, body = ingest.upload(data, self.headers.get("content-type"))
            self._reply(status, body)

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model bundle (NAME.sdns)")
    parser.add_argument("--store", required=True, type=Path, help="folder of accepted images")
    parser.add_argument("--mode", choices=("reject", "tag"), default="reject")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--alarm-rate", type=float, help="default: the bundle's")
    parser.add_argument("--max-bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        check_rule(args.alarm_rate, None)
        detector = Detector.load(args.model, device=args.device)
        ingest = Ingest(detector, args.store, args.mode, args.alarm_rate)
        server = make_server(ingest, args.host, args.port, args.max_bytes)
    except (SdnsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"listening on http://{args.host}:{server.server_port} (model {detector.name}, mode {args.mode}, "
        f"alarm rate {ingest.alarm_rate:g}, store {args.store})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
