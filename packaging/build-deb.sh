#!/usr/bin/env bash
# Builds target/debian/cbgate_<version>-1_<arch>.deb: the release binary, the systemd unit, the
# default configuration (a conffile), the man page and the bash, zsh and fish completions.
#
# cargo-deb packs files but runs nothing of ours, and a build script cannot see the binary's
# clap definition, so the man page and completions come from the built binary itself
# (`cbgate man --dir`, `cbgate completions SHELL`): they cannot drift from its flags.
#
# Needs cargo-deb (`cargo install cargo-deb --locked`) and dpkg-dev (dpkg-shlibdeps, for Depends).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin cbgate
target_dir="${CARGO_TARGET_DIR:-target}"
bin="$target_dir/release/cbgate"
out="$target_dir/release/packaging"   # cargo-deb's assets: target/release/packaging/*
rm -rf "$out"
mkdir -p "$out"
mkdir "$out/man"
"$bin" man --dir "$out/man"   # cbgate.1 and cbgate-SUBCOMMAND.1
"$bin" completions bash > "$out/cbgate.bash"
"$bin" completions zsh > "$out/_cbgate"
"$bin" completions fish > "$out/cbgate.fish"
for f in man/cbgate.1 man/cbgate-serve.1 cbgate.bash _cbgate cbgate.fish; do
  [ -s "$out/$f" ] || { echo "build-deb.sh: $out/$f is empty" >&2; exit 1; }
done
# Debian policy: man pages gzipped, reproducibly (-n: no name or time stamp). cargo-deb would
# compress them itself, but not files it takes from target/release/.
gzip -9n "$out"/man/*.1
cargo deb --no-build --locked "$@"
