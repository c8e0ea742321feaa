#!/usr/bin/env bash
# Install what tests/services.py needs to start real storage servers on loopback:
#   * Debian packages: xrootd (server + client), gfal2 (Python bindings, plugins, gfal-* CLI),
#     davix, bubblewrap, curl;
#   * two venvs for Rucio under .ci/venvs/ (not tracked by git):
#       rucio-server   rucio==41.* + gunicorn     (TXPILOT_RUCIO_SERVER_VENV overrides the path)
#       rucio-clients  rucio-clients==41.*        (TXPILOT_RUCIO_CLIENT_VENV overrides the path)
#     with Debian's gfal2 bindings linked into rucio-clients (Rucio's davs:// impl imports gfal2;
#     PyPI's gfal2-python does not build against Debian 12's libgfal2).
# moto_server and fake-gcs-server come with the project's `test` extra, not from here.
#
# Idempotent: run it again at any time; finished steps are only checked. Runs as root, or as a
# user with sudo (used for apt-get only; the venvs belong to the caller). One line per step;
# exits non-zero with a message naming the failed step.
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVER_VENV=${TXPILOT_RUCIO_SERVER_VENV:-$HERE/venvs/rucio-server}
CLIENT_VENV=${TXPILOT_RUCIO_CLIENT_VENV:-$HERE/venvs/rucio-clients}
PYTHON=${PYTHON:-python3}
RUCIO_SERIES=41
APT_PACKAGES="xrootd-server xrootd-client python3-gfal2 gfal2-plugin-file gfal2-plugin-xrootd
  gfal2-plugin-http gfal2-util-scripts python3-gfal2-util davix bubblewrap curl
  ca-certificates python3 python3-venv"

started=$SECONDS
step() { echo "== [install-services] $*"; }
fail() {
  echo "install-services: FAILED: $*" >&2
  exit 1
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || fail "not root and no sudo: cannot apt-get install"
  SUDO="sudo"
fi

# -- Debian packages ------------------------------------------------------------------------------
# shellcheck disable=SC2086  # the package list is split on purpose
step "apt packages: $(echo $APT_PACKAGES)"
apt_log=$(mktemp)
trap 'rm -f "$apt_log"' EXIT
apt_install() {
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -q --no-install-recommends $APT_PACKAGES >"$apt_log" 2>&1
}
if ! apt_install; then
  step "apt-get install failed; running apt-get update and retrying"
  $SUDO apt-get update -q >>"$apt_log" 2>&1 || { tail -n 20 "$apt_log" >&2; fail "apt-get update"; }
  apt_install || { tail -n 20 "$apt_log" >&2; fail "apt-get install $APT_PACKAGES"; }
fi
for tool in xrootd xrdcp xrdfs gfal-copy gfal-sum davix-get bwrap curl /usr/bin/python3; do
  command -v "$tool" >/dev/null || fail "$tool missing after apt-get install"
done
/usr/bin/python3 -c 'import gfal2, gfal2_util' 2>/dev/null \
  || fail "Debian's /usr/bin/python3 cannot import gfal2 and gfal2_util"

# -- Rucio venvs ----------------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH"

# has_dist VENV DIST: the venv's Python runs and has DIST of the wanted release series installed.
has_dist() {
  "$1/bin/python" - "$2" "$RUCIO_SERIES" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    ok = version(sys.argv[1]).split(".")[0] == sys.argv[2]
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}

# make_venv PYTHON VENV: (re)create VENV unless its interpreter works.
make_venv() {
  if "$2/bin/python" -c 'import sys' 2>/dev/null; then
    return 0
  fi
  rm -rf "$2"
  mkdir -p "$(dirname "$2")" || fail "cannot create $(dirname "$2")"
  "$1" -m venv "$2" || fail "$1 -m venv $2 (on Debian: apt-get install python3-venv)"
}

# pip_install VENV REQUIREMENT...: quiet pip install, showing pip's output only when it fails.
pip_install() {
  local venv=$1 log
  shift
  log=$(mktemp)
  if ! "$venv/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    rm -f "$log"
    fail "pip install $* into $venv"
  fi
  rm -f "$log"
}

step "rucio-server venv: $SERVER_VENV (rucio==$RUCIO_SERIES.*, gunicorn)"
make_venv "$PYTHON" "$SERVER_VENV"
if has_dist "$SERVER_VENV" rucio && "$SERVER_VENV/bin/python" -c 'import gunicorn' 2>/dev/null; then
  step "rucio-server venv: already installed"
else
  pip_install "$SERVER_VENV" "rucio==$RUCIO_SERIES.*" gunicorn
fi
[ -x "$SERVER_VENV/bin/gunicorn" ] || fail "$SERVER_VENV/bin/gunicorn missing"
[ -f "$SERVER_VENV/rucio/tools/reset_database.py" ] || fail "$SERVER_VENV/rucio/tools/reset_database.py missing"

# Debian ships gfal2's bindings for its own Python only (one .so, e.g. cpython-311): the client venv
# must run that same Python version for the link below to work. Prefer $PYTHON, else Debian's.
GFAL2_SO=$(/usr/bin/python3 -c 'import gfal2; print(gfal2.__file__)') || fail "locating gfal2's .so"
so_suffix=${GFAL2_SO##*/gfal2}
client_python=$PYTHON
if [ "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" != "$so_suffix" ]; then
  client_python=/usr/bin/python3
  step "note: $PYTHON cannot load $GFAL2_SO; rucio-clients venv uses $client_python"
fi
if [ -x "$CLIENT_VENV/bin/python" ] &&
  [ "$("$CLIENT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)" != "$so_suffix" ]; then
  step "rucio-clients venv: its Python cannot load $GFAL2_SO; recreating it"
  rm -rf "$CLIENT_VENV"
fi

step "rucio-clients venv: $CLIENT_VENV (rucio-clients==$RUCIO_SERIES.*)"
make_venv "$client_python" "$CLIENT_VENV"
if has_dist "$CLIENT_VENV" rucio-clients; then
  step "rucio-clients venv: already installed"
else
  pip_install "$CLIENT_VENV" "rucio-clients==$RUCIO_SERIES.*"
fi
[ -x "$CLIENT_VENV/bin/rucio" ] || fail "$CLIENT_VENV/bin/rucio missing"

step "rucio-clients venv: link Debian's gfal2 bindings ($GFAL2_SO)"
platlib=$("$CLIENT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])') \
  || fail "asking $CLIENT_VENV/bin/python for its site-packages"
ln -sfn "$GFAL2_SO" "$platlib/$(basename "$GFAL2_SO")" || fail "linking $GFAL2_SO into $platlib"
"$CLIENT_VENV/bin/python" -c 'import gfal2, rucio.rse.protocols.gfal' 2>/dev/null \
  || fail "$CLIENT_VENV/bin/python cannot import gfal2 and rucio.rse.protocols.gfal"

step "done in $((SECONDS - started)) s"
