"""A bounded load test of `embedpipe serve` on loopback: latency percentiles and requests/s.

    python benchmarks/serve.py                             # 30 s, 8 clients: the docs' run
    python benchmarks/serve.py --seconds 5 --clients 2     # a smoke run

Builds (once, cached) an exact index over 400 real photographs embedded with the
ImageNet EfficientNet-Lite0 that installs from PyPI, starts `embedpipe serve` in its own
process, and runs ``--clients`` concurrent clients for ``--seconds``. Each client loops
over a fixed mix: search by id (k=10), a 256 px thumbnail, and every fifth request a
search by upload (a 640x480 JPEG). Prints p50/p99 latency per kind and overall,
requests/s and the number of errors (any non-200 answer or failed connection). Run it
alone: the server and the clients share the machine's cores.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from extract import CACHE, make_photos
from PIL import Image

from embedpipe.config import ExtractConfig
from embedpipe.extraction import extract
from embedpipe.index import Index, embedding_blocks


def build_index(n: int) -> Path:
    root = CACHE / f"serve-{n}"
    if not (root / "idx" / "index.json").exists():
        photos = make_photos(CACHE / f"photos-{n}", n)
        extract(ExtractConfig(source=photos, out=root / "emb", backbone="efficientnet_lite0", overwrite=True))
        Index.build(embedding_blocks(root / "emb"), index="flat", embeddings_path=root / "emb").save(
            root / "idx", overwrite=True
        )
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="server processes (embedpipe serve --workers)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    root = build_index(args.images)
    photos = CACHE / f"photos-{args.images}"
    id_list = sorted(p.name for p in photos.glob("*.jpg"))  # a flat folder: ids are file names
    upload = io.BytesIO()
    Image.open(photos / id_list[0]).convert("RGB").resize((640, 480)).save(upload, "JPEG")

    port = free_port()
    server_log = open(root / "server.log", "w")  # the access log: one JSON line per request
    server = subprocess.Popen(
        [sys.executable, "-m", "embedpipe", "-q", "serve", str(root / "idx"), "--port", str(port),
         "--cache-dir", str(root / "thumbs"), "--workers", str(args.workers)],
        stdout=server_log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the server did not start; see {root / 'server.log'}")
            time.sleep(0.2)

        latencies: dict[str, list[float]] = {"search_id": [], "thumbnail": [], "search_upload": []}
        errors: list[str] = []
        lock = threading.Lock()
        stop = time.monotonic() + args.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            kinds = itertools.cycle(["search_id", "thumbnail", "search_id", "thumbnail", "search_upload"])
            with httpx.Client(base_url=base, timeout=30) as c:
                while time.monotonic() < stop:
                    kind = next(kinds)
                    image_id = rng.choice(id_list)
                    t = time.perf_counter()
                    try:
                        if kind == "search_id":
                            r = c.get("/api/search", params={"id": image_id, "k": 10})
                        elif kind == "thumbnail":
                            r = c.get("/api/thumbnail", params={"id": image_id, "size": 256})
                        else:
                            r = c.post("/api/search", params={"k": 10},
                                       files={"image": ("q.jpg", upload.getvalue(), "image/jpeg")})
                        ok = r.status_code == 200
                        detail = f"{kind} {r.status_code}"
                    except httpx.HTTPError as e:
                        ok, detail = False, f"{kind} {type(e).__name__}"
                    seconds = time.perf_counter() - t
                    with lock:
                        latencies[kind].append(seconds)
                        if not ok:
                            errors.append(detail)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
        server_log.close()

    every = [x for v in latencies.values() for x in v]
    print(f"{args.clients} clients for {args.seconds:g} s on loopback; index: {args.images} photos, "
          f"efficientnet_lite0, Flat; server: {args.workers} process(es)")
    print(f"{'request':<15}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}")
    result = {}
    for kind, values in [*latencies.items(), ("all", every)]:
        if values:
            p50, p99 = percentile(values, 50) * 1000, percentile(values, 99) * 1000
            result[kind] = {"count": len(values), "p50_ms": p50, "p99_ms": p99}
            print(f"{kind:<15}{len(values):>7}{p50:>9.1f}{p99:>9.1f}")
    print(f"requests/s: {len(every) / wall:.1f}; errors: {len(errors)} {sorted(set(errors))[:5]}")
    if args.json:
        args.json.write_text(json.dumps({"latency": result, "requests_per_s": len(every) / wall,
                                         "errors": len(errors)}, indent=2))


if __name__ == "__main__":
    main()
