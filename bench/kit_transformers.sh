#!/usr/bin/env bash
# The device image's transformers ("5.17") is a build that differs from PyPI's 5.17.0: its Qwen3.5 vision config
# drops `num_attention_heads`, so no Qwen3.5 vision tower can be built there (see
# bench/results/gpu_runs/families_2026_12_05/run3). This carries PyPI's 5.17.0 - the floor `make test` checks on
# the CPU - next to the kit, for the runs that need it. Build here, then on the device (after the kit):
#   bash bench/kit_transformers.sh                         # here: .device-kit/transformers/ (~13 MB)
#   run carry=[".device-kit/transformers"] command=". /tmp/kit/env.sh && bash .device-kit/transformers/install.sh
#       && . /tmp/kit/env-tf.sh && FAMILY_K=qwen3_5 bash bench/device_runs.sh families tests"
set -euo pipefail
root=$(git rev-parse --show-toplevel)
dir="$root/.device-kit/transformers"
TF=$(sed -n 's/^FLOOR_TF *:= *//p' "$root/Makefile")
rm -rf "$dir"; mkdir -p "$dir/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$dir/wheels" \
  "transformers==$TF" "huggingface-hub>=1.5,<2"  # the image has their other dependencies (httpx, tokenizers)
cat > "$dir/install.sh" <<'INSTALL'
#!/usr/bin/env bash
# On the device: PyPI's transformers into /tmp/site-tf; /tmp/kit/env-tf.sh puts it first on PYTHONPATH.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-tf "$(dirname "$0")"/wheels/*.whl
mkdir -p /tmp/kit && echo 'export PYTHONPATH=/tmp/site-tf${PYTHONPATH:+:$PYTHONPATH}' > /tmp/kit/env-tf.sh
. /tmp/kit/env-tf.sh && python3 -c "import transformers; print('transformers', transformers.__version__, transformers.__file__)"
INSTALL
chmod +x "$dir/install.sh"
du -sh "$dir"; ls "$dir/wheels"
