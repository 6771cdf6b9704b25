# skillfold: `make demo` runs the main job, `make test` passes the tests. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# These machines keep a CPU build of torch 2.13.0 on local disk; pinning it keeps pip from pulling a
# multi-GB CUDA build. Elsewhere: make install TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check --no-input

.PHONY: install model vllm test unit integration demo bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,plots]"
	$(BIN)/python -c "from engines import small_linear as k; print('small-batch decode kernel:', 'built' if k.available() else 'not here (decoding uses oneDNN/MKL)')"
	@# the twx:<game> families run TextWorldExpress in a Java 17 VM: a warning with the fix where there is none
	$(BIN)/python -c "from envs.textworld_express import java_status; print(java_status())"
	touch $@

model: install
	$(BIN)/skillfold models pull

# vLLM in its own venv under the skillfold cache (it pins its own torch and transformers); the vLLM
# engine's integration tests start servers from it
vllm: install
	$(BIN)/skillfold serve --install-only

test: install model vllm
	$(BIN)/python -m pytest -q tests

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install model vllm
	$(BIN)/python -m pytest -q tests/integration

demo: install model
	$(BIN)/skillfold demo

bench: install model
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_turns.py
	$(BIN)/python benchmarks/bench_linear.py
	$(BIN)/python benchmarks/bench_memory.py 10000
	$(BIN)/python benchmarks/bench_memory.py 100000
	$(BIN)/python benchmarks/bench_fast.py
	$(BIN)/python benchmarks/bench_fold.py
	$(BIN)/python benchmarks/bench_concurrency.py
	$(BIN)/python benchmarks/bench_ui.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
