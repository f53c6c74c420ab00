#!/usr/bin/env bash
# Download the peer libraries' wheels for the GPU machine (Python 3.12, linux x86_64) into .whl/ (git-ignored).
#
# Which wheels: the pinned `wheel` of each peer in the registry, benchmarks/peers/__init__.py (PEERS), in its order.
# The GPU machine has no network: these wheels travel with the working tree, which must stay under 64 MiB in all,
# and gpu_check installs them there with `pip install --no-index --no-deps --target` (carry .whl with the call).
# A wheel is kept only if it fits in what is left AND everything it requires (its non-extra Requires-Dist) is in the
# GPU image, so that it runs without fetching anything; otherwise it is left out and the script says why. (When
# written: liger-kernel, pure Python on torch and Triton, kept; flashinfer-python, checked each time.)
# Usage: benchmarks/peers/fetch_wheels.sh        (LIMIT_MIB=64 by default)
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-64}
# The registry is plain Python (no torch): python3 reads it here.
mapfile -t SPECS < <(python3 -c 'from benchmarks.peers import wheel_specs; print(*wheel_specs(), sep="\n")')
# Python packages of the GPU image ('cuda', read 2026-11-17 per the device notes), lower case, '_' as '-'.
IMAGE_PACKAGES=" numpy torch triton click einops ninja packaging requests tabulate tqdm nvidia-ml-py cuda-bindings
 cuda-core cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-nccl-cu13 "

download() {  # download DIR SPEC: one wheel, no dependencies, for cp312 manylinux x86_64
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "$2"
}

mib() { echo $(( ($1 + 1048575) / 1048576 )); }

tree_bytes() {  # what travels besides .whl: tracked files and untracked files that git does not ignore
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1
}

mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for spec in "${SPECS[@]}"; do
  dist=${spec%%=*}
  rm -rf "${tmp:?}"/* && download "$tmp" "$spec"
  wheel=$(ls "$tmp"/*.whl)
  wheel_bytes=$(stat -c %s "$wheel")
  used=$(( $(tree_bytes) + $(du -cb "$DEST" | tail -n 1 | cut -f1) ))
  missing=""
  for requirement in $(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist:' | grep -v 'extra ==' \
                       | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z_' 'a-z-'); do
    case "$IMAGE_PACKAGES" in *" $requirement "*) ;; *) missing="$missing $requirement" ;; esac
  done
  if (( used + wheel_bytes > LIMIT_MIB * 1048576 )) || [[ -n "$missing" ]]; then
    echo "$dist: NOT kept: wheel $(mib "$wheel_bytes") MiB with $(mib "$used") MiB already travelling" \
         "(limit $LIMIT_MIB MiB); requires packages the GPU image lacks:${missing:- none}"
  else
    mv "$wheel" "$DEST"/
    echo "$dist: $(basename "$wheel")"
  fi
done
echo "total to travel: $(mib $(( $(tree_bytes) + $(du -cb "$DEST" | tail -n 1 | cut -f1) ))) MiB" \
     "(working tree + $DEST/: $(du -sh "$DEST" | cut -f1))"
