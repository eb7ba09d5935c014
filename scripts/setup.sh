#!/usr/bin/env bash
# Installs what Parley's build and tests need on a fresh Debian machine with a Rust
# toolchain. Idempotent: installs only what is missing. Today the build needs nothing
# beyond cargo (protobuf is compiled by protox, in Rust); the fault-injection harness
# will add iproute2/nftables/libfaketime here.
set -euo pipefail

need=()
for tool in pkill:procps; do
  bin=${tool%%:*}; pkg=${tool##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "setup: missing packages ${need[*]} and not root; install them first" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install a Rust toolchain (rustup)" >&2; exit 1; }
