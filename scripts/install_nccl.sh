#!/usr/bin/env bash
# Installs NCCL's headers and libnccl.so.2 from PyPI's nvidia-nccl-cu<CUDA major> wheel into a
# folder of the repository (what `make deps` runs), with the libnccl.so link the linker needs.
# Usage: scripts/install_nccl.sh <version> <dest> [nvcc]
#   version  NCCL release, e.g. 2.28.9 or 2.30.7 (2.28.9 is the oldest with the device API
#            nccl-moe needs)
#   dest     folder that receives include/ and lib/ (replaced when it holds another version)
#   nvcc     the compiler whose CUDA major picks the wheel (default: nvcc on PATH)
# Needs python3 with pip and access to PyPI; nothing is installed outside `dest`.
set -euo pipefail
version=${1:?usage: install_nccl.sh <version> <dest> [nvcc]}
dest=${2:?usage: install_nccl.sh <version> <dest> [nvcc]}
nvcc=${3:-nvcc}

want_code=$(awk -F. '{ printf "%d", $1 * 10000 + $2 * 100 + $3 }' <<< "$version")
have_code=$(sed -n 's/^#define NCCL_VERSION_CODE *\([0-9]*\).*/\1/p' "$dest/include/nccl.h" 2>/dev/null || true)
if [ "$have_code" = "$want_code" ] && [ -e "$dest/lib/libnccl.so.2" ] && [ -e "$dest/include/nccl_device.h" ]; then
  echo "deps: NCCL $version already in $dest"
  exit 0
fi

cuda_major=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
[ -n "$cuda_major" ] || { echo "deps: cannot run $nvcc to find the CUDA major version (set CUDA_HOME)" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || {
  echo "deps: python3 -m pip is needed to fetch NCCL (e.g. apt-get install python3-pip)" >&2; exit 1; }

wheel_name="nvidia-nccl-cu$cuda_major==$version"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "deps: downloading $wheel_name (about 200 MB)"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$wheel_name"
wheel=$(ls "$tmp"/*.whl)

rm -rf "$dest.partial"
mkdir -p "$dest.partial"
# A wheel is a zip; keep only nvidia/nccl/{include,lib}.
python3 - "$wheel" "$dest.partial" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
prefix = "nvidia/nccl/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if n.startswith(prefix + "include/") or n.startswith(prefix + "lib/")]
    if not names:
        sys.exit("deps: %s has no nvidia/nccl/include or lib" % wheel)
    for n in names:
        if n.endswith("/"):
            continue
        target = os.path.join(out, n[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(n) as src, open(target, "wb") as dst:
            while True:
                chunk = src.read(1 << 22)
                if not chunk:
                    break
                dst.write(chunk)
PY
[ -e "$dest.partial/include/nccl_device.h" ] || {
  echo "deps: NCCL $version has no nccl_device.h (no device API); nccl-moe needs 2.28.9 or later" >&2
  rm -rf "$dest.partial"; exit 1; }
ln -sf libnccl.so.2 "$dest.partial/lib/libnccl.so"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "deps: NCCL $version (CUDA $cuda_major wheel) installed in $dest"
