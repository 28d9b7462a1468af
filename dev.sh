#!/usr/bin/env bash
# Entry point for a fresh machine: creates .venv with everything tvmrpc and its
# tests need (once), then runs what you ask for.
#   ./dev.sh demo   - tracker, proxy and servers, a stock client runs a compiled model
#   ./dev.sh test   - ruff, then the test suite (what CI runs)
#   ./dev.sh bench  - side-by-side benchmarks against stock TVM
#   ./dev.sh lint   - ruff
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TVMRPC_VENV:-.venv}
stamp="$VENV/.tvmrpc-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # pip warns about mirror locations this machine does not have; keep real errors.
  "$VENV/bin/python" -m pip install -q --config-settings editable_mode=compat -e '.[test,dev,tvm,websocket]' 2>&1 \
    | grep -vE '^WARNING: Location|BuildBackendWarning|^ +(!!|\*+|Please be careful|name as your|with strategy)|^ *$' || true
  "$VENV/bin/python" -c 'import tvmrpc, tvm, twisted, pytest_twisted'
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
lint() { ruff check tvmrpc twisted crossbuild tests bench; }
cmd=${1:-test}
shift || true
case "$cmd" in
  demo)  exec tvmrpc demo "$@" ;;
  test)  lint && exec python -m pytest "$@" ;;
  bench) exec python -m bench "$@" ;;
  lint)  lint ;;
  *) echo "usage: $0 {demo|test|bench|lint} [args]" >&2; exit 2 ;;
esac
