#!/usr/bin/env bash
# Installs what Parley's build and tests need on a fresh Debian machine with a Rust
# toolchain. Idempotent: installs only what is missing. The build needs nothing beyond
# cargo (protobuf is compiled by protox, in Rust); the fault-injection harness
# (jepsen-style/) needs iproute2 (ip netns, tc netem), nftables and libfaketime.
set -euo pipefail

need=()
for tool in pkill:procps ip:iproute2 tc:iproute2 nft:nftables; do
  bin=${tool%%:*}; pkg=${tool##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 /usr/lib/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then
  need+=(libfaketime)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "setup: missing packages ${need[*]} and not root; install them first" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install a Rust toolchain (rustup)" >&2; exit 1; }
