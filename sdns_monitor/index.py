"""The reference bank: L2-normalised features searched by inner product.

The index type is a FAISS factory string stored in the manifest ("Flat" = exact; "IVF...",
"HNSW..." for large banks), built with the inner-product metric and searched with NPROBE
inverted lists / an HNSW candidate list of EF_SEARCH. k = None means all
references (exact, by matrix products in chunks; no index needed).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from sdns_monitor.errors import ConfigError
from sdns_monitor.scoring import kernel_score


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
            self._faiss = index
        return self._faiss

    def search(self, queries: torch.Tensor, k: int | None) -> torch.Tensor:
        """Similarities of each query to its k nearest references (M x k), or to all (M x N)
        when k is None or at least N. Callers chunk the queries (see `anomaly_scores`)."""
        if k is None or k >= len(self):
            return queries.detach().float().to(self.device) @ self._bank.T
        return self.neighbours(queries, k)[0]

    def neighbours(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray]:
        """Similarities (M x k) and reference ids (M x k, -1 where fewer than k were found)
        of each query's k nearest references, through the FAISS index."""
        q = queries.detach().float().cpu().contiguous().numpy()
        sims, ids = self._faiss_index().search(q, k)
        # FAISS pads with -inf-like values when fewer than k are found (IVF); drop them.
        sims_t = torch.from_numpy(sims)
        return torch.where(sims_t < -1e30, torch.full_like(sims_t, -1e4), sims_t), ids


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
        a = anomaly_scores(idx, id_feats, k, temperature)
        b = anomaly_scores(idx, ood_feats, k, temperature)
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


def _search_effort(index: Any) -> None:
    import faiss

    params = faiss.ParameterSpace()
    for setting in (f"nprobe={NPROBE}", f"efSearch={EF_SEARCH}"):
        with contextlib.suppress(RuntimeError):  # an index without that parameter (Flat)
            params.set_index_parameters(index, setting)  # type: ignore[arg-type]


def anomaly_scores(
    index: ReferenceIndex,
    features: torch.Tensor,
    k: int | None,
    temperature: float,
    chunk: int = 1024,
) -> np.ndarray:
    """a(z) for each row of `features` (unit norm), searching in chunks to bound memory."""
    out = [
        kernel_score(index.search(features[i : i + chunk], k), len(index), temperature).cpu()
        for i in range(0, features.shape[0], chunk)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)
