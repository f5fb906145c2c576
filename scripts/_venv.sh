# Sourced by scripts/run and scripts/test: make .venv and install the project into it.
# Installs again only when pyproject.toml changed since the last install, so later runs are quick.
# The argument names the extra: none (the client), server, dev (scripts/run) or test.
# pip's chatter goes to .venv/install.log and is shown only when the install fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${1:-}"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "exchange needs Python 3.11 or newer (tried: $py; set PYTHON to another interpreter)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
hash="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
stamp="$venv/.installed-$hash${extras:+-$extras}"
# Each extra includes the ones before it (test ⊃ dev ⊃ server ⊃ the client install), so an
# install with a later extra satisfies a run that needs an earlier one.
rank() { case "$1" in "") echo 0 ;; server) echo 1 ;; dev) echo 2 ;; test) echo 3 ;; *) echo 9 ;; esac; }
for found in "$venv"/.installed-"$hash"*; do
  [ -e "$found" ] || continue
  have="${found#"$venv/.installed-$hash"}"
  have="${have#-}"
  if [ "$(rank "$have")" -ge "$(rank "$extras")" ] && [ "$(rank "$have")" -ne 9 ]; then
    stamp="$found"
  fi
done
if [ ! -f "$stamp" ]; then
  echo "installing exchange into .venv (details: .venv/install.log)..." >&2
  if ! { "$venv/bin/python" -m pip install --upgrade pip \
         && "$venv/bin/python" -m pip install -e "$root${extras:+[$extras]}"; } >"$venv/install.log" 2>&1; then
    tail -n 30 "$venv/install.log" >&2
    echo "install failed; the whole log is in .venv/install.log" >&2
    exit 1
  fi
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
