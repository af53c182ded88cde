#!/usr/bin/env bash
# Build the OpenIGTLink C++ example programs our interop tests talk to.
#
# Debian's openigtlink-examples package ships the example *sources* (not binaries) and
# libopenigtlink-dev the library + CMake config. Needs: cmake, a C++ compiler, and
#   apt-get install -y libopenigtlink-dev openigtlink-examples cmake g++
#
# Usage: build_openigtlink_examples.sh [BUILD_DIR]
#   BUILD_DIR defaults to <repo>/build/openigtlink-examples (git-ignored). The build is cached:
#   when every program exists and is newer than its source, nothing is rebuilt.
# Prints the folder holding the programs on its last line. Exit status 3: a prerequisite is
# missing (the message says which); other non-zero: the build failed.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
BUILD_DIR="${1:-$REPO/build/openigtlink-examples}"
EXAMPLES="${OPENIGTLINK_EXAMPLES_DIR:-/usr/share/doc/openigtlink-examples/examples}"
PROGRAMS="Imager/ImagerServer Tracker/TrackerServer Status/StatusServer String/StringEchoServer Receiver/ReceiveClient"

missing() { echo "missing prerequisite: $*" >&2; exit 3; }
command -v cmake >/dev/null 2>&1 || missing "cmake (apt-get install cmake)"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing "a C++ compiler (apt-get install g++)"
[ -d "$EXAMPLES" ] || missing "OpenIGTLink example sources in $EXAMPLES (apt-get install openigtlink-examples)"
for p in $PROGRAMS; do
  [ -f "$EXAMPLES/$p.cxx" ] || missing "$EXAMPLES/$p.cxx (apt-get install openigtlink-examples)"
done

up_to_date=1
for p in $PROGRAMS; do
  exe="$BUILD_DIR/bin/$(basename "$p")"
  if [ ! -x "$exe" ] || [ "$EXAMPLES/$p.cxx" -nt "$exe" ]; then up_to_date=0; fi
done
if [ "$up_to_date" = 1 ]; then
  echo "OpenIGTLink examples up to date in $BUILD_DIR/bin" >&2
  echo "$BUILD_DIR/bin"
  exit 0
fi

SRC="$BUILD_DIR/src"
mkdir -p "$SRC" "$BUILD_DIR/cmake"
{
  echo "cmake_minimum_required(VERSION 3.10)"
  echo "project(FreehandUSOpenIGTLinkInterop CXX)"
  echo "find_package(OpenIGTLink REQUIRED)"
  echo "include(\${OpenIGTLink_USE_FILE})"
  echo "set(CMAKE_RUNTIME_OUTPUT_DIRECTORY \"$BUILD_DIR/bin\")"
  for p in $PROGRAMS; do
    name="$(basename "$p")"
    echo "add_executable($name \"$EXAMPLES/$p.cxx\")"
    echo "target_link_libraries($name OpenIGTLink)"
  done
} > "$SRC/CMakeLists.txt"

if ! cmake -S "$SRC" -B "$BUILD_DIR/cmake" -DCMAKE_BUILD_TYPE=Release >"$BUILD_DIR/configure.log" 2>&1; then
  if grep -q "OpenIGTLink" "$BUILD_DIR/configure.log"; then
    cat "$BUILD_DIR/configure.log" >&2
    missing "the OpenIGTLink CMake package (apt-get install libopenigtlink-dev)"
  fi
  cat "$BUILD_DIR/configure.log" >&2
  exit 1
fi
JOBS="$(nproc 2>/dev/null || echo 2)"
cmake --build "$BUILD_DIR/cmake" -j "$JOBS" >"$BUILD_DIR/build.log" 2>&1 || { cat "$BUILD_DIR/build.log" >&2; exit 1; }
echo "built OpenIGTLink examples in $BUILD_DIR/bin" >&2
echo "$BUILD_DIR/bin"
