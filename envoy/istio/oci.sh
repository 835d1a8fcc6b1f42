#!/usr/bin/env bash
# Packs the filter for Istio's WasmPlugin (`url: oci://...`), in both forms its agent pulls:
#   OUT/image/     build context of a Docker image FROM scratch holding /plugin.wasm (the
#                  "compat" form: Istio takes the file named plugin.wasm from the last layer);
#   OUT/artifact/  an OCI image layout holding the Wasm artifact (the "oci" form): a config
#                  and exactly two layers, the raw .wasm (application/vnd.module.wasm.content.
#                  layer.v1+wasm) and the config again (application/vnd.module.wasm.config.v1+json),
#                  as Istio's image fetcher requires; tagged VERSION.
# Usage: oci.sh WASM VERSION OUT_DIR
set -euo pipefail
wasm=$1 version=$2 out=$3

rm -rf "$out"
mkdir -p "$out/image" "$out/artifact/blobs/sha256"
cp "$wasm" "$out/image/plugin.wasm"
printf 'FROM scratch\nCOPY plugin.wasm ./\n' >"$out/image/Dockerfile"

blobs=$out/artifact/blobs/sha256
# Stores stdin as a blob; prints "sha256:<hex> <size>".
put_blob() {
  local tmp=$out/artifact/blob.tmp digest
  cat >"$tmp"
  digest=$(sha256sum "$tmp" | cut -d' ' -f1)
  mv "$tmp" "$blobs/$digest"
  echo "sha256:$digest $(stat -c %s "$blobs/$digest")"
}
descriptor() { printf '{"mediaType":"%s","digest":"%s","size":%s}' "$1" "$2" "$3"; }

config_type=application/vnd.module.wasm.config.v1+json
layer_type=application/vnd.module.wasm.content.layer.v1+wasm
read -r config_digest config_size < <(printf '%s' \
  '{"type":"envoy_proxy","abi_version":"proxy_abi_version_0_2_1","config":{"root_ids":["resilience"]}}' | put_blob)
read -r wasm_digest wasm_size < <(put_blob <"$wasm")
config=$(descriptor "$config_type" "$config_digest" "$config_size")
read -r manifest_digest manifest_size < <(printf '%s' \
  "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":$config,\"layers\":[$(descriptor "$layer_type" "$wasm_digest" "$wasm_size"),$config]}" \
  | put_blob)
printf '{"imageLayoutVersion":"1.0.0"}' >"$out/artifact/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$version" >"$out/artifact/index.json"
# A WasmPlugin's sha256 pins an oci:// image by its manifest digest, as bare hex.
echo "oci artifact: WasmPlugin sha256 ${manifest_digest#sha256:} (the manifest's digest; the .wasm's is ${wasm_digest#sha256:})"
