# Two commands on a fresh machine (Python 3.11+ and a C compiler):
#   make sim    set up, then run the whole pipeline on the simulated bus
#   make test   set up, then run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MicroPython's WebAssembly port, to run the kit codec as a kit would (tests/test_kit_micropython.py).
MPY_WASM := @micropython/micropython-webassembly-pyscript
MPY_WASM_VERSION := 1.27.0

.PHONY: setup sim test lint bench bench-load soak sanitize vm-bench vm-bench-arm64

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm not found: the MicroPython codec test will be skipped"; \
	elif [ ! -f $(VENV)/micropython/node_modules/$(MPY_WASM)/micropython.mjs ]; then \
		npm install --silent --no-audit --no-fund --prefix $(VENV)/micropython \
			$(MPY_WASM)@$(MPY_WASM_VERSION) \
		|| echo "could not install $(MPY_WASM): the MicroPython codec test will be skipped"; \
	fi

sim: setup
	$(BIN)/cngmrv sim

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy agent drivers native signed office sim
	# The kit codec again, against MicroPython's stdlib stubs (mypy-micropython.ini).
	$(BIN)/mypy --config-file mypy-micropython.ini \
		--custom-typeshed-dir "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

bench: setup
	$(BIN)/python bench/integrator.py
	$(BIN)/python bench/kit_throughput.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/store_writes.py
	$(BIN)/python bench/service_stop.py
	$(BIN)/python bench/signers.py

# The agent in its own process on a saturated bus (docs/performance.md): about
# 22 minutes for both bit rates, then an hour's soak.  Both install the agent
# into .venv-agent first, as a bus would have it.
bench-load: setup
	$(BIN)/python bench/full_load.py

soak: setup
	$(BIN)/python bench/soak.py

# The integrator core under AddressSanitizer + UndefinedBehaviorSanitizer:
# its tests against a sanitized build in a temporary folder, then a standalone
# C driver with leak detection (tests/sanitize_native.py).
sanitize: setup
	$(BIN)/python tests/sanitize_native.py

# The virtual bench (docs/hil-runbook.md): a Debian guest under qemu (TCG) with a
# kernel vcan0 and systemd, the project installed as docs/deploy-pi.md says, and
# hil_tests run in it.  Needs root and the Debian packages qemu-system-x86,
# qemu-utils, mmdebstrap and e2fsprogs; the image is cached in ~/.cache/cngmrv/vm.
# Prints one JSON object; fails when a stage or a guest test does.
vm-bench: setup
	$(BIN)/python bench/vm_bench.py --json

# The arm64 smoke (docs/hil-runbook.md): an arm64 Debian guest (qemu-system-aarch64
# -M virt, Cortex-A72, TCG) builds the cffi extension with its own compiler and runs
# cngmrv sim, verify and replay and the C integrator's tests.  Needs, beyond vm-bench's,
# the Debian packages qemu-system-arm, qemu-user-static and binfmt-support (the image build).
vm-bench-arm64: setup
	$(BIN)/python bench/vm_bench.py --json --arch arm64
