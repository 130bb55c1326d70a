# gruflow — every target creates/reuses .venv itself; nothing relies on packages installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv tools demo test test-unit bench figures contract clean

venv: $(STAMP)

# pip keeps what is already installed (torch is several GB): re-run only when pyproject.toml changes.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed -e '.[test,plot]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/gruflow demo

# promtool for the deploy tests (Debian's prometheus package, unpacked into .cache/tools) and kcat for the
# unreadable-record tests (apt-get install as root, else unpacked into .cache/tools); neither ever fails
tools:
	bash deploy/tools/install-promtool.sh .cache/tools
	bash deploy/tools/install-kcat.sh .cache/tools

test: venv tools
	$(PY) -m pytest -q -ra

test-unit: venv
	$(PY) -m pytest -q -ra -m "not integration and not slow"

# the README's figures: the architecture (drawn from code) and the online-learning plot (a real run, ~4 min)
figures: venv
	$(PY) docs/figures/architecture.py docs/figures/architecture.svg
	$(VENV)/bin/gruflow experiment online ../shared/data/yoochoose_rsc15_100k --format session-rec --warmup-days 1 \
		--json --plot docs/figures/online-hr20.png

bench: venv
	mkdir -p out
	$(VENV)/bin/gruflow bench train ../shared/data/yoochoose_rsc15_100k/yoochoose-clicks-100k_train_full.txt --format session-rec --json | tee out/bench-train.json
	$(VENV)/bin/gruflow bench stream --json | tee out/bench-stream.json

# optional, not part of `make test`: the worker against the NEWEST faust-streaming, aiokafka, mode-streaming and
# prometheus-client on PyPI, in .cache/contract-venv (torch and the rest come from $(VENV) through a .pth).
# Runs tests/contract and worker integration tests; writes out/contract-report.{json,txt}; never fails on
# what breaks (docs/upgrading.md). CONTRACT_PRE=1 allows pre-releases; CONTRACT_PACKAGES / CONTRACT_TESTS
# choose other versions or tests.
contract: venv
	bash tests/contract/run_contract.sh $(VENV) .cache/contract-venv out

clean:
	rm -rf $(VENV) var out .pytest_cache
