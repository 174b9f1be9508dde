#!/usr/bin/env bash
# Set up arcvit on a fresh machine: a virtual environment in .venv/ with arcvit installed (editable) and what
# `arcvit demo` needs on a CPU (the demo's image sets ship inside two of arcvit's dependencies).
#   --dev  also every extra and the test tools (pytest, ruff, Playwright), and, as root, Debian's chromium (the
#          web page's browser test), postgresql (the shared-study test) and dataset-fashion-mnist (re-running
#          the backbone pretraining): what .ci/run and the README's test command use.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") dev=0 ;;
  --dev) dev=1 ;;
  *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac

python=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
quiet_index() { grep -v "is ignored: it is neither" >&2; }  # this machine's local index lacks some projects
# torch/torchvision pinned to the wheels on this machine's disk (a newer one would download GBs). These are the
# CUDA builds: no CPU-only build of torch 2.14.1 lies here (README, "Install", says how to get one elsewhere).
"${pip[@]}" torch==2.14.1 torchvision==0.29.1 2> >(quiet_index)
if [ "$dev" = 0 ]; then
  "${pip[@]}" -e . 2> >(quiet_index)
  .venv/bin/python -c "import arcvit; print(f'arcvit {arcvit.__version__} ready in .venv (arcvit demo)')"
  exit 0
fi
"${pip[@]}" -e ".[dev]" 2> >(quiet_index)

# apt_install PACKAGE PRESENT-TEST WHAT-FOR: Debian packages the tests use, installed when running as root.
apt_install() {
  if eval "$2"; then return; fi
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq "$1") >/dev/null \
      || echo "setup: could not install $1 (only needed for $3)" >&2
  else
    echo "setup: run 'sudo apt-get install $1' for $3" >&2
  fi
}
apt_install dataset-fashion-mnist "[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]" \
  "re-running the backbone pretraining"
apt_install chromium "[ -x /usr/bin/chromium ]" "the web page's browser test (Playwright drives it)"
apt_install postgresql "compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null" \
  "the shared-study test (it starts its own server in a temporary folder)"
.venv/bin/python -c "import arcvit; print(f'arcvit {arcvit.__version__} ready in .venv, with every extra')"
