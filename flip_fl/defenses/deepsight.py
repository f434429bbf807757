"""DeepSight (Rieger et al., NDSS 2022): label suspicious updates, cluster them, drop suspicious clusters, clip.

The rule on n local models W_i = G + u_i (u_i: row i of the update matrix `U`, trained parameters only):

1. **NEUPs** (normalised energy updates) of the output layer: the energy of output neuron p is
   `e_p = |Δb_p| + Σ_k |ΔW_pk|`, and `NEUP_p = e_p² / Σ_q e_q²` (`neups`).
2. **Threshold exceedings**: `TE_i = #{p : NEUP_ip > ξ_i}` with `ξ_i = max(0.01, 1/P) · max_p NEUP_ip`
   (`threshold_exceedings`). A backdoor concentrates the output-layer energy on few labels, so poisoned
   models have few exceedings. **Classification boundary**: the median TE over the round, halved; a model
   with `TE_i <= median / 2` is labelled suspicious (`suspicious_labels`).
3. **DDifs** (division differences): for each of S seeds, N random inputs x ~ U[0, 1)^(image shape),
   `DDif_ip = (1/N) Σ_x softmax(W_i(x))_p / softmax(G(x))_p` (`division_differences`, torch).
4. **Clustering** (`ensemble_clusters`): HDBSCAN separately on the DDifs of each seed, on the NEUPs and on the
   cosine distances of the output layer's bias updates; each clustering becomes a 0/1 distance matrix
   (0: same cluster, `cluster_distances`); the S DDif matrices are averaged, that mean, the NEUP and the
   cosine matrix are averaged, and HDBSCAN on this merged distance gives the final clusters.
5. **Poisoned clusters** (`accepted_by_cluster`): a cluster is accepted when its share of suspicious models
   is below tau (1/3). HDBSCAN's noise points are clusters of their own: accepted unless suspicious.
6. **Clipping and averaging**: S_t = median of ||u_i|| over all n updates; each accepted update is scaled
   by min(1, S_t / ||u_i||); the aggregate is their plain mean. No accepted update: a zero update.

HDBSCAN (scikit-learn) runs on precomputed distances (Euclidean for DDifs and NEUPs) with
`min_cluster_size`, `min_samples = min_cluster_size` neighbours besides the point itself (the `hdbscan`
library's default; scikit-learn counts the point, hence +1) and `allow_single_cluster=True`, so a metric
on which every model looks alike puts them in one cluster instead of calling each one noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flip_fl.defenses.common import AggregationOutcome, as_updates, cosine_similarity, row_norms

THRESHOLD_FLOOR = 0.01
"""ξ = max(THRESHOLD_FLOOR, 1/P) · max NEUP: the paper's threshold factor."""
INPUT_ELEMENTS = 1 << 20
"""Random input values per forward pass of the DDifs (batches of INPUT_ELEMENTS // input size samples)."""
LOG_RATIO_BOUND = 50.0
"""|log(p_local / p_global)| is clamped here (ratios within e^±50), so a hostile model's DDifs stay finite."""


# --------------------------------------------------------------------------- the output layer


@dataclass(frozen=True)
class OutputLayer:
    """Where the output layer lies in the flat trained-parameter vector (`Defense` key order).

    Attributes:
        weight_key: state_dict key of its weight (P, ...).
        bias_key: key of its bias (P,), None when the layer has none.
        weight: slice of the weight in the flat vector.
        bias: slice of the bias, None without one.
        shape: the weight's shape; P = shape[0].
    """

    weight_key: str
    bias_key: str | None
    weight: slice
    bias: slice | None
    shape: tuple[int, ...]

    @property
    def num_outputs(self) -> int:
        """P, the number of output neurons (classes)."""
        return int(self.shape[0])

    def weights_of(self, U: np.ndarray) -> np.ndarray:
        """(n, P, fan-in) weight rows of each row of `U`."""
        return U[:, self.weight].reshape(U.shape[0], self.num_outputs, -1)

    def biases_of(self, U: np.ndarray) -> np.ndarray | None:
        """(n, P) biases of each row of `U`, None without a bias."""
        return None if self.bias is None else U[:, self.bias]


def output_layer(shapes: Mapping[str, Sequence[int]]) -> OutputLayer:
    """The last layer of trained parameters `shapes` (key -> shape, in flat order): `<layer>.weight`/`.bias`.

    Raises:
        ValueError: when the last entry's layer has no `weight` of at least one dimension.
    """
    offsets: dict[str, slice] = {}
    pos = 0
    for k, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        offsets[k] = slice(pos, pos + size)
        pos += size
    if not offsets:
        raise ValueError("the model has no trained parameters")
    layer = list(offsets)[-1].rsplit(".", 1)[0]
    weight_key, bias_key = f"{layer}.weight", f"{layer}.bias"
    if weight_key not in offsets or len(shapes[weight_key]) < 1:
        raise ValueError(f"DeepSight needs an output layer with a weight; the last trained entry is "
                         f"{list(offsets)[-1]!r}")
    shape = tuple(int(s) for s in shapes[weight_key])
    has_bias = bias_key in offsets and tuple(shapes[bias_key]) == (shape[0],)
    return OutputLayer(weight_key, bias_key if has_bias else None, offsets[weight_key],
                       offsets[bias_key] if has_bias else None, shape)


