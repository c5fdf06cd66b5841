"""Exact and near duplicates inside one set of embeddings, and leakage between two.

Near duplicates are pairs whose cosine similarity reaches ``threshold``, found through
each row's k nearest neighbours (:func:`~embedpipe.neighbours.knn_graph`: exact up to 200k rows, an IVF
index with measured recall above); pairs are
grouped by connected components, with exact duplicates (equal ``content_hash``) joined
to them whatever their vectors say.

**Chaining.** Components are transitive: a ~ b and b ~ c put a and c in one group even
when a and c look nothing alike, and a long enough chain of small edits links a whole
class. So every group is checked against its representative: a member whose similarity
to the representative is below ``group_threshold`` (looser than ``threshold``, by
default ``threshold - 0.05``) leaves the group, and the members that left are grouped
again among themselves, with the same rule, until every group passes. Splitting was
chosen over dropping whole groups or tightening the threshold because it keeps the
genuine near-copies of the representative together and only cuts the chain's far end;
the looser second threshold keeps a copy that is 0.01 below ``threshold`` to the
representative (but linked through a closer copy) in its group.

**Representative.** The first id of the group in sorted (string) order: the same group
whatever the row order, and the same choice on every run. It is the row the keep-list
keeps.

**Perceptual hashes.** With each row's pHash (:mod:`embedpipe.curate.hashes`), two rows
are also near duplicates when their hashes differ in at most ``hash_distance`` bits,
whatever their cosine (a half-size copy of a small crop can fall to cosine 0.39), and a
pair whose hashes differ in more than ``hash_veto`` bits is *not* one, whatever its
cosine: pooled classifier features find crops of one scene, bursts and look-alikes
similar, the hash sees that their layouts differ. Without a hash (unreadable images, no
hashes given) a row is judged by cosine alone. The representative check applies the same
rule: a member stays when its hash is within ``hash_distance`` of the representative's,
or its cosine reaches ``group_threshold`` and the hashes are within ``hash_veto``.

``k`` bounds how many near copies of one row are found: a row with more than ``k``
copies still joins them all through the copies' own edges, but a group of more than
``k + 1`` identical rows may miss edges. The default (10) is far above what photo
collections hold; raise it for data with many copies of one image. Rows with identical
hashes are always linked.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DUPLICATE_SIMILARITY
from ..errors import CurationInputError
from ..neighbours import knn_graph, knn_search, l2_normalize
from .hashes import (
    DEFAULT_HASH_DISTANCE,
    DEFAULT_HASH_VETO,
    HASH_BITS,
    PerceptualHashes,
    hamming,
    hash_pairs,
    nearest_hashes,
)

#: the near-duplicate threshold (measured: see embedpipe.config.DUPLICATE_SIMILARITY)
DEFAULT_THRESHOLD = DUPLICATE_SIMILARITY
#: how far below ``threshold`` a member may sit from its group's representative
GROUP_SLACK = 0.05
DEFAULT_K = 10

#: the columns of :attr:`DedupResult.table`
COLUMNS = ("id", "group", "group_size", "representative", "similarity_to_representative",
           "hash_distance_to_representative", "exact_duplicate")


@dataclasses.dataclass(frozen=True)
class HashStep:
    """What the perceptual hashes did: ``hashed`` rows had one, ``unreadable`` did not;
    ``links`` pairs the hashes joined, ``vetoed`` cosine pairs they refused.
    ``unavailable`` says why no hash was used (then every count is 0)."""

    distance: int
    veto: int
    hashed: int = 0
    unreadable: int = 0
    links: int = 0
    vetoed: int = 0
    unavailable: str | None = None

    def summary(self) -> dict:
        if self.unavailable is not None:
            return {"perceptual_hash": f"unavailable: {self.unavailable}"}
        return {"perceptual_hash": "pHash (imagehash, 64 bits)", "hash_distance": self.distance,
                "hash_veto": self.veto, "hashed": self.hashed, "unreadable": self.unreadable,
                "hash_links": self.links, "vetoed_links": self.vetoed}


@dataclasses.dataclass(frozen=True)
class DedupResult:
    """What :func:`dedup` found.

    ``table``: one row per input row, columns :data:`COLUMNS` (``group`` int64 numbered
    by representative in sorted order, ``similarity_to_representative`` float32, 1.0 for
    the representative, ``hash_distance_to_representative`` int16 bits, -1 where either
    has no hash, ``exact_duplicate`` bool: the row's content hash equals another row's in
    its group). ``nn_similarity``: (N,) float32, each row's similarity to its nearest
    other row, in input order: the histogram that tells where a threshold falls.
    """

    table: pd.DataFrame
    nn_similarity: np.ndarray
    threshold: float
    group_threshold: float
    k: int
    hashes: HashStep
    neighbours: str = "exact"

    @property
    def duplicates(self) -> pd.DataFrame:
        """The rows of groups with more than one member, largest groups first."""
        dup = self.table[self.table["group_size"] > 1]
        return dup.sort_values(["group_size", "group", "id"], ascending=[False, True, True],
                               ignore_index=True)

    @property
    def keep(self) -> np.ndarray:
        """(G,) object: the ids to keep, one per group (singletons included), sorted."""
        t = self.table
        return np.sort(t.loc[t["id"] == t["representative"], "id"].to_numpy())

    def summary(self) -> dict:
        """Counts for people and JSON: rows, groups, rows to drop, exact duplicates."""
        dup = self.duplicates
        return {
            "rows": len(self.table),
            "keep": len(self.keep),
            "drop": int(len(self.table) - len(self.keep)),
            "duplicate_groups": int(dup["group"].nunique()),
            "largest_group": int(dup["group_size"].max()) if len(dup) else 1,
            "exact_duplicates": int(self.table["exact_duplicate"].sum()),
            "threshold": self.threshold,
            "group_threshold": self.group_threshold,
            "k": self.k,
            "neighbours": self.neighbours,
            **self.hashes.summary(),
        }


def similarity_histogram(nn_similarity: np.ndarray, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """``(counts (bins,) int64, edges (bins + 1,) float64)`` of nearest-neighbour
    similarities over [min(similarity, 0), 1]."""
    s = np.asarray(nn_similarity, np.float64)
    low = min(0.0, float(s.min())) if len(s) else 0.0
    counts, edges = np.histogram(np.clip(s, low, 1.0), bins=bins, range=(low, 1.0))
    return counts.astype(np.int64), edges


def _check_threshold(name: str, value: float) -> float:
    if not -1.0 <= float(value) <= 1.0:
        raise CurationInputError(f"{name} must be a cosine similarity in [-1, 1], got {value}")
    return float(value)


def _check_bits(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= HASH_BITS:
        raise CurationInputError(f"{name} must be a number of bits in 0..{HASH_BITS}, got {value!r}")
    return int(value)


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(n,) int component label of each node of the undirected graph given by edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Who may stay in a representative's group: ``x`` (N, D) normalised vectors,
    ``exact`` (N,) content-hash codes, ``phash`` (N,) the perceptual hashes."""

    x: np.ndarray
    exact: np.ndarray
    phash: PerceptualHashes
    group_threshold: float
    hash_distance: int
    hash_veto: int

    def bits(self, rep: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) int16: hash bits each row differs from ``rep`` in, -1 if unknown."""
        h = self.phash
        d = hamming(h.values[rows], h.values[rep]).astype(np.int16)
        return np.where(h.known[rows] & h.known[rep], d, np.int16(-1))

    def stays(self, rep: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ok (len(rows),) bool, cosine to ``rep`` float32) for ``rows``."""
        sim = self.x[rows] @ self.x[rep]
        bits = self.bits(rep, rows)
        ok = ((sim >= self.group_threshold) & (bits <= self.hash_veto)) | (
            (bits >= 0) & (bits <= self.hash_distance)) | (self.exact[rows] == self.exact[rep])
        return ok, sim


