"""The search service: its answers against `embedpipe search`, and every bad input -> 4xx."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from embedpipe.cli import main
from embedpipe.config import ExtractConfig
from embedpipe.extraction import extract
from embedpipe.index import Index, embedding_blocks
from embedpipe.serve import ServeConfig, create_app


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
def client(served):
    app = create_app(ServeConfig(index=served / "idx", cache_dir=served / "thumbs", max_k=20,
                                 max_upload_bytes=200_000, max_pixels=1_000_000))
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


@pytest.mark.parametrize("image_id", [
    "../emb/_embedpipe.json", "cats/../../emb/_embedpipe.json", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/etc/passwd", "cats/000.jpg\x00.png", "C:\\Windows\\win.ini", "cats", "", "x" * 5000,
])
def test_path_traversal_and_unknown_ids_are_refused(client, image_id):
    for route in ("/api/thumbnail", "/api/search"):
        r = client.get(route, params={"id": image_id})
        assert 400 <= r.status_code < 500, (route, image_id, r.status_code)
    # the same, URL-encoded by hand rather than by the client
    r = client.get("/api/thumbnail?id=" + image_id.replace("/", "%2F").replace("\x00", "%00"))
    assert 400 <= r.status_code < 500


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
    app = create_app(ServeConfig(index=served / "idx", images=images, cache_dir=tmp_path / "thumbs"))
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
        "huge": (b"\xff" * 300_000, 413),  # over the 200 kB upload cap
        "truncated": (make_image(tmp_path / "t.jpg", size=(200, 150)).read_bytes()[:500], 400),
    }
    for name, (data, status) in cases.items():
        r = client.post("/api/search", files={"image": (name, data)})
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["detail"], name
    assert client.post("/api/search").status_code == 422  # no file at all


def test_wrong_methods_are_405(client):
    assert client.put("/api/search", params={"id": "cats/000.jpg"}).status_code == 405
    assert client.delete("/api/thumbnail", params={"id": "cats/000.jpg"}).status_code == 405
    assert client.post("/api/info").status_code == 405


def test_concurrent_searches_get_the_effort_each_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(32, 24)).astype(np.float32)
    x = centers[rng.integers(0, 32, 4000)] + 0.7 * rng.normal(size=(4000, 24)).astype(np.float32)
    index = Index.build(x, metric="l2", index="IVF64,Flat")
    index.save(tmp_path / "idx")
    (tmp_path / "images").mkdir()
    app = create_app(ServeConfig(index=tmp_path / "idx", images=tmp_path / "images"))
    queries = [str(i) for i in range(0, 4000, 97)]
    with TestClient(app) as c:
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


def test_the_core_never_imports_the_web_stack():
    code = ("import sys, embedpipe.extraction.forward, embedpipe.index, embedpipe.pipeline, embedpipe.cli; "
            "bad = {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_says_how_to_install_it():
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "try:\n    import embedpipe.serve\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "embedpipe[serve]"' in r.stdout


def test_cli_serve_defaults_to_loopback():
    from embedpipe.cli.serve import serve

    host = next(p for p in serve.params if p.name == "host")
    assert host.default == "127.0.0.1"


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
    import time

    import uvicorn

    app = create_app(ServeConfig(index=photo_index / "idx", cache_dir=photo_index / "thumbs"))
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


def _chromium() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Chromium is not installed: `make browser` (Debian's chromium package)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it; a missing browser there is a broken setup
        pytest.skip(message)
    return path


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
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    # these machines have no network: keep Chromium from trying (see the env notes)
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))  # CSP too
            page.goto(live_server + "/")
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
        finally:
            browser.close()
    (tmp_path / "serve.png").write_bytes(shot)
    if os.environ.get("EMBEDPIPE_UPDATE_DOCS"):  # `make docs-images` refreshes the docs' copy
        (Path(__file__).parent.parent / "docs" / "images" / "serve.png").write_bytes(shot)


@pytest.mark.slow
def test_cli_serves_with_several_workers(served):
    import socket
    import time

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