# --------------------------------------------------------------------------- labels


def neups(weights: np.ndarray, biases: np.ndarray | None) -> np.ndarray:
    """NEUPs (n, P) from output-layer weight updates (n, P, fan-in) and bias updates (n, P) or None.

    A model whose output layer did not change (all energies 0) gets the uniform 1/P.
    """
    energy = np.abs(weights).sum(axis=2)
    if biases is not None:
        energy = energy + np.abs(biases)
    squared = energy**2
    total = squared.sum(axis=1, keepdims=True)
    p = squared.shape[1]
    return np.where(total > 0, squared / np.where(total > 0, total, 1.0), 1.0 / p)


def threshold_exceedings(neup: np.ndarray) -> np.ndarray:
    """TE_i = #{p : NEUP_ip > max(0.01, 1/P) · max_p NEUP_ip}, (n,) ints."""
    factor = max(THRESHOLD_FLOOR, 1.0 / neup.shape[1])
    return np.sum(neup > factor * neup.max(axis=1, keepdims=True), axis=1)


def suspicious_labels(exceedings: np.ndarray) -> np.ndarray:
    """The paper's classification: suspicious when TE_i <= median(TE) / 2."""
    te = np.asarray(exceedings, dtype=np.float64)
    return te <= np.median(te) / 2.0


# --------------------------------------------------------------------------- clustering


