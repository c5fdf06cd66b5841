"""The search service: its answers against `embedpipe search`, and every bad input -> 4xx."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import browser_page, make_image, require
from PIL import Image

require("fastapi", "the search service: pip install -e '.[serve]'")
from fastapi.testclient import TestClient

from embedpipe.cli import main
from embedpipe.config import ExtractConfig
from embedpipe.extraction import extract
from embedpipe.index import Index, embedding_blocks
from embedpipe.serve import BODY_OVERHEAD, ServeConfig, create_app

#: TestClient sends ``Host: testserver``; a name the operator added, like --allowed-host
HOSTS = ("testserver", "Search.Example.org")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An exact index over 12 photos-like images in two classes, and its image folder."""
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    for c, cls in enumerate(["cats", "dogs"]):
        for i in range(6):
            make_image(images / cls / f"{i:03d}.jpg", size=(80 + 7 * i, 64), seed=10 * c + i)
    emb = root / "emb"
    extract(ExtractConfig(source=images, out=emb, backbone="resnet18", weights="none",
                          resize_size=72, crop_size=64, workers=1))
    Index.build(embedding_blocks(emb), index="flat", embeddings_path=emb).save(root / "idx")
    return root


@pytest.fixture(scope="module")
def app(served):
    return create_app(ServeConfig(index=served / "idx", cache_dir=served / "thumbs", max_k=20,
                                  max_upload_bytes=200_000, max_pixels=1_000_000, allowed_hosts=HOSTS))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def _cli_search(served: Path, *args: str) -> list[dict]:
    r = CliRunner().invoke(main, ["search", str(served / "idx"), *args, "--format", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _rows(answer: dict) -> list[tuple]:
    return [(r["rank"], r["id"], r["label"], round(r["score"], 5)) for r in answer["results"]]


def test_search_by_id_equals_the_cli(client, served):
    answer = client.get("/api/search", params={"id": "cats/002.jpg", "k": 5}).json()
    expected = _cli_search(served, "--id", "cats/002.jpg", "-k", "5")
    assert answer["query_id"] == "cats/002.jpg" and len(answer["results"]) == 5
    assert _rows(answer) == [(r["rank"], r["id"], r["label"], round(r["score"], 5)) for r in expected]
    assert answer["results"][0]["id"] == "cats/002.jpg"  # itself, at cosine 1


def test_search_by_upload_equals_the_cli(client, served, tmp_path):
    query = make_image(tmp_path / "q.png", size=(90, 70), seed=123)
    with open(query, "rb") as f:
        answer = client.post("/api/search", params={"k": 7}, files={"image": ("q.png", f, "image/png")}).json()
    expected = _cli_search(served, "--image", str(query), "-k", "7")
    assert answer["query_id"] == "q.png" and len(answer["results"]) == 7
    assert _rows(answer) == [(r["rank"], r["id"], r["label"], round(r["score"], 5)) for r in expected]


def test_an_uploaded_copy_of_an_indexed_image_finds_itself(client, served):
    data = (served / "images" / "dogs" / "003.jpg").read_bytes()
    answer = client.post("/api/search", params={"k": 3}, files={"image": ("x.jpg", data)}).json()
    top = answer["results"][0]
    assert top["id"] == "dogs/003.jpg" and top["score"] == pytest.approx(1.0, abs=1e-5)


def test_thumbnails_are_served_by_id_and_cached(client, served):
    r = client.get("/api/thumbnail", params={"id": "cats/005.jpg", "size": 32})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert max(img.size) == 32 and img.size == (32, 18)  # 115x64, aspect kept
    cached = list((served / "thumbs").glob("*-32.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == r.content
    # sizes round up to a few buckets: clients cannot fill the disk with one file per size
    before = len(list((served / "thumbs").glob("*.jpg")))
    for size in (33, 50, 64):
        r = client.get("/api/thumbnail", params={"id": "cats/005.jpg", "size": size})
        assert Image.open(io.BytesIO(r.content)).size == (64, 36)
    assert len(list((served / "thumbs").glob("*.jpg"))) == before + 1
    assert client.get("/api/thumbnail", params={"id": "cats/005.jpg", "size": 2000}).status_code == 422


def test_info_health_and_metrics(client, served):
    info = client.get("/api/info").json()
    assert (info["count"], info["dim"], info["backbone"], info["kind"]) == (12, 512, "resnet18", "flat")
    assert info["weights"]["pretrained"] is False and info["labels"] == ["cats", "dogs"]
    assert str(served) not in json.dumps(info)  # no server paths
    assert client.get("/healthz").json()["status"] == "ok"
    client.get("/api/search", params={"id": "nope.jpg"})
    metrics = client.get("/metrics").text
    assert 'embedpipe_http_requests_total{method="GET",route="/api/search",status="404"}' in metrics
    assert "embedpipe_http_request_duration_seconds_bucket" in metrics


def test_the_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: nothing to fetch elsewhere
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


TRAVERSAL = (400, "ids are relative paths inside the image folder, without '..'")
MALFORMED = (400, "an id is 1 to 4096 characters without NUL")
UNKNOWN = (404, "the index holds no id")


@pytest.mark.parametrize(("image_id", "refusal", "by_hand"), [
    # (id, its refusal when the client encodes it, when it is pasted into the URL as is)
    ("../emb/_embedpipe.json", TRAVERSAL, TRAVERSAL),
    ("cats/../../emb/_embedpipe.json", TRAVERSAL, TRAVERSAL),
    ("/etc/passwd", TRAVERSAL, TRAVERSAL),
    ("C:\\Windows\\win.ini", TRAVERSAL, TRAVERSAL),
    # encoded once more by the client these are odd names, not traversal; by hand they decode to it
    ("..%2F..%2Fetc%2Fpasswd", UNKNOWN, TRAVERSAL),
    ("%2e%2e/%2e%2e/etc/passwd", UNKNOWN, TRAVERSAL),
    ("cats/000.jpg\x00.png", MALFORMED, MALFORMED),
    ("", MALFORMED, MALFORMED),
    ("x" * 5000, MALFORMED, MALFORMED),
    ("cats", UNKNOWN, UNKNOWN),  # a folder, not an image
])
def test_path_traversal_and_unknown_ids_are_refused(client, image_id, refusal, by_hand):
    for route in ("/api/thumbnail", "/api/search"):
        r = client.get(route, params={"id": image_id})
        assert (r.status_code, r.json()["detail"][:len(refusal[1])]) == refusal, (route, image_id)
    r = client.get("/api/thumbnail?id=" + image_id.replace("/", "%2F").replace("\x00", "%00"))
    assert (r.status_code, r.json()["detail"][:len(by_hand[1])]) == by_hand, image_id


def test_a_symlink_escaping_the_image_folder_is_refused(served, tmp_path):
    secret = tmp_path / "secret.jpg"
    make_image(secret, seed=5)
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    for p in (served / "images" / "cats").iterdir():
        (images / "cats" / p.name).write_bytes(p.read_bytes())
    (images / "cats" / "001.jpg").unlink()
    (images / "cats" / "001.jpg").symlink_to(secret)  # out of the folder
    (images / "cats" / "003.jpg").unlink()
    (images / "cats" / "003.jpg").symlink_to("002.jpg")  # within it
    app = create_app(ServeConfig(index=served / "idx", images=images, cache_dir=tmp_path / "thumbs",
                                 allowed_hosts=HOSTS))
    with TestClient(app) as c:
        assert c.get("/api/thumbnail", params={"id": "cats/001.jpg"}).status_code == 403
        assert c.get("/api/thumbnail", params={"id": "cats/003.jpg"}).status_code == 200


@pytest.mark.parametrize(("params", "status"), [
    ({"id": "cats/000.jpg", "k": 0}, 422),
    ({"id": "cats/000.jpg", "k": -3}, 422),
    ({"id": "cats/000.jpg", "k": 21}, 422),  # over --max-k
    ({"id": "cats/000.jpg", "k": "ten"}, 422),
    ({"id": "cats/000.jpg", "nprobe": 4}, 400),  # a flat index takes no search parameter
    ({"k": 5}, 422),  # no id
])
def test_bad_search_parameters_are_4xx(client, params, status):
    assert client.get("/api/search", params=params).status_code == status


def test_bad_uploads_are_4xx_with_a_message(client, tmp_path):
    bomb = io.BytesIO()
    Image.new("L", (2000, 1000)).save(bomb, "PNG")  # 2 MP > the 1 MP cap, a few KB on disk
    cases = {
        "text": (b"not an image at all", 415),
        "empty": (b"", 400),
        "bomb": (bomb.getvalue(), 413),
        "over the cap": (b"\xff" * 200_001, 413),  # refused by the handler, within the body's slack
        "truncated": (make_image(tmp_path / "t.jpg", size=(200, 150)).read_bytes()[:500], 400),
    }
    for name, (data, status) in cases.items():
        r = client.post("/api/search", files={"image": (name, data)})
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["detail"], name
    assert client.post("/api/search").status_code == 422  # no file at all


@pytest.fixture
def spooled(monkeypatch):
    """The sizes Starlette's multipart parser grew its upload files to (in memory, or on
    disk past its spool size), recorded after every write."""
    import starlette.formparsers

    sizes = []

    class Recorded(starlette.formparsers.SpooledTemporaryFile):
        def write(self, data):
            written = super().write(data)
            sizes.append(self.tell())
            return written

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Recorded)
    return sizes


def _post_streamed(app, chunks: int, headers: dict) -> tuple[int, str, int]:
    """POST a multipart upload of ``chunks`` x 64 KiB, streamed one chunk per ASGI message;
    returns the status, the detail and how many bytes the app pulled from the stream."""
    import httpx

    boundary = "b0undary"
    pulled = 0

    async def body():
        nonlocal pulled
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"'
                "\r\nContent-Type: image/jpeg\r\n\r\n").encode()
        for part in (head, *[b"\xff" * 2**16] * chunks, f"\r\n--{boundary}--\r\n".encode()):
            pulled += len(part)
            yield part

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.post("/api/search", content=body(), headers={
                "content-type": f"multipart/form-data; boundary={boundary}", **headers})

    r = asyncio.run(post())
    return r.status_code, r.json()["detail"], pulled


@pytest.mark.parametrize("headers", [
    {},  # chunked: no Content-Length, the bytes are counted
    {"content-length": "1000"},  # a Content-Length that lies: counted all the same
], ids=["chunked", "lying-length"])
def test_an_upload_over_the_cap_is_refused_before_it_is_stored(app, spooled, headers):
    cap = 200_000  # the app's max_upload_bytes; the body is sent 64 KiB at a time, 4 MiB in all
    status, detail, pulled = _post_streamed(app, chunks=64, headers=headers)
    assert status == 413 and detail.startswith("uploads are limited to 0.191 MiB"), detail
    assert pulled <= cap + BODY_OVERHEAD + 2**16  # the stream was abandoned at the cap...
    assert 0 < max(spooled) <= cap + BODY_OVERHEAD  # ...and the parser never stored more


def test_a_declared_oversized_body_is_refused_unread(app, spooled):
    status, detail, pulled = _post_streamed(app, chunks=64, headers={"content-length": str(10 * 2**30)})
    assert status == 413 and "--max-upload-mb" in detail
    assert pulled == 0 and spooled == []


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "", "127.0.0.2"])
def test_other_hosts_are_refused(client, host):
    """DNS rebinding: a page on evil.example whose name now resolves to this server still
    sends its own Host, and gets nothing."""
    r = client.get("/api/info", headers={"host": host})
    assert r.status_code == 400, host
    assert r.json()["detail"].startswith(f"this server does not answer to Host {host.split(':')[0]!r}")
    assert "--allowed-host" in r.json()["detail"]


