# Two commands a new user needs: `make run` and `make test`. Everything else is optional.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASTION_PORT ?= 8080

.PHONY: run test lint bench clean

$(BIN)/bastion: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

run: $(BIN)/bastion
	$(BIN)/bastion demo --port $(BASTION_PORT)

test: $(BIN)/bastion
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@# pytest exits 5 when it collected nothing: a failure, never a pass
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo 'no tests collected' >&2; exit 1; fi; exit $$rc

lint: $(BIN)/bastion
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(BIN)/bastion
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .bastion *.egg-info .pytest_cache .mypy_cache .ruff_cache
