#!/usr/bin/env bash
# Makes sure the Metal emulator has a compiler: installs Debian's clang-19
# with apt-get when no clang++ >= 17 is found and we are root. Never fails:
# where clang cannot be installed the emulator tests skip and say why.

has_clang() {
  local name version
  for name in "${MLX_EXT_EMU_CLANG:-}" clang++ clang++-{25..17}; do
    [ -n "$name" ] && command -v "$name" >/dev/null 2>&1 || continue
    version=$("$name" --version 2>/dev/null | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -n 1)
    [ -n "$version" ] && [ "$version" -ge 17 ] && return 0
  done
  return 1
}

has_clang && exit 0
if [ "$(uname -s)" != Linux ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "metal emulator: no clang++ >= 17 and cannot install one here (needs root and apt-get on Linux); its tests will skip" >&2
  exit 0
fi
echo "metal emulator: installing clang-19 with apt-get" >&2
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19; } >/dev/null; then
  echo "metal emulator: installing clang-19 failed; its tests will skip" >&2
fi
exit 0