@pytest.mark.parametrize("host", [
    "localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST",
    "testserver", "search.example.org", "search.example.org:443",  # added by allowed_hosts
])
def test_local_and_allowed_hosts_are_served(client, host):
    assert client.get("/api/info", headers={"host": host}).status_code == 200, host


def test_cli_serves_the_bound_host_and_allowed_hosts(served, monkeypatch):
    """--host and --allowed-host reach the app uvicorn is given; other names are refused."""
    import uvicorn

    import embedpipe.serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setattr(embedpipe.serve, "log_access_to_stderr", lambda: None)
    r = CliRunner().invoke(main, ["serve", str(served / "idx"), "--host", "10.1.2.3", "--cache-dir",
                                  str(served / "thumbs"), "--allowed-host", "photos.lan",
                                  "--allowed-host", "fd00::7"])
    assert r.exit_code == 0, r.output
    with TestClient(apps[0]) as c:
        for host, status in [("10.1.2.3:8000", 200), ("photos.lan", 200), ("[fd00::7]:80", 200),
                             ("localhost", 200), ("testserver", 400)]:
            assert c.get("/healthz", headers={"host": host}).status_code == status, host


@pytest.mark.parametrize(("name", "expected"), [
    ("Photos.Example.ORG", "photos.example.org"), ("10.0.0.5", "10.0.0.5"), ("::1", "[::1]"),
    ("[FD00::7]", "[fd00::7]"), ("0.0.0.0", "0.0.0.0"),
    ("http://photos.lan", None), ("photos.lan:8000", None), ("photos.lan/x", None), ("", None),
])
def test_allowed_host_names(name, expected):
    from embedpipe.errors import IndexInputError
    from embedpipe.serve import _allowed_host

    if expected is None:
        with pytest.raises(IndexInputError, match="without scheme, port or path"):
            _allowed_host(name)
    else:
        assert _allowed_host(name) == expected


