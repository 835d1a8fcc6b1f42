#!/usr/bin/env bash
# Fills an image root with one dynamically linked program: the binary, exactly the shared
# libraries ldd names for it, an ld.so.cache for their directories, and /etc/passwd and
# /etc/group naming user and group 101. Nothing is pulled: the images are FROM scratch.
# Usage: rootfs.sh BINARY PATH_IN_IMAGE ROOT
set -euo pipefail
# COPY keeps modes: whatever the builder's umask, user 101 must read and run everything.
umask 022
binary=$1 path=$2 root=$3

mkdir -p "$root$(dirname "$path")" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
cp "$binary" "$root$path"

# ldd prints "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" for libraries and the
# loader's own path for the interpreter; linux-vdso has no file.
listing=$(ldd "$binary")
if grep -q 'not found' <<<"$listing"; then
  echo "rootfs.sh: $binary needs libraries this machine lacks:" >&2
  grep 'not found' <<<"$listing" >&2
  exit 1
fi
libs=$(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$listing")
[ -n "$libs" ] || { echo "rootfs.sh: ldd found no libraries for $binary" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# The loader finds them where ldd did through the image's own cache, whatever directories
# the build machine's glibc searches by default.
dirname $libs | sort -u >"$root/etc/ld.so.conf"
"$(command -v ldconfig || echo /sbin/ldconfig)" -r "$root"

# uid 101 is the envoy user of the official envoyproxy/envoy image, so files and volumes
# work the same with either image.
printf 'root:x:0:0::/:/sbin/nologin\nenvoy:x:101:101::/tmp:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nenvoy:x:101:\n' >"$root/etc/group"
echo "$libs" | tr '\n' ' ' | sed "s|^|staged $path and |; s/\$/\\n/"
