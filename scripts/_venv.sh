# Shared by scripts/run, scripts/test, scripts/fuzz and scripts/soak: project
# virtualenvs, (re)installed when pyproject.toml changes.
#   ensure_venv EXTRAS [VENV_DIR [PYTHON]]
# EXTRAS is e.g. "" or "[test]"; VENV_DIR defaults to .venv, PYTHON to
# $PYTHON or python3.

ensure_venv() {
  local extras="$1"
  local venv="${2:-.venv}"
  local python="${3:-${PYTHON:-python3}}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "Creating $venv with $($python --version 2>&1)"
    "$python" -m venv "$venv" || return 1
  fi
  # Keep extra venvs (.venv-3.X) out of git without touching .gitignore.
  [ -f "$venv/.gitignore" ] || echo '*' >"$venv/.gitignore"
  local stamp="$venv/.installed${extras//[^a-z]/-}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "Installing securetcp${extras} into $venv"
    # Explicit returns: callers may run this where `set -e` does not apply.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip \
      || return 1
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".${extras}" \
      || return 1
    touch "$stamp"
  fi
}

# An optional extra package (atheris for fuzzing): installed once per venv when
# it can be; a marker file remembers a failure so it is not retried every run.
# Returns 0 when the module imports.
ensure_optional() {
  local venv="$1" requirement="$2" module="$3"
  if "$venv/bin/python" -c "import $module" 2>/dev/null; then
    return 0
  fi
  local marker="$venv/.unavailable-$module"
  if [ -f "$marker" ] && [ ! pyproject.toml -nt "$marker" ]; then
    return 1
  fi
  echo "Installing $requirement into $venv"
  if "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --prefer-binary \
      "$requirement" \
      >"$marker.log" 2>&1; then
    rm -f "$marker" "$marker.log"
    return 0
  fi
  echo "note: $requirement does not install for $("$venv/bin/python" -V 2>&1)" \
    "(see $marker.log); its tests will skip" >&2
  touch "$marker"
  return 1
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