def hdbscan_labels(distances: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """HDBSCAN labels (-1: noise) on a precomputed distance matrix (see the module docstring for the settings)."""
    from sklearn.cluster import HDBSCAN  # imported here: scikit-learn is slow to import

    n = distances.shape[0]
    if n < 2:
        return np.full(n, -1)
    dist = np.clip(0.5 * (distances + distances.T), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    kwargs: dict[str, Any] = dict(min_cluster_size=max(2, min(min_cluster_size, n)),
                                  min_samples=min(min_cluster_size + 1, n), metric="precomputed",
                                  allow_single_cluster=True)
    if "copy" in HDBSCAN().get_params():  # scikit-learn >= 1.5 warns unless it is explicit
        kwargs["copy"] = True
    return np.asarray(HDBSCAN(**kwargs).fit(dist).labels_, dtype=int)


def euclidean_distances(X: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances between rows, from each pair's differences."""
    diff = X[:, None, :] - X[None, :, :]
    return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))


def cosine_distances(X: np.ndarray) -> np.ndarray:
    """1 - cos between rows (a zero row is at distance 1 from every other row), zero diagonal."""
    dist = 1.0 - cosine_similarity(X)
    np.fill_diagonal(dist, 0.0)
    return dist


def cluster_distances(labels: np.ndarray) -> np.ndarray:
    """0 between two models of the same cluster, 1 otherwise; each noise point is a cluster of its own."""
    labels = np.asarray(labels)
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    dist = np.where(same, 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def ensemble_clusters(ddifs: np.ndarray, neup: np.ndarray, cosine: np.ndarray,
                      min_cluster_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The final clusters of DeepSight's ensemble clustering and the merged distance matrix.

    Args:
        ddifs: (S, n, P) DDifs of each seed.
        neup: (n, P) NEUPs.
        cosine: (n, n) cosine distances of the output layer's bias updates.
        min_cluster_size: HDBSCAN's minimum cluster size.

    Returns:
        (labels (n,), merged distances (n, n)).
    """
    ddif_dists = np.mean([cluster_distances(hdbscan_labels(euclidean_distances(d), min_cluster_size))
                          for d in ddifs], axis=0)
    neup_dists = cluster_distances(hdbscan_labels(euclidean_distances(neup), min_cluster_size))
    cosine_dists = cluster_distances(hdbscan_labels(cosine, min_cluster_size))
    merged = np.mean([ddif_dists, neup_dists, cosine_dists], axis=0)
    return hdbscan_labels(merged, min_cluster_size), merged


def accepted_by_cluster(labels: np.ndarray, suspicious: np.ndarray, tau: float) -> np.ndarray:
    """Models of clusters whose share of suspicious models is below `tau`; a noise point is its own cluster."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1]; got {tau}")
    labels = np.asarray(labels)
    suspicious = np.asarray(suspicious, dtype=bool)
    accepted = ~suspicious & (labels < 0)  # a singleton's share is 0 or 1, and 0 < tau <= 1
    for c in np.unique(labels[labels >= 0]):
        members = labels == c
        accepted[members] = float(suspicious[members].mean()) < tau
    return accepted


# --------------------------------------------------------------------------- the rule


def deepsight(U: Any, ddifs: np.ndarray, layer: OutputLayer, tau: float = 1 / 3,
              min_cluster_size: int = 2) -> AggregationOutcome:
    """DeepSight's aggregate of the updates `U` (n, d) given their DDifs (S, n, P); steps in the module docstring.

    `weights` = 1/|accepted| on accepted models. arrays: `"scale"` clip factors, `"norms"`, `"labels"` the
    final clusters, `"suspicious"`, `"exceedings"`, `"neups"`. info: `suspicious`, `clusters`, `accepted`,
    `clip_norm`, `num_clipped`.
    """
    U = as_updates(U)
    n = U.shape[0]
    ddifs = np.asarray(ddifs, dtype=np.float64)
    if ddifs.ndim != 3 or ddifs.shape[1:] != (n, layer.num_outputs) or not np.isfinite(ddifs).all():
        raise ValueError(f"ddifs must be finite with shape (seeds, {n}, {layer.num_outputs}); got {ddifs.shape}")
    neup = neups(layer.weights_of(U), layer.biases_of(U))
    exceedings = threshold_exceedings(neup)
    suspicious = suspicious_labels(exceedings)
    biases = layer.biases_of(U)
    cosine = cosine_distances(U[:, layer.weight] if biases is None else biases)
    labels, _ = ensemble_clusters(ddifs, neup, cosine, min_cluster_size)
    accepted = accepted_by_cluster(labels, suspicious, tau)

    norms = row_norms(U)
    clip = float(np.median(norms))
    scale = np.where(norms > clip, clip / np.where(norms > 0, norms, 1.0), 1.0)
    weights = accepted / accepted.sum() if accepted.any() else np.zeros(n)
    return AggregationOutcome(
        delta=(weights * scale) @ U,
        weights=weights,
        kept=accepted,
        info={"suspicious": int(suspicious.sum()), "clusters": len(np.unique(labels[labels >= 0])),
              "accepted": int(accepted.sum()), "clip_norm": clip,
              "num_clipped": int(np.sum(accepted & (norms > clip)))},
        arrays={"scale": scale, "norms": norms, "labels": labels, "suspicious": suspicious,
                "exceedings": exceedings, "neups": neup},
    )


# --------------------------------------------------------------------------- DDifs (torch)

Logits = Callable[[int | None, torch.Tensor], torch.Tensor]
"""`logits(i, x)`: the logits of local model i (None: the global model) on a batch x, on its device."""


def division_differences(logits: Logits, num_models: int, input_shape: Sequence[int], num_samples: int,
                         generators: Sequence[torch.Generator], device: torch.device,
                         batch_size: int | None = None) -> np.ndarray:
    """DDifs (S, n, P): per seed, the mean over `num_samples` random inputs of softmax(local) / softmax(global).

    Each seed's inputs are uniform in [0, 1) of `input_shape`, drawn batch by batch from a fresh copy of its
    CPU generator for every model, so every model sees the same inputs. The ratio is taken as
    exp(log_softmax(local) - log_softmax(global)) in float64, the log-ratio clamped to ±`LOG_RATIO_BOUND`
    (non-finite logits count as the bound). `batch_size` defaults to INPUT_ELEMENTS // prod(input_shape).
    """
    if batch_size is None:
        batch_size = max(1, INPUT_ELEMENTS // max(1, int(np.prod(input_shape, dtype=np.int64))))
    out: list[np.ndarray] = []
    with torch.no_grad():
        for gen in generators:
            start = gen.get_state()
            reference = _log_probs(logits, None, gen, start, input_shape, num_samples, batch_size, device)
            rows = []
            for i in range(num_models):
                local = _log_probs(logits, i, gen, start, input_shape, num_samples, batch_size, device)
                ratio = torch.nan_to_num(local - reference, nan=LOG_RATIO_BOUND, posinf=LOG_RATIO_BOUND,
                                         neginf=-LOG_RATIO_BOUND)
                rows.append(torch.exp(ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)).mean(dim=0).numpy())
            out.append(np.stack(rows) if rows else np.zeros((0, reference.shape[1])))
    return np.stack(out)


def _log_probs(logits: Logits, i: int | None, gen: torch.Generator, start: torch.Tensor, input_shape: Sequence[int],
               num_samples: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Model i's float64 log-softmax (CPU) on the inputs `gen` draws from state `start`, batch by batch."""
    gen.set_state(start)
    parts = []
    for first in range(0, num_samples, batch_size):
        x = torch.rand((min(batch_size, num_samples - first), *input_shape), generator=gen).to(device)
        parts.append(torch.log_softmax(logits(i, x).double(), dim=1).cpu())
    return torch.cat(parts)
