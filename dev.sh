#!/usr/bin/env bash
# Entry point for a fresh machine: creates .venv with everything tvmrpc and its
# tests need (once), then runs what you ask for.
#   ./dev.sh demo   - tracker, proxy and servers, a stock client runs a compiled model
#   ./dev.sh test   - system packages (as root), ruff, then the test suite (what CI runs)
#   ./dev.sh bench  - side-by-side benchmarks against stock TVM
#   ./dev.sh lint   - ruff check, ruff format --check, mypy (CI runs it before the tests)
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
# System packages the tests use (Debian). As root (CI, a fresh lab host) they are
# installed when missing; otherwise the apt-get line to run is printed.
system_packages() {
  local need=()
  command -v ip >/dev/null || need+=(iproute2)           # network namespaces (topology, board)
  command -v cc >/dev/null || need+=(gcc)                # a runtime stand-in with a missing dependency
  command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)  # crossbuild
  command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
  # The emulated aarch64 board: qemu-user-static and its binfmt.d file, mmdebstrap for its
  # root filesystem, arch-test (mmdebstrap's foreign-architecture check). The test registers
  # the binfmt handler itself (no binfmt-support).
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  command -v arch-test >/dev/null || need+=(arch-test)
  command -v systemd-analyze >/dev/null || need+=(systemd)  # unit checks, socket activation
  command -v chromium >/dev/null || need+=(chromium)        # the status page test (headless)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "dev.sh: tests that need ${need[*]} will fail or skip; install them with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
  fi
}
lint() {
  local paths=(tvmrpc twisted crossbuild tests bench)
  ruff check "${paths[@]}" && ruff format --check --quiet "${paths[@]}" && mypy
}
cmd=${1:-test}
shift || true
case "$cmd" in
  demo)  exec tvmrpc demo "$@" ;;
  test)  system_packages && lint && exec python -m pytest "$@" ;;
  bench) exec python -m bench "$@" ;;
  lint)  lint ;;
  *) echo "usage: $0 {demo|test|bench|lint} [args]" >&2; exit 2 ;;
esac
