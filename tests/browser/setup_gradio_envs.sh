#!/usr/bin/env bash
# Make the two environments the browser tests start the box editor's demo app in: A1111's gradio 3.41.2
# and Forge's gradio 4.40.0 (they cannot share one venv). Prints the MIGC_GRADIO_PYTHONS line to export.
set -euo pipefail
cd "$(dirname "$0")/../.."
pythons=()
for version in 3 4; do
  dir=".venv-gradio${version}"
  [ -x "${dir}/bin/python" ] || python3 -m venv "${dir}"
  "${dir}/bin/python" -m pip install -q --disable-pip-version-check -r "tests/browser/gradio${version}.txt"
  pythons+=("gradio${version}=$(pwd)/${dir}/bin/python")
done
echo "export MIGC_GRADIO_PYTHONS=$(IFS=,; echo "${pythons[*]}")"
