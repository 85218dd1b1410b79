#!/bin/sh
# Fetch the opt-in "linux-docs" corpus: the reST sources of the Linux kernel documentation from
# Debian's linux-doc package (GPL-2). It goes into a cache directory and is never committed.
#
# Usage: sh locmoe/data/fetch_linux_docs.sh [CACHE_DIR]
#        CACHE_DIR defaults to $LOCMOE_CACHE_DIR, else $XDG_CACHE_HOME/locmoe, else ~/.cache/locmoe.
#        LINUX_DOC_VERSION=6.1.192-2 pins the version of the linux-doc metapackage (empty = candidate).
#
# Writes CACHE_DIR/corpora/linux-docs.txt (all of Documentation/), linux-docs-networking.txt (the
# networking/ subset, a domain corpus), COPYING-linux-doc.txt (the package's copyright file) and
# SHA256SUMS. Files are concatenated in C-locale sorted path order, like the embedded corpus.
# Needs: apt-get (a Debian/Ubuntu archive that carries linux-doc), dpkg-deb, gzip, sha256sum.
set -eu

cache=${1:-${LOCMOE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/locmoe}}
out_dir="$cache/corpora"
version=${LINUX_DOC_VERSION-}

work=$(mktemp -d)
trap 'rm -rf "$work"; rm -f "$out_dir"/*.part' EXIT
mkdir -p "$out_dir"
cd "$work"

# linux-doc is a metapackage; its one dependency (linux-doc-X.Y) holds the files.
if [ -n "$version" ]; then apt-get download "linux-doc=$version"; else apt-get download linux-doc; fi
real=$(dpkg-deb -f linux-doc_*.deb Depends | sed -n 's/^\(linux-doc-[0-9.]*\) *(= *\([^)]*\)).*/\1=\2/p')
[ -n "$real" ] || { echo "fetch_linux_docs.sh: cannot read the dependency of linux-doc" >&2; exit 1; }
apt-get download "$real"
dpkg-deb -x linux-doc-[0-9]*.deb tree
docs=$(find tree/usr/share/doc -maxdepth 2 -type d -name Documentation | head -n 1)
[ -n "$docs" ] || { echo "fetch_linux_docs.sh: no Documentation/ folder in $real" >&2; exit 1; }

# Debian gzips the larger files; small ones stay plain. Print each source uncompressed, in order.
# Everything is built in the work folder and checked (non-empty) first; only then do the files move
# into the cache, the checksums last, so an interrupted or failed fetch leaves no half-written corpus.
staged="$work/out"
mkdir -p "$staged"
concat() {  # concat DIR OUTPUT
    [ -d "$1" ] || { echo "fetch_linux_docs.sh: no folder $1 in $real" >&2; exit 1; }
    find "$1" -type f \( -name '*.rst' -o -name '*.rst.gz' \) -print0 | LC_ALL=C sort -z > "$work/list"
    xargs -0 -n 64 sh -c 'for f; do case "$f" in *.gz) gzip -dc "$f" || exit 255 ;; *) cat "$f" || exit 255 ;; esac; done' \
        sh < "$work/list" > "$2" || { echo "fetch_linux_docs.sh: could not read the sources under $1" >&2; exit 1; }
    [ -s "$2" ] || { echo "fetch_linux_docs.sh: no reST sources under $1" >&2; exit 1; }
}
concat "$docs" "$staged/linux-docs.txt"
concat "$docs/networking" "$staged/linux-docs-networking.txt"
copyright=$(find tree/usr/share/doc -maxdepth 2 -name copyright | head -n 1)
[ -n "$copyright" ] || { echo "fetch_linux_docs.sh: no copyright file in $real" >&2; exit 1; }
cp "$copyright" "$staged/COPYING-linux-doc.txt"
(cd "$staged" && sha256sum linux-docs.txt linux-docs-networking.txt > SHA256SUMS)

# Into the cache: the old checksums go first (a corpus without them is refetched), the new ones last.
rm -f "$out_dir/SHA256SUMS"
for name in linux-docs.txt linux-docs-networking.txt COPYING-linux-doc.txt SHA256SUMS; do
    cp "$staged/$name" "$out_dir/$name.part" && mv "$out_dir/$name.part" "$out_dir/$name"
done

echo "package: $real"
echo "linux-docs:            $(wc -c < "$out_dir/linux-docs.txt") bytes"
echo "linux-docs-networking: $(wc -c < "$out_dir/linux-docs-networking.txt") bytes"
echo "written to $out_dir"
