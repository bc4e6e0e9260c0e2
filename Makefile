VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# Re-install only when the dependency ranges or the tested versions change, so `make setup` is quick once done.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Train the offline demo from scratch (an earlier demo run is moved aside), then label the val folder with its
# best checkpoint.
demo: setup
	$(VENV)/bin/imgjobs train -c configs/demo.yaml --fresh
	$(VENV)/bin/imgjobs label --checkpoint runs/demo --input data/hymenoptera/val --output runs/demo/labels --evaluate

# Everything, as CI runs it.
test: setup
	$(VENV)/bin/pytest

# The edit loop: the tests that start no Ray (a test there that starts one fails), in a few minutes.
test-fast: setup
	$(VENV)/bin/pytest --fast

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/label_throughput.py

clean:
	rm -rf runs .pytest_cache
