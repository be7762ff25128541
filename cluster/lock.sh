#!/usr/bin/env bash
# Regenerates the cluster image's Python lock files for Linux x86_64 / CPython 3.11 (cluster/Dockerfile):
#   cluster/requirements.lock  every package of pyproject.toml + the [gpu] extra + build tools, exact pins + sha256
#   cluster/deepspeed.lock     DeepSpeed alone (an sdist the image builds with its C++/CUDA ops after torch is in)
# The versions the test suite runs with win: the packages installed in $VENV (default .venv) are constraints
# (local labels such as +cpu dropped), so the image runs what CI tested. Needs PyPI; uv runs from a throwaway
# virtualenv, nothing is installed into .venv.
#   bash cluster/lock.sh        (the Makefile's `make lock`)
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION="${UV_VERSION:-0.13.9}"
VENV="${VENV:-.venv}"
INDEX_URL="${INDEX_URL:-https://pypi.org/simple}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/uv"
"$work/uv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
uv="$work/uv/bin/uv"

: > "$work/constraints.txt"
if [ -x "$VENV/bin/python" ]; then
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -E '^[A-Za-z0-9._-]+==' | sed -E 's/\+[A-Za-z0-9._]+$//' > "$work/constraints.txt"
fi
# Build tools, locked too: the Dockerfile builds DeepSpeed's sdist and the project with --no-build-isolation.
printf 'setuptools>=68\nwheel\n' > "$work/build-tools.in"

compile() {
  "$uv" pip compile --no-config --index-url "$INDEX_URL" --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --generate-hashes --no-annotate \
    --custom-compile-command "bash cluster/lock.sh" --constraint "$work/constraints.txt" --quiet "$@"
}

compile pyproject.toml "$work/build-tools.in" --extra gpu --no-emit-package deepspeed -o cluster/requirements.lock
compile pyproject.toml --extra gpu -o "$work/all.lock"
grep -E '^deepspeed==' "$work/all.lock" | sed -E 's/ .*//' > "$work/deepspeed.in"
compile "$work/deepspeed.in" --no-deps -o cluster/deepspeed.lock

echo "wrote cluster/requirements.lock ($(grep -cE '^[A-Za-z0-9]' cluster/requirements.lock) packages)" \
     "and cluster/deepspeed.lock ($(cat "$work/deepspeed.in"))"
