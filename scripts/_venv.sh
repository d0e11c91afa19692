# Shared by scripts/run and scripts/test: a project virtualenv in .venv,
# (re)installed when pyproject.toml changes.

ensure_venv() {
  local extras="$1"
  local python="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv with $($python --version 2>&1)"
    "$python" -m venv .venv
  fi
  local stamp=".venv/.installed${extras//[^a-z]/-}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "Installing securetcp${extras} into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".${extras}"
    touch "$stamp"
  fi
}

# Real peers the integration tests talk to. Installed with apt-get when
# missing and we are root (as on CI); otherwise those tests skip.
ensure_system_tools() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v gnutls-cli >/dev/null || missing+=(gnutls-bin)
  command -v curl >/dev/null || missing+=(curl)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "Installing ${missing[*]} with apt-get"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "warning: ${missing[*]} not installed; tests that need them will skip" >&2
    fi
  fi
}
