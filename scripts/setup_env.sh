#!/usr/bin/env bash
# Create or reuse .venv/ in the repo root and install what is missing. Idempotent: a second run with
# nothing changed checks the imports and skips installing.
#
#   bash scripts/setup_env.sh            # what `make demo` / `make test` call first
#   FASTVIT_DALI=cuda120 bash scripts/setup_env.sh   # DALI built for CUDA 12 instead of CUDA 13
#   PYTHON=python3.12 bash scripts/setup_env.sh      # pick the interpreter for a new .venv
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

case "${FASTVIT_DALI:-cuda130}" in
  cuda130) EXTRA=loaders ;;
  cuda120) EXTRA=loaders-cuda12 ;;
  *) die "FASTVIT_DALI must be cuda130 or cuda120, not '${FASTVIT_DALI}'" ;;
esac

# What decides whether installing is needed: the declared dependencies, this script, the DALI choice.
STAMP_KEY=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-$EXTRA
STAMP="$VENV/.fastvit-installed"
CHECK='import torch, torchvision, timm, ffcv, nvidia.dali, numba, triton, scipy, tensorboard, fastvit.kernels, fastvit.data_prep'

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] && "$PY" -c "$CHECK" 2>/dev/null; then
  say "environment up to date ($VENV)"
  exit 0
fi

# 1. The virtualenv.
if [ ! -x "$PY" ]; then
  BASE_PY=${PYTHON:-python3}
  command -v "$BASE_PY" >/dev/null || die "no $BASE_PY on PATH: install Python >= 3.10"
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$BASE_PY is older than 3.10"
  say "creating $VENV with $("$BASE_PY" --version)"
  "$BASE_PY" -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip wheel setuptools

# 2. System packages FFCV builds against (only when FFCV is not built yet).
APT_PKGS="libopencv-dev libturbojpeg0-dev pkg-config"
if ! "$PY" -c 'import ffcv' 2>/dev/null; then
  if ! { command -v pkg-config >/dev/null && pkg-config --exists opencv4 && pkg-config --exists libturbojpeg; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "installing $APT_PKGS (apt, as root)"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PKGS >/dev/null
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then
      say "installing $APT_PKGS (apt, with sudo)"
      sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PKGS >/dev/null
    else
      die "FFCV needs libturbojpeg, OpenCV headers and pkg-config: install them first (Debian/Ubuntu: sudo apt-get install $APT_PKGS; conda: conda install -c conda-forge libjpeg-turbo opencv pkg-config), then rerun"
    fi
  fi
fi

# 3. Python packages. torch and torchvision are resolved together so that they match: a machine with a
#    local CPU-only torch wheel on pip's find-links would otherwise keep that torch, which the registry's
#    (CUDA-built) torchvision does not load against. The CUDA torch runs fine on a CPU-only machine.
say "installing Python packages into $VENV (first time: several GB, a few minutes)"
"$PY" -m pip install --quiet torch torchvision
"$PY" -m pip install --quiet -e ".[$EXTRA,test]"

# 4. Everything must import, GPU or not.
if ! err=$("$PY" -c "$CHECK" 2>&1); then
  die "installed, but an import fails: $(printf '%s' "$err" | tail -n 1)"
fi
"$PY" - <<'EOF'
import torch, torchvision, timm, ffcv, nvidia.dali, numba, triton
print(f"setup: torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"torchvision {torchvision.__version__}, timm {timm.__version__}, ffcv {ffcv.__version__}, "
      f"dali {nvidia.dali.__version__}, numba {numba.__version__}, triton {triton.__version__}")
EOF
printf '%s' "$STAMP_KEY" > "$STAMP"
say "done"
