# m2y — quick start: `make demo`, then `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
ROOT ?= $(CURDIR)/demo/root
HOST ?= 127.0.0.1
PORT ?= 8642
META ?=
SIZE ?= 1GiB

.PHONY: install serve send demo test lint unit integration perf perf-gate clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,perf]'
	touch $(STAMP)

# Bytecode for our own packages, as a non-editable pip install would leave: an editable install
# compiles nothing, and with PYTHONDONTWRITEBYTECODE set (as on CI) every `m2y send` would
# compile engine/ again (~70 ms of its start-up). Only stale files are recompiled.
install: $(STAMP)
	@$(BIN)/python -m compileall -q engine cli >/dev/null

serve: install
	$(BIN)/m2y serve --root $(ROOT) --host $(HOST) --port $(PORT)

send: install
	@test -n "$(META)" || { echo "usage: make send META=path/to/file.meta [ROOT=...] [PORT=...]"; exit 2; }
	$(BIN)/m2y send $(META) --root $(ROOT) --host $(HOST) --port $(PORT)

# Two users, their keys exchanged, a sample file and its .meta, a server on a free
# loopback port, one send, a byte-for-byte check, the server stopped.
demo: install
	@set -euo pipefail; \
	root="$(CURDIR)/demo/root"; rm -rf "$(CURDIR)/demo"; mkdir -p "$$root"; \
	M2Y="$(BIN)/m2y"; \
	$$M2Y keygen zhenqiang --root "$$root"; \
	$$M2Y keygen roland-frei --root "$$root"; \
	cp "$$root/zhenqiang/pubKey/zhenqiang.data" "$$root/roland-frei/pubKey/"; \
	cp "$$root/roland-frei/pubKey/roland-frei.data" "$$root/zhenqiang/pubKey/"; \
	mkdir -p "$$root/zhenqiang/photo"; \
	head -c 20000000 /dev/urandom > "$$root/zhenqiang/photo/myfoto.jpg"; \
	$$M2Y meta "$$root/zhenqiang/photo/myfoto.jpg" --from zhenqiang --to roland-frei --folder photo --root "$$root"; \
	log="$(CURDIR)/demo/serve.log"; \
	$$M2Y serve --root "$$root" --port 0 > "$$log" 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT; \
	for i in $$(seq 100); do grep -q listening "$$log" && break; sleep 0.1; done; \
	port=$$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$$log" | head -n 1); \
	test -n "$$port" || { cat "$$log"; echo "demo: server did not start"; exit 1; }; \
	echo "demo: server on 127.0.0.1:$$port"; \
	$$M2Y send "$$root/zhenqiang/photo/myfoto.meta" --root "$$root" --port $$port; \
	received=$$(ls "$$root"/roland-frei/photo/zhenqiang_*.data); \
	cmp "$$root/zhenqiang/photo/myfoto.jpg" "$$received"; \
	kill $$pid; wait $$pid || true; trap - EXIT; \
	cat "$$log"; \
	echo "demo: OK — $$received is byte-for-byte the sent file"

lint: install
	$(BIN)/ruff check engine cli tests perf
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

test: lint
	$(BIN)/pytest -q tests

perf: install
	$(BIN)/python perf/primitives.py
	$(BIN)/python perf/transfer.py --size $(SIZE)
	$(BIN)/python perf/datapath.py --size $(SIZE)
	$(BIN)/python perf/receiver_parts.py --size $(SIZE) --json perf/results/receiver-parts.json
	$(BIN)/python perf/startup.py
	$(BIN)/python perf/scaling.py

# CI's perf regression gate: m2y/raw (both timed connect -> done) over 256 MiB, median of 3
# alternated rounds. Measured here: 0.62-0.67 at 256 MiB, 0.45-0.75 at 1 GiB on a busy or quiet
# host (README). The floor sits below the noise yet above what a real regression gives (crcmod put
# back on the hot path measured 0.10 here); one re-run absorbs a bad minute.
GATE ?= 0.35
PERF_GATE_RUN = $(BIN)/python perf/transfer.py --size 256MiB --rounds 3 --no-scp --gate $(GATE) --json perf/results/gate.json
perf-gate: install
	$(PERF_GATE_RUN) || { echo "perf gate: below the floor once; measuring again (shared, noisy machine)"; $(PERF_GATE_RUN); }

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .mypy_cache .ruff_cache