def _split_chains(members: np.ndarray, ids: np.ndarray, edges: set,
                  rule: _Rule) -> list[tuple[np.ndarray, np.ndarray]]:
    """``members`` (row numbers of one component) -> [(rows, similarity to their
    representative)] groups whose members all pass ``rule`` against the representative
    (the first id in sorted order)."""
    out = []
    todo = members
    while len(todo):
        order = todo[np.argsort(ids[todo], kind="stable")]
        rep = order[0]
        ok, sim = rule.stays(rep, order)
        ok[0] = True
        out.append((order[ok], sim[ok]))
        rest = order[~ok]
        if len(rest) < 2:
            out.extend((np.array([r]), np.ones(1, np.float32)) for r in rest)
            break
        # the members that left form groups again through the edges among themselves,
        # and rows with identical hashes (linked through one of them) with each other
        pos = {int(r): i for i, r in enumerate(rest)}
        pairs = [(pos[a], pos[b]) for a, b in edges if a in pos and b in pos]
        hashed = np.flatnonzero(rule.phash.known[rest])
        same = hashed[np.argsort(rule.phash.values[rest[hashed]], kind="stable")]
        tie = rule.phash.values[rest[same[1:]]] == rule.phash.values[rest[same[:-1]]]
        pairs += zip(same[1:][tie].tolist(), same[:-1][tie].tolist())
        r_, c_ = (np.array(p, np.int64) for p in zip(*pairs)) if pairs else (np.empty(0, np.int64),) * 2
        labels = _components(len(rest), r_, c_)
        for lab in np.unique(labels)[1:]:
            out.extend(_split_chains(rest[labels == lab], ids, edges, rule))
        todo = rest[labels == labels.min()]
    return out