def test_openapi_is_served_and_the_blank_swagger_page_is_gone(client):
    assert client.get("/api/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/thumbnail", "/api/info"} <= set(schema["paths"])


def test_wrong_methods_are_405(client):
    assert client.put("/api/search", params={"id": "cats/000.jpg"}).status_code == 405
    assert client.delete("/api/thumbnail", params={"id": "cats/000.jpg"}).status_code == 405
    assert client.post("/api/info").status_code == 405


@pytest.fixture(scope="module")
def vector_indexes(tmp_path_factory):
    """An IVF64 index over 4000 clustered vectors and an HNSW index over 500 of them (ids
    "0", "1", ...; no images), and an empty image folder to serve them with."""
    root = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(32, 24)).astype(np.float32)
    x = centers[rng.integers(0, 32, 4000)] + 0.7 * rng.normal(size=(4000, 24)).astype(np.float32)
    Index.build(x, metric="l2", index="IVF64,Flat").save(root / "ivf")
    Index.build(x[:500], metric="l2", index="hnsw").save(root / "hnsw")
    (root / "images").mkdir()
    return root


def _vector_app(root: Path, name: str, **config) -> TestClient:
    return TestClient(create_app(ServeConfig(index=root / name, images=root / "images",
                                             allowed_hosts=HOSTS, **config)))


