#!/usr/bin/env bash
# Refuse to run an image built for one L4T major release on a board flashed with another:
# TensorRT, CUDA and the kernel driver of JetPack 5 (L4T R35) and JetPack 6 (R36) are not
# interchangeable, and a mismatch fails late with obscure CUDA errors. Then run the command.
#
#   XPDEPLOY_IMAGE_L4T   the L4T release the image was built for (set by the Dockerfile), e.g. 36.3.0
#   XPDEPLOY_TEGRA_RELEASE  the board's release file (default /etc/nv_tegra_release, mounted read-only
#                        by --runtime nvidia); tests point it elsewhere
set -euo pipefail

release_file="${XPDEPLOY_TEGRA_RELEASE:-/etc/nv_tegra_release}"
image_l4t="${XPDEPLOY_IMAGE_L4T:?XPDEPLOY_IMAGE_L4T is not set; rebuild the image with docker/jetson/Dockerfile}"

if [ ! -r "$release_file" ]; then
  echo "error: $release_file not found: this is not a Jetson (or the container was started without --runtime nvidia); use docker/x86 on GPU servers" >&2
  exit 1
fi
# First line looks like: "# R36 (release), REVISION: 3.0, GCID: ..., BOARD: generic, EABI: aarch64, ..."
first_line="$(head -n 1 "$release_file")"
if [[ ! "$first_line" =~ R([0-9]+)[^0-9]+REVISION:\ *([0-9]+)\.([0-9]+) ]]; then
  echo "error: cannot read the L4T release from $release_file ('$first_line'); expected '# R36 (release), REVISION: 3.0, ...'" >&2
  exit 1
fi
board_l4t="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
if [ "${board_l4t%%.*}" != "${image_l4t%%.*}" ]; then
  echo "error: this image is for L4T ${image_l4t} but the board runs L4T ${board_l4t}; build the image with --build-arg L4T_VERSION=${board_l4t} (see docker/README.md)" >&2
  exit 1
fi
if [ "$board_l4t" != "$image_l4t" ]; then
  echo "warning: image built for L4T ${image_l4t}, board runs ${board_l4t} (same major release: continuing)" >&2
fi
export XPDEPLOY_L4T_RELEASE="$board_l4t"
exec "$@"
