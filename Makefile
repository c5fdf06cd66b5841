# The two commands of the README: `make demo` and `make test`. Both install what they
# need from this repository's own files into the current Python (use a venv if you like).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench clean

install:
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m embedpipe run pipelines/demo.toml
	@echo "report: demo-output/transfer/report.html  galleries: demo-output/gallery/"

test: install
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) benchmarks/extract.py

clean:
	rm -rf demo-output .pytest_cache build *.egg-info
