#!/usr/bin/env bash
# `make contract`: gruflow's worker against the NEWEST faust-streaming, aiokafka, mode-streaming and
# prometheus-client on PyPI, in a venv of its own; reports what breaks and never fails the build.
#
#   run_contract.sh MAIN_VENV CONTRACT_VENV OUT_DIR
#
# The contract venv holds only those packages (and their dependencies, pytest): a .pth file appends the main
# venv's site-packages AFTER the contract venv's own, so torch, numpy, confluent-kafka... come from the main
# venv (no second torch download) while the newer framework packages win. The .pth is removed while pip runs,
# so that pip resolves the framework's dependency tree on its own and never touches the main venv.
#
# Knobs (environment): CONTRACT_PACKAGES  the pip requirements to test (default: the newest releases)
#                      CONTRACT_PRE=1     allow pre-releases (pip --pre)
#                      CONTRACT_TESTS     the integration tests to run besides tests/contract
set -u

abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
main_venv=$(abspath "${1:?main venv}")
contract_venv=$(abspath "${2:?contract venv}")
out=$(abspath "${3:?output dir}")
cd "$(dirname "$0")/../.." || exit 2  # the repo: tests and the stream package are found from here
packages=${CONTRACT_PACKAGES:-"faust-streaming[rocksdict] aiokafka mode-streaming prometheus-client"}
tests=${CONTRACT_TESTS:-"tests/integration/test_worker.py tests/integration/test_sinks.py tests/integration/test_worker_recovery.py tests/integration/test_worker_takeover.py"}
pre=${CONTRACT_PRE:-0}
pip_flags=(--upgrade --upgrade-strategy eager --disable-pip-version-check -q)
[ "$pre" = 1 ] && pip_flags+=(--pre)

main_py="$main_venv/bin/python"
if [ ! -x "$main_py" ]; then
    echo "contract: no main venv at $main_venv (run 'make venv' first)" >&2
    exit 2
fi
# the main venv's site-packages, computed (purelib and platlib may differ on some systems)
mapfile -t main_sites < <("$main_py" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u)

# a changed package list (or --pre) starts from an empty venv: pip never downgrades, so a venv that once held
# a pre-release would otherwise go on reporting it as "the newest"
spec="$packages|pre=$pre"
if [ -f "$contract_venv/.contract-spec" ] && [ "$(cat "$contract_venv/.contract-spec")" != "$spec" ]; then
    rm -rf "$contract_venv"
fi
if [ ! -x "$contract_venv/bin/python" ]; then
    # the main venv's interpreter makes a venv on the same base Python, so the main venv's torch wheels load
    "$main_py" -m venv "$contract_venv" || exit 2
fi
py="$contract_venv/bin/python"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pth="$site/zz-gruflow-main-venv.pth"
rm -f "$pth"
# shellcheck disable=SC2086 # the package list is split on purpose
if ! "$py" -m pip install "${pip_flags[@]}" $packages pytest pytest-timeout; then
    echo "contract: pip could not install: $packages" >&2
    mkdir -p "$out"
    printf '{"error": "pip could not install %s"}\n' "$packages" > "$out/contract-report.json"
    exit 0
fi
printf '%s\n' "${main_sites[@]}" > "$pth"
echo "$spec" > "$contract_venv/.contract-spec"

mkdir -p "$out"
rm -f "$out"/contract-*  # a run that dies early must not leave the previous run's results to be reported
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
report=tests/contract/report.py
"$py" "$report" versions --main-python "$main_py" --out "$out/contract-versions.json" || exit 0

# both suites run to the end; a failure is a finding, not a build failure
"$py" -m pytest -q -ra --tb=short -p no:cacheprovider --continue-on-collection-errors tests/contract \
    --junitxml="$out/contract-unit.xml" 2>&1 | tee "$out/contract-unit.log"
# a worker that cannot even import would only time out in every integration test: say why instead
if "$py" -c "import stream.worker.app, stream.worker.main" > "$out/contract-import.log" 2>&1; then
    rm -f "$out/contract-import.log"
    # shellcheck disable=SC2086
    "$py" -m pytest -q -ra --tb=short -p no:cacheprovider --continue-on-collection-errors $tests \
        --junitxml="$out/contract-integration.xml" 2>&1 | tee "$out/contract-integration.log"
else
    echo "contract: the worker does not import with these versions; integration tests not run:"
    tail -3 "$out/contract-import.log"
    echo "not run: the worker does not import with these versions" > "$out/contract-integration.log"
fi

"$py" "$report" summary --versions "$out/contract-versions.json" --import-log "$out/contract-import.log" \
    --junit "$out/contract-unit.xml" "$out/contract-integration.xml" \
    --json "$out/contract-report.json" --text "$out/contract-report.txt"
exit 0