def test_concurrent_searches_get_the_effort_each_asked_for(vector_indexes):
    index = Index.open(vector_indexes / "ivf")
    queries = [str(i) for i in range(0, 4000, 97)]
    with _vector_app(vector_indexes, "ivf") as c:
        def ask(q, nprobe, k):
            r = c.get("/api/search", params={"id": q, "k": k, "nprobe": nprobe})
            assert r.status_code == 200, r.text
            return [row["id"] for row in r.json()["results"]]

        jobs = [(q, nprobe, k) for q in queries for nprobe, k in ((1, 5), (64, 9))]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda j: ask(*j), jobs))
    for (q, nprobe, k), got in zip(jobs, answers):
        expected = index.search_ids([q], k, nprobe=nprobe).id.tolist()
        assert got == expected, (q, nprobe)
    # the two settings really differ, or the test would test nothing
    assert any(a != b[:5] for a, b in zip(answers[0::2], answers[1::2]))


@pytest.mark.parametrize(("name", "knob", "bound", "reason"), [
    ("ivf", "nprobe", 64, "the 64 inverted lists (nlist) of this index"),
    ("hnsw", "ef_search", 4096, "the efSearch ceiling of tuning (EF_SEARCH_MAX)"),
])
def test_search_effort_is_bounded_by_what_the_index_can_use(vector_indexes, name, knob, bound, reason):
    with _vector_app(vector_indexes, name) as c:
        assert c.get("/api/info").json()["search_parameter_max"] == bound
        ok = c.get("/api/search", params={"id": "7", knob: bound})
        assert ok.status_code == 200 and ok.json()["params"] == {knob: bound}
        r = c.get("/api/search", params={"id": "7", knob: bound + 1})
        assert r.status_code == 422  # refused, not silently clamped
        assert r.json()["detail"] == (f"{knob}={bound + 1} is more than this index can use: at most "
                                      f"{bound}, {reason}; ask for 1 to {bound}")


