#!/usr/bin/env bash
# clients/typescript/run.sh ADDRESS: generates the JavaScript/TypeScript client from proto/ with
# protoc-gen-es (Connect-ES v2), as a dashboard developer would, and runs scenario.mjs against
# the service at ADDRESS (host:port, plaintext gRPC). The pinned npm packages of package.json
# are installed on first use into ~/.cache/thermostat-ts (THERMOSTAT_TS_DIR overrides); protoc
# comes from scripts/codegen-tools.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${THERMOSTAT_TS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/thermostat-ts}
protoc=$("$root/scripts/codegen-tools.sh")

mkdir -p "$dir"
if ! cmp -s "$here/package.json" "$dir/package.json" || [[ ! -x $dir/node_modules/.bin/protoc-gen-es ]]; then
  (
    flock 9
    echo "clients/typescript/run.sh: installing the npm packages of package.json into $dir" >&2
    cp "$here/package.json" "$dir/package.json"
    npm install --prefix "$dir" --silent --no-audit --no-fund >&2
  ) 9>/tmp/thermostat-ts-install.lock
fi

# Inside $dir, so that the generated modules find its node_modules.
gen=$(mktemp -d "$dir/gen.XXXXXX")
trap 'rm -rf "$gen"' EXIT
"$protoc" -I "$root/proto" --plugin=protoc-gen-es="$dir/node_modules/.bin/protoc-gen-es" \
  --es_out="$gen" --es_opt=target=js,import_extension=js \
  thermostat/v1/setpoint.proto thermostat/v1/control.proto thermostat/v1/schedule.proto google/rpc/error_details.proto \
  google/rpc/status.proto google/api/field_behavior.proto
cp "$here/scenario.mjs" "$gen/"
node "$gen/scenario.mjs" "$1"
