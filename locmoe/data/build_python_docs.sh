#!/bin/sh
# Rebuild the embedded default corpus: the reST sources of the Python 3.11 documentation, as shipped
# in Debian's python3.11-doc package (PSF licence), concatenated in C-locale sorted path order.
#
# Usage: sh locmoe/data/build_python_docs.sh [OUTPUT_DIR]      (default: the corpora/ folder beside this script)
#        PYDOC_VERSION=3.11.2-6+deb12u9 pins the Debian package version (empty = the archive's candidate).
#
# Writes OUTPUT_DIR/python-3.11-docs.txt.xz, OUTPUT_DIR/LICENSE-PSF.txt (the package's copyright file,
# which carries the PSF licence) and OUTPUT_DIR/SHA256SUMS (sha256 of the uncompressed text).
# Needs: apt-get (a Debian/Ubuntu archive that carries python3.11-doc), dpkg-deb, xz, sha256sum.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out_dir=${1:-"$here/corpora"}
version=${PYDOC_VERSION-3.11.2-6+deb12u9}
name=python-3.11-docs.txt

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out_dir"

cd "$work"
if [ -n "$version" ]; then
    apt-get download "python3.11-doc=$version"
else
    apt-get download python3.11-doc
fi
dpkg-deb -x python3.11-doc_*.deb tree

sources=tree/usr/share/doc/python3.11/html/_sources
# Sorted under the C locale so the byte order of paths (not the user's locale) fixes the text.
find "$sources" -type f -name '*.rst.txt' -print0 | LC_ALL=C sort -z | xargs -0 cat > "$name"

# Single-threaded xz: the multi-threaded encoder splits blocks differently, so its output varies.
xz -9 -T1 -c "$name" > "$out_dir/$name.xz"
cp tree/usr/share/doc/python3.11-doc/copyright "$out_dir/LICENSE-PSF.txt"
sha256sum "$name" > "$out_dir/SHA256SUMS"

echo "package: $(dpkg-deb -f python3.11-doc_*.deb Package) $(dpkg-deb -f python3.11-doc_*.deb Version)"
echo "files:   $(find "$sources" -type f -name '*.rst.txt' | wc -l) reST sources"
echo "text:    $(wc -c < "$name") bytes, sha256 $(cut -d' ' -f1 "$out_dir/SHA256SUMS")"
echo "xz:      $(wc -c < "$out_dir/$name.xz") bytes -> $out_dir/$name.xz"
