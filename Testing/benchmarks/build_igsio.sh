#!/bin/sh
# Build IGSIO's VolumeReconstructorTest, the C++ reconstructor inside PLUS, for the side-by-side
# rows of bench_reconstruction.py. Nothing of IGSIO or vtkAddon enters this repository: fetch the
# public sources yourself and build outside the working tree.
#
# Environment:
#   IGSIO_SOURCE_DIR     (required) IGSIO source tree, https://github.com/IGSIO/IGSIO (tested at 9caba69)
#   VTKADDON_SOURCE_DIR  (required unless VTKADDON_DIR is set) vtkAddon source tree,
#                        https://github.com/Slicer/vtkAddon (tested at 2ed3e22); IGSIO's codecs need it
#                        when IGSIO is built without Slicer
#   VTKADDON_DIR         an existing vtkAddon build folder (skips building vtkAddon)
#   IGSIO_BUILD_DIR      build folder, outside this repository (default: $HOME/igsio-build)
#   VTK_DIR              VTK's CMake folder (default: the first /usr/lib/*/cmake/vtk-9.*)
#   JOBS                 parallel compile jobs (default 2)
#
# Prerequisites (Debian 12; Debian's VTK CMake config needs the Qt5 packages, IGSIO needs ITK):
#   apt-get install --no-install-recommends libvtk9-dev libinsighttoolkit5-dev qtbase5-dev \
#       libqt5opengl5-dev cmake g++
#
# Usage:
#   IGSIO_SOURCE_DIR=~/src/IGSIO VTKADDON_SOURCE_DIR=~/src/vtkAddon sh Testing/benchmarks/build_igsio.sh
# The last line printed is the executable's path; pass it to the benchmark:
#   IGSIO_VOLUME_RECONSTRUCTOR=<path> .venv/bin/python Testing/benchmarks/bench_reconstruction.py --igsio-only
# About 15 minutes on 2 cores. Re-running reuses the build folder (only changed files rebuild).
set -eu

fail() {
    echo "build_igsio.sh: $*" >&2
    exit 2
}

repo=$(cd "$(dirname "$0")/../.." && pwd -P)

[ -n "${IGSIO_SOURCE_DIR:-}" ] || fail "set IGSIO_SOURCE_DIR to an IGSIO source tree (https://github.com/IGSIO/IGSIO)"
[ -f "$IGSIO_SOURCE_DIR/CMakeLists.txt" ] || fail "IGSIO_SOURCE_DIR=$IGSIO_SOURCE_DIR has no CMakeLists.txt"
[ -d "$IGSIO_SOURCE_DIR/VolumeReconstruction" ] ||
    fail "IGSIO_SOURCE_DIR=$IGSIO_SOURCE_DIR has no VolumeReconstruction folder (not an IGSIO tree?)"
igsio_src=$(cd "$IGSIO_SOURCE_DIR" && pwd -P)

build=$(realpath -m "${IGSIO_BUILD_DIR:-$HOME/igsio-build}")
case "$build/" in
    "$repo"/*) fail "IGSIO_BUILD_DIR=$build is inside the repository ($repo); build outside it" ;;
esac
mkdir -p "$build" || fail "cannot create IGSIO_BUILD_DIR=$build"

if [ -z "${VTK_DIR:-}" ]; then
    for d in /usr/lib/*/cmake/vtk-9.*; do
        if [ -f "$d/vtk-config.cmake" ]; then
            VTK_DIR=$d
            break
        fi
    done
fi
[ -n "${VTK_DIR:-}" ] && [ -f "$VTK_DIR/vtk-config.cmake" ] ||
    fail "VTK 9 not found (apt-get install libvtk9-dev, or set VTK_DIR to the folder holding vtk-config.cmake)"
command -v cmake >/dev/null || fail "cmake not found (apt-get install cmake)"
jobs=${JOBS:-2}

if [ -z "${VTKADDON_DIR:-}" ]; then
    [ -n "${VTKADDON_SOURCE_DIR:-}" ] ||
        fail "set VTKADDON_SOURCE_DIR to a vtkAddon source tree (https://github.com/Slicer/vtkAddon) or VTKADDON_DIR to its build"
    [ -f "$VTKADDON_SOURCE_DIR/CMakeLists.txt" ] || fail "VTKADDON_SOURCE_DIR=$VTKADDON_SOURCE_DIR has no CMakeLists.txt"
    VTKADDON_DIR=$build/vtkAddon
    mkdir -p "$VTKADDON_DIR"
    echo "== vtkAddon -> $VTKADDON_DIR"
    (cd "$VTKADDON_DIR" &&
        cmake "$(cd "$VTKADDON_SOURCE_DIR" && pwd -P)" -DCMAKE_BUILD_TYPE=Release -DVTK_DIR="$VTK_DIR" &&
        make -j"$jobs") || fail "vtkAddon build failed (see the output above)"
fi
[ -f "$VTKADDON_DIR/vtkAddonConfig.cmake" ] || fail "VTKADDON_DIR=$VTKADDON_DIR has no vtkAddonConfig.cmake"

mkdir -p "$build/IGSIO"
echo "== IGSIO -> $build/IGSIO"
(cd "$build/IGSIO" &&
    cmake "$igsio_src" -DCMAKE_BUILD_TYPE=Release -DVTK_DIR="$VTK_DIR" -DvtkAddon_DIR="$VTKADDON_DIR" \
        -DIGSIO_SUPERBUILD=OFF -DIGSIO_USE_3DSlicer=OFF -DIGSIO_BUILD_VOLUMERECONSTRUCTION=ON \
        -DBUILD_TESTING=ON &&
    make -j"$jobs" VolumeReconstructorTest) || fail "IGSIO build failed (see the output above)"

exe=$(find "$build/IGSIO" -name VolumeReconstructorTest -type f -perm -u+x | head -n 1)
[ -n "$exe" ] || fail "the build finished but no VolumeReconstructorTest was found under $build/IGSIO"
echo "$exe"
