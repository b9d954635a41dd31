#!/usr/bin/env bash
# TRL for the side-by-side comparison (`device_runs.sh trl`), carried to the GPU machine in .trl-kit/:
# the device image has accelerate, and the device kit carries datasets and pandas, so TRL itself (pure
# Python) is all that is missing. Run here, then carry ".trl-kit" with the run that calls `device_runs.sh trl`.
set -euo pipefail
VERSION=${1:-1.16.0}   # the version of the README's comparison
rm -rf .trl-kit && mkdir -p .trl-kit/site
python3 -m pip download --no-deps --quiet "trl==$VERSION" -d .trl-kit
python3 -m zipfile -e .trl-kit/trl-"$VERSION"-py3-none-any.whl .trl-kit/site
grep -qx '/.trl-kit/' .git/info/exclude || echo '/.trl-kit/' >> .git/info/exclude
du -sh .trl-kit
