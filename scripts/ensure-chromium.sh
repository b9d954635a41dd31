#!/usr/bin/env bash
# The eval report test renders report.html in headless Chromium (Debian's package). Install it when we can
# (root with apt); otherwise say, in one line, what to install.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package) for the report test ..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && exit 0
fi
echo "make test needs Chromium for the eval report test: install it (Debian/Ubuntu: sudo apt-get install chromium), then run make test again" >&2
exit 1
