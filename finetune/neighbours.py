"""Each image's nearest neighbours among pooled backbone features, in one blocked pass that scales.

The data checks (finetune/data_health.py) read one neighbour list for two jobs: near duplicates and the k-NN
half of the label check. The similarity matrix is never held whole (a block of rows at a time), and above
EXACT_SEARCH_UP_TO images the search runs on a few principal directions and re-scores its candidates
exactly: on 70,000 Fashion-MNIST images about 18 s on 2 cores, where the exact pass took 84 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEIGHBOURS = 10  # nearest neighbours per image (near-duplicate candidates, k-NN vote)
SIMILARITY_BLOCK = 256  # rows of the similarity matrix computed at once: block x N floats (61 MB at 60,000)
EXACT_SEARCH_UP_TO = 10_000  # images; above, neighbours are searched on principal components, then re-scored
SEARCH_DIMS = 128  # principal components of that search (5x cheaper than 1,280 features)
SEARCH_CANDIDATES = 4  # x NEIGHBOURS candidates a row keeps from the search for the exact re-score
# rows re-scored at once: 16 x 40 candidates x 1,280 features is 3.3 MB a gather. At 128 rows (26 MB) glibc
# served the gathers from per-thread heap arenas and kept 1-2 GB of freed blocks resident, changing from run
# to run: on 70,000 synthetic features the search peaked at 1.9-5.1 GB, now 1.8-2.0 (glibc's mmap threshold
# rises to the size of a freed block, up to 32 MB, and blocks under it stay in the arenas)
RESCORE_BLOCK = 16


@dataclass
class Neighbours:
    """Each image's `NEIGHBOURS` most similar other images (cosine of pooled features), best first."""

    similarity: torch.Tensor  # (N, k)
    index: torch.Tensor  # (N, k)


def nearest_neighbours(features: torch.Tensor, count: int = NEIGHBOURS) -> Neighbours:
    """One blocked pass over the similarity matrix (block x N floats at a time, even for 60,000 images);
    near duplicates and the k-NN half of the label check both read it.

    Above EXACT_SEARCH_UP_TO images the pass runs on the top SEARCH_DIMS principal directions (60,000 x
    60,000 products of 1,280 features took 84 of the 165 s the checks cost on Fashion-MNIST), keeps
    SEARCH_CANDIDATES x `count` candidates a row, and re-scores those with the exact cosine: the similarities
    returned are always exact, and a near duplicate, close in every direction, is close in the top ones.
    """
    unit = unit_rows(features)
    count = min(count, len(unit) - 1)
    approximate = len(unit) > EXACT_SEARCH_UP_TO and unit.shape[1] > SEARCH_DIMS
    search = unit @ principal_directions(unit, SEARCH_DIMS)[1] if approximate else unit
    keep = min(len(unit) - 1, count * SEARCH_CANDIDATES) if approximate else count
    similarity, index = [], []
    for start in range(0, len(unit), SIMILARITY_BLOCK):
        rows = torch.arange(start, min(start + SIMILARITY_BLOCK, len(unit)))
        block = search[rows] @ search.T
        block[torch.arange(len(rows)), rows] = -2.0  # never its own neighbour
        values, columns = block.topk(keep, dim=1)
        if approximate:
            values, columns = _rescore(unit, rows, columns, count)
        similarity.append(values)
        index.append(columns)
    return Neighbours(torch.cat(similarity), torch.cat(index))


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """`features` scaled to rows of length 1 (cosine geometry); rows of length 1 come back unchanged.

    The data checks read 60,000 x 1,280 features three times (neighbours, the out-of-fold probe, outliers);
    a normalized copy each time was 307 MB at their memory peak, so the caller normalizes once, in place.
    """
    rows = features.float()
    if len(rows) and bool(((rows.norm(dim=1) - 1.0).abs() < 1e-4).all()):
        return rows
    return torch.nn.functional.normalize(rows, dim=1)


def principal_directions(rows: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), basis (D, dims)): the top `dims` principal directions of `rows` (N, D), best first.

    Taken from the D x D covariance, so no centred copy of the rows is made: for 70,000 x 1,280 features
    that copy (and the randomized SVD's) was 358 MB each, at the data checks' memory peak. The search
    (nearest_neighbours) projects the rows as they are, so dot products stay close to the cosines; the
    k-fold probe (finetune/out_of_fold.py) projects them centred.
    """
    mean = rows.mean(dim=0)
    covariance = (rows.T @ rows).double() / len(rows) - torch.outer(mean.double(), mean.double())
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    return mean, vectors[:, -dims:].flip(1).to(rows.dtype).contiguous()


def _rescore(
    unit: torch.Tensor, rows: torch.Tensor, candidates: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact cosines of each row's candidates; the best `count` of them, best first."""
    values, columns = [], []
    parts = zip(torch.split(rows, RESCORE_BLOCK), torch.split(candidates, RESCORE_BLOCK), strict=True)
    for part, chosen in parts:
        exact = torch.bmm(unit[chosen], unit[part].unsqueeze(2)).squeeze(2)
        best, order = exact.topk(count, dim=1)
        values.append(best)
        columns.append(chosen.gather(1, order))
    return torch.cat(values), torch.cat(columns)
