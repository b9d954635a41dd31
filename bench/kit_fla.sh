#!/usr/bin/env bash
# Qwen3.5's gated-DeltaNet layers train through transformers' reference PyTorch code unless
# flash-linear-attention (pure Python + Triton) is importable; users install it (`pip install
# flash-linear-attention`), so real-size Qwen3.5 figures are measured with it. This carries its wheels next to
# the device kit. Here:  bash bench/kit_fla.sh   (-> .device-kit/fla/, ~1.5 MB)
# On the device, after the kit:  bash .device-kit/fla/install.sh   (into /tmp/site, already on PYTHONPATH)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
dir="$root/.device-kit/fla"
rm -rf "$dir"; mkdir -p "$dir/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$dir/wheels" \
  "flash-linear-attention==${FLA:-0.6.0}" "fla-core==${FLA:-0.6.0}" einops
cat > "$dir/install.sh" <<'INSTALL'
#!/usr/bin/env bash
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$(dirname "$0")"/wheels/*.whl
python3 -c "import fla, transformers; print('fla', fla.__version__)"
INSTALL
chmod +x "$dir/install.sh"
du -sh "$dir"; ls "$dir/wheels"
