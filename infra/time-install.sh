#!/usr/bin/env bash
# Time the README's install as a new user runs it: a fresh clone of the committed HEAD, a fresh
# venv, then the README's install command (verbatim, without -q so pip's log can be checked).
# Fails if pip backtracks ("looking at multiple versions") or the install fails.
#
#   infra/time-install.sh [RUNS]                  # default 1 run; prints each run's wall time
#   PIP_NO_CACHE_DIR=1 infra/time-install.sh      # as on a machine whose pip cache is empty
#
# It times the committed HEAD: commit README.md, constraints.txt and pyproject.toml first.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
runs="${1:-1}"
echo "pip $(python3 -m pip --version | cut -d' ' -f2), Python $(python3 --version | cut -d' ' -f2), $(nproc) cores"

for run in $(seq "$runs"); do
    work="$(mktemp -d)"
    git clone -q "$repo" "$work/clone"
    cd "$work/clone"
    # The README's test command up to its install (the line .ci/run runs; tests/test_docs.py keeps them equal).
    install="$(grep -m1 -E '^python3 -m venv \.venv && .* && python -m pytest' README.md | sed -E 's/ && python -m pytest.*$//')"
    install="${install// -q / }"
    if [ "$run" = 1 ]; then echo "install: $install"; fi
    SECONDS=0
    if ! bash -c "$install" > "$work/install.log" 2>&1; then
        tail -20 "$work/install.log"
        echo "run $run: the install failed (log: $work/install.log)" >&2
        exit 1
    fi
    seconds=$SECONDS
    if grep -q "looking at multiple versions" "$work/install.log"; then
        grep "looking at multiple versions" "$work/install.log" >&2
        echo "run $run: pip backtracked (log: $work/install.log)" >&2
        exit 1
    fi
    packages=$(.venv/bin/pip list --format=freeze | wc -l)
    printf 'run %d: %d s (%d:%02d), %d packages, no backtracking; load average %s (this machine is shared)\n' \
        "$run" "$seconds" $((seconds / 60)) $((seconds % 60)) "$packages" "$(cut -d' ' -f1-3 /proc/loadavg)"
    cd "$repo"
    rm -rf "$work"
done