def _hash_links(phash: PerceptualHashes, max_distance: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64: the pairs whose hashes differ in at most ``max_distance`` bits.
    Distinct hash values are searched (each with its ``k`` nearest), linked through the
    first row holding each value; rows with the same value are linked to that row."""
    hashed = np.flatnonzero(phash.known)
    values, first, inverse = np.unique(phash.values[hashed], return_index=True, return_inverse=True)
    hub = hashed[first]
    a, b, _ = hash_pairs(values, max_distance, min(k, len(values) - 1))
    twin = hub[inverse] != hashed
    return (np.concatenate([hub[a], hashed[twin]]), np.concatenate([hub[b], hub[inverse][twin]]))


def dedup(
    ids: np.ndarray,
    vectors: np.ndarray,
    content_hashes: np.ndarray | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    group_threshold: float | None = None,
    k: int = DEFAULT_K,
    perceptual_hashes: PerceptualHashes | None = None,
    hash_distance: int = DEFAULT_HASH_DISTANCE,
    hash_veto: int = DEFAULT_HASH_VETO,
) -> DedupResult:
    """Group exact and near duplicates.

    ``ids``: (N,) unique str; ``vectors``: (N, D) float (cosine similarity is used,
    normalisation is done here); ``content_hashes``: (N,) str or None per row, or None.
    ``threshold``: cosine similarity from which two rows are near duplicates;
    ``group_threshold`` (default ``threshold - 0.05``): the least similarity to the
    group's representative a member may have (see the module notes on chaining).
    ``perceptual_hashes``: each row's pHash (:func:`embedpipe.curate.hashes.hash_images`),
    or None for cosine alone; rows whose hashes differ in at most ``hash_distance`` bits
    are near duplicates, rows whose hashes differ in more than ``hash_veto`` are not.
    """
    ids = np.asarray(ids, dtype=object)
    x = l2_normalize(vectors)
    if len(ids) != len(x):
        raise CurationInputError(f"{len(ids)} ids for {len(x)} vectors: pass one id per row")
    if len(pd.Index(ids).unique()) != len(ids):
        dup = pd.Index(ids)[pd.Index(ids).duplicated()].tolist()[:3]
        raise CurationInputError(f"ids repeat, e.g. {dup}: deduplicate rows by id first")
    threshold = _check_threshold("threshold", threshold)
    group_threshold = _check_threshold(
        "group_threshold", threshold - GROUP_SLACK if group_threshold is None else group_threshold)
    if group_threshold > threshold:
        raise CurationInputError(
            f"group_threshold {group_threshold} is above threshold {threshold}: it must be "
            "the looser of the two")
    hash_distance = _check_bits("hash_distance", hash_distance)
    hash_veto = _check_bits("hash_veto", hash_veto)
    n = len(x)
    if n < 2:
        raise CurationInputError(f"dedup needs at least 2 rows, got {n}")
    phash = perceptual_hashes or PerceptualHashes.none(n, "no perceptual hashes given")
    if len(phash.values) != n:
        raise CurationInputError(f"{len(phash.values)} perceptual hashes for {n} rows: pass one per row")
    k = min(int(k), n - 1)
    graph = knn_graph(x, k, normalized=True)
    neighbours, sims = graph.neighbours, graph.similarities
    rows, cols = np.nonzero(sims >= threshold)
    rows, cols = rows.astype(np.int64), neighbours[rows, cols]
    step = HashStep(hash_distance, hash_veto, unavailable=phash.unavailable)
    if phash.unavailable is None:
        # a cosine pair whose hashes are far apart is two pictures, not a copy
        both = phash.known[rows] & phash.known[cols]
        far = both & (hamming(phash.values[rows], phash.values[cols]) > hash_veto)
        vetoed = len(np.unique(np.minimum(rows, cols)[far] * n + np.maximum(rows, cols)[far]))
        hash_rows, hash_cols = _hash_links(phash, hash_distance, k)
        rows = np.concatenate([rows[~far], hash_rows])
        cols = np.concatenate([cols[~far], hash_cols])
        step = dataclasses.replace(step, hashed=int(phash.known.sum()), unreadable=int(n - phash.known.sum()),
                                   links=len(hash_rows), vetoed=vetoed)
    # exact duplicates: a row with no hash (None) matches nothing, not other None rows
    if content_hashes is None:
        exact = np.arange(n)
    else:
        hashes = pd.Series(np.asarray(content_hashes, dtype=object))
        codes = pd.factorize(hashes, use_na_sentinel=True)[0]
        exact = np.where(codes >= 0, codes, -1 - np.arange(n)).astype(np.int64)
        order = np.argsort(exact, kind="stable")
        same = exact[order][1:] == exact[order][:-1]
        rows = np.concatenate([rows, order[1:][same]])
        cols = np.concatenate([cols, order[:-1][same]])
    labels = _components(n, rows, cols)
    sizes = np.bincount(labels)
    edges_of: dict[int, set] = {}
    for a, b in zip(rows.tolist(), cols.tolist()):
        if a != b:
            edges_of.setdefault(int(labels[a]), set()).add((min(a, b), max(a, b)))

    # singletons in one vectorised step; components of 2+ rows checked for chains
    rule = _Rule(x, exact, phash, group_threshold, hash_distance, hash_veto)
    single = np.flatnonzero(sizes[labels] == 1)
    tmp_group = np.empty(n, np.int64)
    tmp_group[single] = np.arange(len(single))
    rep_rows = [single]
    sim_to_rep = np.ones(n, np.float32)
    next_gid = len(single)
    for lab in np.flatnonzero(sizes > 1):
        members = np.flatnonzero(labels == lab)
        for group, sim in _split_chains(members, ids, edges_of.get(int(lab), set()), rule):
            tmp_group[group] = next_gid
            sim_to_rep[group] = sim
            rep_rows.append(group[:1])
            next_gid += 1
    rep_rows = np.concatenate(rep_rows)
    # number groups by their representative's id, so numbering ignores row order
    order = np.argsort(ids[rep_rows].astype(str), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    group_of = rank[tmp_group]
    rep_of = rep_rows[tmp_group]
    size_of = np.bincount(group_of)[group_of]
    exact_dup = (exact[rep_of] == exact) & (rep_of != np.arange(n))
    # the representative is an exact duplicate too when any member shares its hash
    has_exact_member = np.zeros(n, bool)
    has_exact_member[rep_of[exact_dup]] = True
    bits = np.where(phash.known & phash.known[rep_of],
                    hamming(phash.values, phash.values[rep_of]), -1).astype(np.int16)
    table = pd.DataFrame({
        "id": ids.astype(str),
        "group": group_of,
        "group_size": size_of,
        "representative": ids[rep_of].astype(str),
        "similarity_to_representative": np.clip(sim_to_rep, -1, 1).astype(np.float32),
        "hash_distance_to_representative": bits,
        "exact_duplicate": exact_dup | has_exact_member,
    })
    return DedupResult(table, sims[:, 0].copy(), threshold, group_threshold, k, step, graph.describe())


def dedup_across(
    ids_a: np.ndarray,
    vectors_a: np.ndarray,
    ids_b: np.ndarray,
    vectors_b: np.ndarray,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    hashes_a: PerceptualHashes | None = None,
    hashes_b: PerceptualHashes | None = None,
    hash_distance: int = DEFAULT_HASH_DISTANCE,
    hash_veto: int = DEFAULT_HASH_VETO,
) -> pd.DataFrame:
    """Leakage: the rows of b with a near copy in a.

    ``vectors_a``: (Na, D), ``vectors_b``: (Nb, D) float, from the same vector space. A
    row of b leaks when its nearest row of a by cosine reaches ``threshold`` (unless their
    hashes differ in more than ``hash_veto`` bits), or, with both sets' perceptual hashes,
    when the nearest hash of a is within ``hash_distance`` bits: the rule of :func:`dedup`.
    Returns a frame ``id`` (of b), ``nearest_id`` (of a), ``similarity`` (float32, their
    cosine), ``hash_distance`` (int16 bits, -1 where unknown), ``found_by`` ("cosine" or
    "hash"), most similar first (ties by id).
    """
    threshold = _check_threshold("threshold", threshold)
    hash_distance = _check_bits("hash_distance", hash_distance)
    hash_veto = _check_bits("hash_veto", hash_veto)
    ids_a, ids_b = np.asarray(ids_a, dtype=object), np.asarray(ids_b, dtype=object)
    if len(ids_a) != len(vectors_a) or len(ids_b) != len(vectors_b):
        raise CurationInputError("pass one id per vector in each set")
    ha = hashes_a or PerceptualHashes.none(len(ids_a), "no perceptual hashes given")
    hb = hashes_b or PerceptualHashes.none(len(ids_b), "no perceptual hashes given")
    if len(ha.values) != len(ids_a) or len(hb.values) != len(ids_b):
        raise CurationInputError("pass one perceptual hash per row in each set")
    nearest, sims = knn_search(vectors_b, vectors_a, 1)
    nearest, sims = nearest[:, 0], sims[:, 0]
    bits = np.where(hb.known & ha.known[nearest], hamming(hb.values, ha.values[nearest]), -1)
    by_cosine = (sims >= threshold) & (bits <= hash_veto)
    by_hash = np.zeros(len(ids_b), bool)
    if ha.unavailable is None and hb.unavailable is None:
        rows, near_bits = nearest_hashes(hb, ha)
        by_hash = ~by_cosine & (near_bits >= 0) & (near_bits <= hash_distance)
        found = np.flatnonzero(by_hash)
        nearest, bits, sims = nearest.copy(), bits.copy(), sims.copy()
        nearest[found], bits[found] = rows[found], near_bits[found]
        sims[found] = np.einsum("ij,ij->i", l2_normalize(vectors_b[found]),
                                l2_normalize(vectors_a[nearest[found]]))
    hit = by_cosine | by_hash
    out = pd.DataFrame({
        "id": ids_b[hit].astype(str),
        "nearest_id": ids_a[nearest[hit]].astype(str),
        "similarity": sims[hit].astype(np.float32),
        "hash_distance": bits[hit].astype(np.int16),
        "found_by": np.where(by_hash[hit], "hash", "cosine"),
    })
    return out.sort_values(["similarity", "id"], ascending=[False, True], ignore_index=True)


# --- files ---------------------------------------------------------------------------


def read_content_hashes(path: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
    """(N,) object: the ``content_hash`` of each of ``ids`` in the dataset at ``path``
    (None where the dataset has none), in the order of ``ids``."""
    import pyarrow.parquet as pq

    from ..store import list_parts

    tables = [pq.read_table(p, columns=["id", "content_hash"]).to_pandas() for p in list_parts(path)]
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        {"id": [], "content_hash": []})
    by_id = frame.set_index("id")["content_hash"]
    return by_id.reindex(pd.Index(np.asarray(ids, dtype=object))).astype(object).where(
        lambda s: s.notna(), None).to_numpy()


def image_paths(meta: dict, ids: np.ndarray) -> dict[str, str] | None:
    """Where each of ``ids`` lives: under the image folder ``meta["images"]`` records, or
    as the manifest it records says (ids of a manifest may differ from its paths). None
    when nothing is recorded, or the folder or manifest is not a local path that exists."""
    images = meta.get("images")
    if not images or "://" in str(images):
        return None
    p = Path(images)
    if p.is_dir():
        return {str(i): str(p / str(i)) for i in ids}
    if p.is_file() and p.suffix in (".csv", ".parquet"):
        from ..images.sources import read_manifest

        return {r.id: r.path for r in read_manifest(p)}
    return None


def keep_manifest(result: DedupResult, labels: dict | None = None,
                  paths: dict[str, str] | None = None) -> pd.DataFrame:
    """The keep-list as a manifest :func:`embedpipe.images.sources.read_manifest` reads:
    ``path`` (the image's path from ``paths``, see :func:`image_paths`, else the id),
    ``id`` (so a re-extraction keeps the ids) and ``label``."""
    keep = result.keep
    paths = paths or {}
    labels = labels or {}
    return pd.DataFrame({"path": [paths.get(i, str(i)) for i in keep], "id": keep.astype(str),
                         "label": [labels.get(i) for i in keep]})
