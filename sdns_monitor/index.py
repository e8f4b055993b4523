"""The reference bank: L2-normalised features searched by inner product.

The index type is a FAISS factory string stored in the manifest ("Flat" = exact; "IVF...",
"HNSW..." for large banks), built with the inner-product metric and searched with NPROBE
inverted lists / an HNSW candidate list of EF_SEARCH. k = None means all
references (exact, by matrix products in chunks; no index needed). On a GPU, "Flat" top-k
search is a torch matrix product + top-k on the device, and other index types move to the GPU
when faiss-gpu (the `gpu` extra) is installed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch

from sdns_monitor.errors import ConfigError
from sdns_monitor.scoring import kernel_score

log = logging.getLogger(__name__)


class ReferenceIndex:
    """Nearest-neighbour search over reference features (N x D, float32, unit norm)."""

    def __init__(
        self, features: np.ndarray, factory: str = "Flat", device: torch.device | None = None
    ):
        if features.ndim != 2 or features.dtype != np.float32:
            raise ValueError("reference features must be a float32 N x D array")
        self.features = np.ascontiguousarray(features)
        self.factory = factory
        self.device = device or torch.device("cpu")
        self._bank = torch.from_numpy(self.features).to(self.device)
        self._faiss: Any = None
        self._gpu_resources: Any = None  # kept alive as long as a GPU index uses them

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())
            try:
                index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as exc:
                raise ConfigError(f"invalid FAISS index factory {self.factory!r}: {exc}") from None
            if not index.is_trained:
                index.train(self.features)
            index.add(self.features)
            _search_effort(index)
            self._faiss, self._gpu_resources = _to_gpu(index, self.device)
        return self._faiss

    def prepare(self, k: int | None) -> ReferenceIndex:
        """Build whatever searches for `k` neighbours will use now, so that an invalid factory
        or a FAISS failure is an error when the bundle loads, not at the first frame."""
        exact = k is None or k >= len(self)
        on_device = self.factory == "Flat" and self.device.type != "cpu"
        if not exact and not on_device:
            self._faiss_index()
        return self

    def search(self, queries: torch.Tensor, k: int | None) -> torch.Tensor:
        """Similarities of each query to its k nearest references (M x k), or to all (M x N)
        when k is None or at least N. Callers chunk the queries (see `kernel_scores`)."""
        if k is None or k >= len(self):
            return queries.detach().float().to(self.device) @ self._bank.T
        if self.factory == "Flat" and self.device.type != "cpu":
            # Exact search on the accelerator as a matrix product + top-k: the features stay
            # on the device (no FAISS, no host copies); FAISS's CPU index is faster on CPUs.
            return exact_topk(queries.detach().float().to(self.device), self._bank, k)
        return self.neighbours(queries, k)[0]

    def kernel_scores(
        self, features: torch.Tensor, k: int | None, temperature: float, chunk: int = 1024
    ) -> np.ndarray:
        """The kernel score a(z) (`scoring.kernel_score`) of each row of `features` (unit
        norm) among this bank, searching in chunks to bound memory."""
        out = [
            kernel_score(self.search(features[i : i + chunk], k), len(self), temperature).cpu()
            for i in range(0, features.shape[0], chunk)
        ]
        return torch.cat(out).numpy() if out else np.zeros(0)

    def neighbours(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray]:
        """Similarities (M x k) and reference ids (M x k, -1 where fewer than k were found)
        of each query's k nearest references, through the FAISS index."""
        q = queries.detach().float().cpu().contiguous().numpy()
        sims, ids = self._faiss_index().search(q, k)
        # FAISS pads with -inf-like values when fewer than k are found (IVF); drop them.
        sims_t = torch.from_numpy(sims)
        return torch.where(sims_t < -1e30, torch.full_like(sims_t, -1e4), sims_t), ids


def check_factory(factory: str, dim: int = 64) -> None:
    """Refuse a FAISS factory string FAISS cannot build, before anything is trained on it."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
        first = text.rsplit(": ", 1)[-1]  # FAISS prefixes the C++ function and source line
        raise ConfigError(
            f"invalid FAISS index factory {factory!r} ({first}); use Flat, IVF<n>,Flat or HNSW<m>"
        ) from None


def exact_topk(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Similarities of each query to its k nearest rows of `bank` (M x k, descending), on
    whatever device both live: the GPU path of `ReferenceIndex.search` for "Flat"."""
    return (queries @ bank.T).topk(k, dim=1).values


def approximation_quality(
    index: ReferenceIndex,
    id_feats: torch.Tensor,
    ood_feats: torch.Tensor,
    k: int | None,
    temperature: float,
) -> dict[str, float]:
    """How an approximate index compares with exact search on the same bank: recall of the
    top-k neighbours of the in-distribution queries, and the AUROC (in- vs out-of-distribution
    queries) of the kernel score with either search."""
    from sdns_monitor.evaluation import ood_metrics

    exact = ReferenceIndex(index.features, "Flat", index.device)
    kk = min(k or 200, len(index))
    approx_ids = index.neighbours(id_feats, kk)[1]
    exact_ids = exact.neighbours(id_feats, kk)[1]
    recall = float(
        np.mean([len(set(a) & set(b)) / kk for a, b in zip(approx_ids, exact_ids, strict=True)])
    )
    auroc = {}
    for name, idx in (("approximate", index), ("exact", exact)):
        a = idx.kernel_scores(id_feats, k, temperature)
        b = idx.kernel_scores(ood_feats, k, temperature)
        auroc[name] = ood_metrics(a, b).auroc
    return {
        f"recall_at_{kk}": recall,
        "auroc_exact": auroc["exact"],
        "auroc_approximate": auroc["approximate"],
        "auroc_change": auroc["approximate"] - auroc["exact"],
    }


# Approximate indexes search this hard by default (FAISS's own defaults, nprobe 1 and efSearch
# 16, lose most neighbours in a few hundred dimensions): the inverted lists probed, at most
# all of them, and the HNSW candidate list.
NPROBE = 64
EF_SEARCH = 256


def _to_gpu(index: Any, device: torch.device) -> tuple[Any, Any]:
    """(index, GPU resources): the index on the GPU of `device` when FAISS has GPU support
    (the `gpu` extra, faiss-gpu) and the index type runs there (Flat, IVF); else the CPU index
    as it is, and None."""
    import faiss

    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return index, None
    if faiss.get_num_gpus() == 0:
        return index, None
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, device.index or 0, index), resources
    except (RuntimeError, AttributeError) as exc:  # e.g. HNSW has no GPU implementation
        log.info("FAISS index stays on the CPU: %s", str(exc).splitlines()[0])
        return index, None


def _search_effort(index: Any) -> None:
    import faiss

    params = faiss.ParameterSpace()
    for setting in (f"nprobe={NPROBE}", f"efSearch={EF_SEARCH}"):
        with contextlib.suppress(RuntimeError):  # an index without that parameter (Flat)
            params.set_index_parameters(index, setting)  # type: ignore[arg-type]
