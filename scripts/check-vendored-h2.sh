#!/usr/bin/env bash
# Checks that vendor/h2 is the crates.io source of the h2 release it names,
# changed only in hunks marked "Patched for Freshness" (vendor/README.md).
#
# The release's .crate comes from cargo's download cache when it is there,
# else from static.crates.io; either way its SHA-256 must be the one pinned
# below (the crates.io index's checksum for that version). Upgrading h2
# means changing VERSION and SHA256 together and re-applying the patch.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.4.21
SHA256=b634322c4924093fe6a6e05ecbe5717cd3c6014934455f4ae8e5cf14ba3264a8
MARK="Patched for Freshness"
# Files of the published crate that are not vendored (they do not build).
SKIPPED=(.cargo_vcs_info.json .github Cargo.lock)

vendored=vendor/h2
named=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$vendored/Cargo.toml" | head -n1)
if [ "$named" != "$VERSION" ]; then
    echo "vendor/h2 is h2 $named; this check pins $VERSION (update VERSION and SHA256)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
crate="$work/h2-$VERSION.crate"
cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/h2-"$VERSION".crate 2>/dev/null | head -n1 || true)
if [ -n "$cached" ]; then
    cp "$cached" "$crate"
else
    curl -sSfL -o "$crate" "https://static.crates.io/crates/h2/h2-$VERSION.crate"
fi
echo "$SHA256  $crate" | sha256sum -c --quiet -
tar -xzf "$crate" -C "$work"
upstream="$work/h2-$VERSION"
for f in "${SKIPPED[@]}"; do rm -rf "${upstream:?}/$f"; done

# Every file of one tree is in the other.
only=$(diff -rq "$upstream" "$vendored" | grep '^Only in' || true)
if [ -n "$only" ]; then
    echo "vendor/h2 and h2 $VERSION do not hold the same files:" >&2
    echo "$only" >&2
    exit 1
fi

# Every changed hunk carries the mark on a line it adds.
diff -rU0 "$upstream" "$vendored" >"$work/diff" || true
awk -v mark="$MARK" '
    /^diff / || /^--- / || /^\+\+\+ / { next }
    /^@@/ { if (hunk != "" && !marked) { print hunk; bad = 1 } hunk = $0; marked = 0; next }
    /^\+/ && index($0, mark) { marked = 1 }
    { hunk = hunk "\n" $0 }
    END { if (hunk != "" && !marked) { print hunk; bad = 1 } exit bad }
' "$work/diff" >"$work/unmarked" || {
    echo "vendor/h2 differs from h2 $VERSION outside the lines marked \"$MARK\":" >&2
    cat "$work/unmarked" >&2
    exit 1
}
hunks=$(grep -c '^@@' "$work/diff" || true)
echo "vendor/h2: h2 $VERSION from crates.io, $hunks marked hunks and nothing else"
