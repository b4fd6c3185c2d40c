#!/usr/bin/env bash
# Refresh the dashboard's vendored JavaScript (api/static/vendor/) from the npm registry.
#
# The dashboard must work on a box with no internet, so its libraries are kept in the package,
# pinned by version; this script is how they got there and how they are upgraded. For each
# entry of api/static/vendor/manifest.json it runs `npm pack name@version`, checks the tarball
# against the manifest's `integrity` (npm's sha512, which `npm pack` reports too), copies the
# listed files out of it and checks each against its `sha256`.
#
#   scripts/fetch-assets.sh            # verify and re-copy the pinned versions
#   scripts/fetch-assets.sh --update   # after editing a version in the manifest: rewrite the
#                                      # manifest's integrity and sha256 values from the registry
#
# tests/api/test_dashboard.py checks the kept files against the manifest on every `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENDOR=api/static/vendor
MANIFEST=$VENDOR/manifest.json
UPDATE=${1:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

command -v npm >/dev/null || { echo "npm is needed (apt-get install npm)" >&2; exit 1; }
PY=${PYTHON:-python3}

# One line per package: name, version, integrity, directory.
"$PY" - "$MANIFEST" >"$WORK/packages" <<'PYEOF'
import json, sys
for entry in json.load(open(sys.argv[1]))["packages"]:
    print(entry["name"], entry["version"], entry.get("integrity", "-"), entry["directory"])
PYEOF

while read -r name version integrity directory; do
    (cd "$WORK" && npm pack --silent "$name@$version" >/dev/null)
    tarball=$(ls "$WORK"/*.tgz)
    actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
    if [[ "$UPDATE" != "--update" && "$actual" != "$integrity" ]]; then
        echo "$name@$version: the registry's tarball is $actual, the manifest says $integrity" >&2
        exit 1
    fi
    mkdir -p "$WORK/unpacked" "$VENDOR/$directory"
    tar -xzf "$tarball" -C "$WORK/unpacked"
    "$PY" - "$MANIFEST" "$name" "$WORK/unpacked/package" "$VENDOR/$directory" "$actual" "$UPDATE" <<'PYEOF'
import hashlib, json, shutil, sys
manifest_path, name, unpacked, target, integrity, update = sys.argv[1:]
manifest = json.load(open(manifest_path))
entry = next(e for e in manifest["packages"] if e["name"] == name)
for item in entry["files"]:
    source = f"{unpacked}/{item['from']}"
    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
    if update == "--update":
        item["sha256"] = digest
    elif digest != item["sha256"]:
        sys.exit(f"{name}: {item['from']} has sha256 {digest}, the manifest says {item['sha256']}")
    shutil.copyfile(source, f"{target}/{item['file']}")
if update == "--update":
    entry["integrity"] = integrity
    entry["source"] = f"https://registry.npmjs.org/{name}/-/{name.split('/')[-1]}-{entry['version']}.tgz"
    json.dump(manifest, open(manifest_path, "w"), indent=2)
    open(manifest_path, "a").write("\n")
print(f"{name}@{entry['version']}: {len(entry['files'])} files OK")
PYEOF
    rm -rf "$WORK/unpacked" "$tarball"
done <"$WORK/packages"
