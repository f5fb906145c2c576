# Sourced by scripts/test: the Debian packages the tests use, installed when missing and possible.
# `age` is the reference implementation our age format is checked against; `haproxy` is the
# reverse proxy in front of the replicas of tests/test_replicas.py and `scripts/run --replicas`;
# `chromium` is the browser the web pages are tested in (tests/browser/, through Playwright).
need=()
command -v age >/dev/null 2>&1 || need+=(age)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${need[*]}" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/dev/null 2>&1 \
      || echo "warning: could not install ${need[*]}; the tests that need them will fail" >&2
  else
    echo "warning: missing ${need[*]} (install with: sudo apt-get install ${need[*]})" >&2
  fi
fi
