VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-install only when the dependency list changes, so `make setup` is quick once done.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/imgjobs train -c configs/demo.yaml

test: setup
	$(VENV)/bin/pytest

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
