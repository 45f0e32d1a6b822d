#!/usr/bin/env bash
# Replace Pillow by Pillow-SIMD (https://github.com/uploadcare/pillow-simd) in the Python
# environment that runs clip_jax: the same PIL API and bicubic filter, with a resize about
# 5x faster (0.17 against 0.85 ms for a ~240px box to 224px here, benchmarks/RESULTS.md),
# which is most of the input pipeline's CPU time per image. open_clip recommends it too.
#
#   launch/install_pillow_simd.sh            # in the active environment (python3 on PATH)
#   PYTHON=.venv/bin/python launch/install_pillow_simd.sh
#   PILLOW_SIMD_VERSION=12.1.1.post0 launch/install_pillow_simd.sh
#
# Pillow-SIMD is built from source: it needs a C compiler and the libjpeg and zlib headers
# (Debian/Ubuntu: sudo apt-get install -y build-essential libjpeg-turbo8-dev zlib1g-dev;
# libwebp-dev too for .webp images, which a build without it cannot decode: they are skipped).
# It is built with AVX2 where the CPU has it (SSE4 otherwise). Both distributions install
# the same `PIL` package, so reinstalling Pillow later (e.g. `pip install -e .` pulling it in
# for matplotlib) puts the scalar resize back: run this script again afterwards. The
# training log and benchmarks/data_pipeline.py name the PIL in use ("Pillow-SIMD ...").
# Resized pixels may differ from Pillow's by rounding (at most 2 of 255 on 0.3% of values in
# our check); evaluation numbers are unaffected beyond that.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VERSION="${PILLOW_SIMD_VERSION:-}"

die() { echo "error: $*" >&2; exit 1; }

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument '$1': the script takes none (PYTHON=..., PILLOW_SIMD_VERSION=..., CC=... in the environment)" ;;
esac

command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"
CC_BIN="${CC:-cc}"
command -v "${CC_BIN%% *}" >/dev/null || die "no C compiler (${CC_BIN%% *}); install build-essential"
for header in jpeglib.h zlib.h; do
  echo "#include <$header>" | "${CC_BIN%% *}" -E -x c - >/dev/null 2>&1 ||
    die "$header not found; install the libjpeg and zlib development headers (libjpeg-turbo8-dev zlib1g-dev)"
done

flags=""
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  flags="-mavx2"
fi
spec="pillow-simd${VERSION:+==$VERSION}"
echo "# building $spec with CC='$CC_BIN $flags' for $("$PYTHON" -c 'import sys; print(sys.executable)')"
"$PYTHON" -m pip uninstall -y -q pillow pillow-simd
CC="$CC_BIN $flags" "$PYTHON" -m pip install -q --no-cache-dir --no-binary pillow-simd "$spec"
"$PYTHON" - <<'EOF'
from PIL import Image, features
from clip_jax.data import transforms
build = transforms.pillow_build()
if not build.startswith("Pillow-SIMD"):
  raise SystemExit(f"error: PIL is still {build} after installing pillow-simd")
if not features.check("jpg"):
  raise SystemExit("error: Pillow-SIMD was built without JPEG support (libjpeg headers?)")
print(f"# {build}: JPEG {features.version('jpg')}, libjpeg-turbo {features.check_feature('libjpeg_turbo')}")
if not features.check("webp"):
  print("# warning: built without WebP (libwebp-dev headers missing): .webp images will be "
        "skipped as undecodable; install libwebp-dev and run this script again to read them")
EOF