def test_max_effort_lowers_the_bound_but_not_below_the_tuned_default(vector_indexes):
    from embedpipe.errors import IndexInputError

    tuned = Index.open(vector_indexes / "ivf").info.tuning.value
    with _vector_app(vector_indexes, "ivf", max_effort=tuned) as c:
        assert c.get("/api/search", params={"id": "7"}).status_code == 200  # the default fits
        assert c.get("/api/search", params={"id": "7", "nprobe": tuned}).status_code == 200
        r = c.get("/api/search", params={"id": "7", "nprobe": tuned + 1})
        assert r.status_code == 422 and f"at most {tuned}, the server's --max-effort" in r.json()["detail"]
    assert tuned > 1  # else no --max-effort is below it
    with pytest.raises(IndexInputError, match=f"pass --max-effort {tuned} or more"):
        create_app(ServeConfig(index=vector_indexes / "ivf", images=vector_indexes / "images",
                               max_effort=tuned - 1))


SLOWEST_ANSWER_S = 5.0


def test_the_api_survives_fuzzing_from_its_own_schema(app):
    """Requests generated from /openapi.json (schemathesis: valid and invalid values of
    every parameter, random upload bytes, random and real ids) never get a 5xx nor take
    longer than SLOWEST_ANSWER_S. Bounded and derandomised: the same cases every run."""
    schemathesis = require("schemathesis", "the API fuzz test")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ids = ["cats/000.jpg", "dogs/005.jpg"]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.label for op in operations) == [
        "GET /api/info", "GET /api/map", "GET /api/search", "GET /api/thumbnail", "GET /healthz",
        "POST /api/search"]
    strategies = []
    for operation in operations:
        takes_input = bool(list(operation.query) or list(operation.body))  # else no invalid input exists
        for mode in schemathesis.GenerationMode if takes_input else [schemathesis.GenerationMode.POSITIVE]:
            strategies.append(operation.as_strategy(mode))
            if any(p.name == "id" for p in operation.query):  # real ids, or only refusals are seen
                strategies.append(st.sampled_from(ids).flatmap(
                    lambda i, op=operation, m=mode: op.as_strategy(m, query={"id": i})))

    seen = []

    @settings(max_examples=12, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(strategy, data):
        case = data.draw(strategy)
        started = time.perf_counter()
        response = case.call()
        seconds = time.perf_counter() - started
        seen.append((case.operation.label, response.status_code))
        assert response.status_code < 500, case.as_curl_command()
        assert seconds < SLOWEST_ANSWER_S, (seconds, case.as_curl_command())

    for strategy in strategies:
        fuzz(strategy)
    statuses = {status for _, status in seen}
    assert {200, 400, 404, 415, 422} <= statuses, sorted(statuses)  # the fuzz reached each kind of answer


def test_the_core_never_imports_the_web_stack():
    code = ("import sys, embedpipe.extraction.forward, embedpipe.index, embedpipe.pipeline, embedpipe.cli; "
            "bad = {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_says_how_to_install_it():
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "try:\n    import embedpipe.serve\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "embedpipe[serve]"' in r.stdout


def test_serve_refuses_before_it_says_it_is_serving(served):
    r = CliRunner().invoke(main, ["serve", str(served / "emb")])
    assert r.exit_code == 1 and "is an embeddings dataset, not an index" in r.output
    assert "serving" not in r.output


def test_cli_serve_defaults_to_loopback():
    from embedpipe.cli.serve import serve

    host = next(p for p in serve.params if p.name == "host")
    assert host.default == "127.0.0.1"


# --- the map view's data -----------------------------------------------------------------


def _write_map(emb: Path, out: Path, *, rename: dict | None = None):
    """A PCA map of ``emb`` in ``out`` (ids renamed by ``rename``), and the map."""
    from dataclasses import replace

    from embedpipe.maps import MapParams, build_map, write_map
    from embedpipe.provenance import Provenance
    from embedpipe.store import read_embeddings

    e = read_embeddings(emb)
    m = build_map(e.ids, e.labels, e.vectors, MapParams(method="pca"))
    if rename:
        m = replace(m, ids=np.array([rename.get(i, i) for i in m.ids], dtype=object))
    write_map(m, out, provenance=Provenance.from_json(e.meta))
    return m


@pytest.fixture(scope="module")
def map_client(served):
    m = _write_map(served / "emb", served / "map")
    app = create_app(ServeConfig(index=served / "idx", cache_dir=served / "thumbs", map=served / "map",
                                 allowed_hosts=HOSTS))
    with TestClient(app) as c:
        yield c, m


def test_the_map_api_serves_every_point_of_the_map(map_client):
    client, m = map_client
    r = client.get("/api/map")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    d = r.json()
    assert d["ids"] == list(m.ids)
    np.testing.assert_array_equal(d["x"], np.round(m.xy[:, 0].astype(float), 4))
    np.testing.assert_array_equal(d["y"], np.round(m.xy[:, 1].astype(float), 4))
    assert [d["label_names"][c] for c in d["labels"]] == list(m.labels)
    assert d["label_names"] == ["cats", "dogs"] and set(d["labels"]) == {0, 1}
    # built once: cacheable, revalidated by ETag, which /api/info names for the page's URL
    assert "max-age" in r.headers["cache-control"] and r.headers["etag"] == client.get("/api/info").json()["map"]
    assert client.get("/api/map", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    assert client.get("/api/map", headers={"Accept-Encoding": "identity"}).json() == d


def test_a_map_of_other_ids_is_refused_at_start(served, tmp_path):
    from embedpipe.errors import IndexInputError

    _write_map(served / "emb", tmp_path / "map", rename={"cats/001.jpg": "cats/999.jpg", "dogs/002.jpg": "x.jpg"})
    with pytest.raises(IndexInputError, match=r"2 of its 12 ids are not in the index \(e.g. '(cats/999|x)\.jpg'\)"):
        create_app(ServeConfig(index=served / "idx", cache_dir=served / "thumbs", map=tmp_path / "map"))
    result = CliRunner().invoke(main, ["serve", str(served / "idx"), "--map", str(tmp_path / "map"),
                                       "--cache-dir", str(tmp_path / "thumbs")])
    assert result.exit_code != 0 and "2 of its 12 ids are not in the index" in result.output


def test_without_a_map_there_is_no_map(client):
    r = client.get("/api/map")
    assert r.status_code == 404 and "--map" in r.json()["detail"]
    assert client.get("/api/info").json()["map"] is None


# --- a real server, a real browser -----------------------------------------------------


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """Real photographs, three views of each (folder = photo), embedded with the real
    ImageNet EfficientNet-Lite0 that installs from PyPI, in an exact index."""
    from PIL import ImageOps

    from embedpipe.images.samples import photo_folder

    root = tmp_path_factory.mktemp("photos")
    images = root / "images"
    for p in sorted(photo_folder(root / "src").rglob("*.jpg")):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        views = {"full": img, "crop": img.crop((w // 8, h // 8, w - w // 8, h - h // 8)),
                 "mirror": ImageOps.mirror(img)}
        for name, view in views.items():
            (images / p.stem).mkdir(parents=True, exist_ok=True)
            view.save(images / p.stem / f"{name}.jpg", quality=90)
    extract(ExtractConfig(source=images, out=root / "emb", backbone="efficientnet_lite0", workers=1))
    Index.build(embedding_blocks(root / "emb"), index="flat", embeddings_path=root / "emb").save(root / "idx")
    return root


@pytest.fixture(scope="module")
def live_server(photo_index):
    """The app under uvicorn on a free loopback port, in a thread of this process."""
    import uvicorn

    _write_map(photo_index / "emb", photo_index / "map")
    app = create_app(ServeConfig(index=photo_index / "idx", cache_dir=photo_index / "thumbs",
                                 map=photo_index / "map"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _thumbnails_loaded(page) -> None:
    """Every result image fetched and decoded (the page's CSP rules out wait_for_function's
    string evaluation, so: Playwright's own assertions, then one evaluate)."""
    from playwright.sync_api import expect

    images = page.locator("#results img")
    for i in range(images.count()):
        expect(images.nth(i)).to_have_js_property("complete", True)
    assert page.evaluate("() => [...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)")


@pytest.mark.slow
def test_the_page_in_a_real_browser(live_server, photo_index, tmp_path):
    sync_api = require("playwright.sync_api", "the browser test")
    with browser_page(live_server + "/") as (page, errors):
        sync_api.expect(page.locator("#info")).to_contain_text("24 images")
        page.fill("#k", "6")
        page.set_input_files("#file", str(photo_index / "images" / "chelsea" / "crop.jpg"))
        cards = page.locator("#results .card")
        sync_api.expect(cards).to_have_count(6)
        _thumbnails_loaded(page)
        first = cards.nth(0).get_attribute("data-id")
        assert first == "chelsea/crop.jpg"  # the upload is a copy of it
        assert [cards.nth(i).get_attribute("data-id").split("/")[0] for i in range(3)] == ["chelsea"] * 3

        target = cards.nth(4).get_attribute("data-id")
        cards.nth(4).click()
        sync_api.expect(page.locator("#status")).to_contain_text(f"neighbours of {target}")
        sync_api.expect(cards.nth(0)).to_have_attribute("data-id", target)
        sync_api.expect(cards).to_have_count(6)
        _thumbnails_loaded(page)
        page.wait_for_load_state("networkidle")  # nothing late may redraw the grid
        assert cards.nth(0).get_attribute("data-id") == target
        assert page.locator("#effort-row").is_hidden()  # an exact index has no effort knob
        shot = page.screenshot(full_page=True)

        # a file dropped on the drop zone, as a person drags one from their desktop
        page.evaluate(
            """(bytes) => {
              const dt = new DataTransfer();
              dt.items.add(new File([new Uint8Array(bytes)], "dropped.jpg", {type: "image/jpeg"}));
              document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""",
            list((photo_index / "images" / "coffee" / "mirror.jpg").read_bytes()),
        )
        sync_api.expect(page.locator("#status")).to_contain_text("neighbours of dropped.jpg")
        sync_api.expect(cards.nth(0)).to_have_attribute("data-id", "coffee/mirror.jpg")

        # a file that is no image: the server's reason, shown as an error, results kept
        notes = tmp_path / "notes.jpg"
        notes.write_text("shopping list")
        page.set_input_files("#file", str(notes))
        sync_api.expect(page.locator("#status")).to_contain_text("not_an_image")
        sync_api.expect(page.locator("#status")).to_have_class("error")
        sync_api.expect(cards).to_have_count(6)
        errors = [e for e in errors if "415" not in e]  # the browser logs the refused upload
        assert not errors, errors
    (tmp_path / "serve.png").write_bytes(shot)
    if os.environ.get("EMBEDPIPE_UPDATE_DOCS"):  # `make docs-images` refreshes the docs' copy
        (Path(__file__).parent.parent / "docs" / "images" / "serve.png").write_bytes(shot)


@pytest.mark.slow
def test_the_map_view_in_a_real_browser(live_server, photo_index, tmp_path):
    sync_api = require("playwright.sync_api", "the browser test")
    with browser_page(live_server + "/") as (page, errors):
        sync_api.expect(page.locator("#tab-map")).to_be_visible()
        page.fill("#k", "6")
        page.click("#tab-map")
        sync_api.expect(page.locator("#map-legend span")).to_have_count(8)  # the photos' folders
        page.wait_for_load_state("networkidle")
        page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
        assert page.evaluate("() => window.__embedpipeMap.ready()")
        drawn = page.evaluate("""() => {
          const c = document.getElementById("map");
          const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
          let n = 0;
          for (let i = 0; i < px.length; i += 4) if (px[i] < 250 || px[i + 1] < 250 || px[i + 2] < 250) n++;
          return n;
        }""")
        assert drawn > 24 * 9  # 24 points of 6x6 px, some overlapping

        # hover the point farthest from the others, so that none other is nearer the cursor
        where = page.evaluate("() => window.__embedpipeMap.ids().map((id) => [id, window.__embedpipeMap.screenOf(id)])")
        xy = np.array([[s["x"], s["y"]] for _, s in where])
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
        target, at = where[int(gaps.min(axis=1).argmax())]
        page.mouse.move(at["x"] + 1, at["y"] + 1)
        hover = page.locator("#map-hover")
        sync_api.expect(hover).to_be_visible()
        sync_api.expect(hover.locator(".caption")).to_contain_text(target)
        sync_api.expect(hover.locator(".caption")).to_contain_text(target.split("/")[0])  # its label
        thumb = hover.locator("img")
        sync_api.expect(thumb).to_have_attribute("src", "api/thumbnail?" + urlencode({"id": target, "size": 256}))
        sync_api.expect(thumb).to_have_js_property("complete", True)
        assert thumb.evaluate("(img) => img.naturalWidth") > 0
        assert page.locator("img").count() == 2  # the hover's one element (and the hidden query's)
        shot = page.screenshot(full_page=True)

        page.mouse.click(at["x"], at["y"])
        cards = page.locator("#results .card")
        sync_api.expect(page.locator("#map-view")).to_be_hidden()  # back to the results
        sync_api.expect(page.locator("#status")).to_contain_text(f"neighbours of {target}")
        sync_api.expect(cards).to_have_count(6)
        sync_api.expect(cards.nth(0)).to_have_attribute("data-id", target)
        _thumbnails_loaded(page)
        assert not errors, errors
    (tmp_path / "serve-map.png").write_bytes(shot)
    if os.environ.get("EMBEDPIPE_UPDATE_DOCS"):  # `make docs-images` refreshes the docs' copy
        (Path(__file__).parent.parent / "docs" / "images" / "serve-map.png").write_bytes(shot)


@pytest.mark.slow
def test_cli_serves_with_several_workers(served):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "embedpipe", "serve", str(served / "idx"),
                             "--port", str(port), "--workers", "2", "--cache-dir", str(served / "t2")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        r = httpx.get(f"http://127.0.0.1:{port}/api/search", params={"id": "dogs/001.jpg", "k": 3})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "dogs/001.jpg"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "serving" in out and '"route": "/api/search"' in out  # the JSON access log


def test_info_names_a_checkpoint_by_file_name_only():
    from embedpipe.provenance import WeightsInfo
    from embedpipe.serve import _public_weights

    w = {"kind": "checkpoint", "name": "/srv/models/r50-finetuned.pth", "sha256": "ab", "pretrained": True}
    assert _public_weights(WeightsInfo.from_dict(w)) == {**WeightsInfo.from_dict(w).to_dict(), "name": "r50-finetuned.pth"}
    tv = {"kind": "torchvision", "name": "ResNet50_Weights.IMAGENET1K_V2", "pretrained": True}
    assert _public_weights(WeightsInfo.from_dict(tv))["name"] == "ResNet50_Weights.IMAGENET1K_V2"
