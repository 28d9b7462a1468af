#!/bin/sh
# Install this tvmrpc server bundle (@TARGET@, Python @PYTHON@) offline.
#   ./install.sh [--prefix DIR] [--python PYTHON] [--venv | --plain]
# --venv (default when `python -m venv` works): a virtualenv in PREFIX/venv,
#        filled by pip from ./wheels with no index.
# --plain: no venv, no pip: the wheels are unpacked into PREFIX/site-packages,
#        which the launcher puts on PYTHONPATH.
# PREFIX defaults to this directory. Then: PREFIX/bin/tvm-server --key K --tracker H:P
set -eu
HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
PREFIX=$HERE
PY=python@PYTHON@
command -v "$PY" >/dev/null 2>&1 || PY=python3
MODE=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --venv) MODE=venv; shift ;;
    --plain) MODE=plain; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
  echo "install.sh: cannot run $PY; pass --python" >&2; exit 1; }
if [ "$have" != "@PYTHON@" ]; then
  echo "install.sh: $PY is Python $have but this bundle's wheels are for @PYTHON@; pass --python" >&2
  exit 1
fi
if [ -z "$MODE" ]; then
  if "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then MODE=venv; else MODE=plain; fi
fi
mkdir -p "$PREFIX"
PREFIX=$(CDPATH= cd -- "$PREFIX" && pwd)
if [ "$PREFIX" != "$HERE" ]; then
  mkdir -p "$PREFIX/bin" "$PREFIX/lib" "$PREFIX/systemd"
  cp "$HERE/bin/tvm-server" "$PREFIX/bin/"
  cp "$HERE"/lib/* "$PREFIX/lib/"
  cp "$HERE/systemd/tvm-server.env" "$PREFIX/systemd/"
fi
if [ "$MODE" = venv ]; then
  rm -rf "$PREFIX/site-packages" "$PREFIX/bin/.python"
  "$PY" -m venv "$PREFIX/venv"
  # Offline: no index, no user or site pip configuration.
  PIP_CONFIG_FILE=/dev/null "$PREFIX/venv/bin/python" -m pip install -q --no-index \
    --disable-pip-version-check --no-warn-script-location --force-reinstall \
    --find-links "$HERE/wheels" @REQUIREMENTS@
else
  # A wheel is a zip file: unpack it, then move any *.data/{purelib,platlib} into place.
  rm -rf "$PREFIX/site-packages" "$PREFIX/venv"
  "$PY" - "$HERE/wheels" "$PREFIX/site-packages" <<'PYEOF'
import pathlib, shutil, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
site.mkdir(parents=True, exist_ok=True)
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
for data in site.glob("*.data"):
    for kind in ("purelib", "platlib"):
        if (data / kind).is_dir():
            shutil.copytree(data / kind, site, dirs_exist_ok=True)
    shutil.rmtree(data)
PYEOF
  # The launcher runs the Python the packages were installed for.
  "$PY" -c 'import sys; print(sys.executable)' > "$PREFIX/bin/.python"
fi
sed "s|@PREFIX@|$PREFIX|g" "$HERE/systemd/tvm-server@.service.in" > "$PREFIX/systemd/tvm-server@.service"
# Write Twisted's plugin cache now, as the installing user: the unit's unprivileged
# dynamic user cannot, and twistd would warn "Unable to write to plugin cache" at every start.
if [ "$MODE" = venv ]; then CACHE_PY="$PREFIX/venv/bin/python"; else CACHE_PY=$PY; fi
PYTHONPATH="$PREFIX/site-packages" "$CACHE_PY" -c \
  'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' >/dev/null 2>&1 \
  || echo "install.sh: could not write Twisted's plugin cache; see docs/operations.md" >&2
chmod 755 "$PREFIX/bin/tvm-server"
echo "installed ($MODE) in $PREFIX"
echo "run:     $PREFIX/bin/tvm-server --key KEY --tracker HOST:PORT"
echo "systemd: cp $PREFIX/systemd/tvm-server@.service /etc/systemd/system/"
echo "         mkdir -p /etc/tvmrpc && cp $PREFIX/systemd/tvm-server.env /etc/tvmrpc/KEY.env"
echo "         systemctl enable --now tvm-server@KEY"
