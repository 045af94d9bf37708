#!/usr/bin/env bash
# Installs the aarch64 cross compiler and qemu-user (Debian) so that the NEON
# kernels are tested on x86-64 machines. Never fails: without the tools,
# tests/test_cpu_kernels_arm64.py skips and says why.
if [ "$(uname -m)" != "x86_64" ] || { command -v aarch64-linux-gnu-g++ && command -v qemu-aarch64; } >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user) >/dev/null 2>&1 \
    || echo "ensure_cross_tools: could not install g++-aarch64-linux-gnu and qemu-user; the NEON test will skip"
fi
exit 0
