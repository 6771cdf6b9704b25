# skillfold: `make demo` runs the main job, `make test` passes the tests. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# These machines keep a CPU build of torch 2.13.0 on local disk; pinning it keeps pip from pulling a
# multi-GB CUDA build. Elsewhere: make install TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check --no-input

.PHONY: install model vllm test unit integration demo bench lint clean gpu-wheels

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

# The wheels benchmarks/gpu_check.py needs on the lent GPU machine beyond its image (Python 3.12, no
# registry there): skillfold's records (pydantic) and TRL's SDFTTrainer with its datasets. They travel in
# .whl (ignored) as the device tool's `carry`; docs/benchmarks.md ("GPU") has the command that uses them.
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
