# `make demo` and `make test` each create .venv, install memkit into it and run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memkit-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	@# Without a GPU, take the local CPU build of torch first: a bare `torch`
	@# requirement would otherwise pull a multi-GB CUDA build.
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m memkit demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m memkit bench memory --chunks 256 --plot docs/img/bench_memory.png --overwrite
	$(PY) -m memkit bench stream --threads 2 --out docs/results --overwrite

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
