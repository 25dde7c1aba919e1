#!/usr/bin/env bash
# Builds the Entrepot container image with no registry: the binary is compiled on this
# machine, staged into an otherwise empty root file system, and `docker build` turns that
# into a FROM scratch image (see the Dockerfile at the repository root).
#
# Usage: bash docker/build.sh [--tag NAME:TAG] [--dynamic]
#   --tag      image tag [default: entrepot:dev]
#   --dynamic  link glibc dynamically and copy the shared libraries `ldd` lists into the
#              image, instead of the default static binary (needs no libc.a on the host)
#
# Static is the default: glibc's libc.a (Debian's libc6-dev) with `crt-static` on the host
# target, so no musl target is needed. The static binary goes to
# target/<host triple>/container/ (profile `container`: release without debug info), apart
# from the ordinary target/release/entrepot, so the two
# builds never overwrite each other's artifacts.
#
# Staged root (the build context; never the repository, so target/ is not sent):
#   rootfs/usr/local/bin/entrepot   stripped binary
#   rootfs/etc/passwd, etc/group    root and `entrepot` (65532), so tools show a name
#   rootfs/etc/nsswitch.conf        hosts: files dns, for peer names (issue 7)
#   rootfs/<lib paths>              only with --dynamic: ld-linux, libc, libm, libgcc_s, ...
#   data/                           empty; copied to /data owned by 65532:65532
set -euo pipefail

tag="entrepot:dev"
link="static"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --dynamic) link="dynamic"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "docker/build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
cargo="${CARGO:-cargo}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

if [[ "$link" == "static" ]]; then
  host="$(rustc -vV | sed -n 's/^host: //p')"
  # --target keeps RUSTFLAGS off build scripts and proc macros (they stay dynamic host
  # programs) and puts the static artifacts in their own directory.
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    "$cargo" build --profile container --target "$host" --bin entrepot
  binary="$target_dir/$host/container/entrepot"
else
  "$cargo" build --profile container --bin entrepot
  binary="$target_dir/container/entrepot"
fi

staging="$(mktemp -d "${TMPDIR:-/tmp}/entrepot-image.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
rootfs="$staging/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp" "$staging/data"
chmod 1777 "$rootfs/tmp"

# The release profile keeps line tables (debug = 1) for profiling; the image does not need them.
strip --strip-debug -o "$rootfs/usr/local/bin/entrepot" "$binary"

# Shared libraries, with the paths the binary's loader looks them up at (ld-linux included).
# A static binary has none: ldd prints "statically linked" (static-pie) or "not a dynamic
# executable" (exit 1), and nothing is copied.
if ldd_out="$(ldd "$binary" 2>&1)"; then
  while read -r lib; do
    cp -L --parents "$lib" "$rootfs/"
  done < <(awk '/=> \// { print $3 } /^\t*\// { print $1 }' <<<"$ldd_out")
elif [[ "$link" == "dynamic" ]]; then
  echo "docker/build.sh: ldd failed on $binary: $ldd_out" >&2
  exit 1
fi

cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
entrepot:x:65532:65532:entrepot:/data:/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
entrepot:x:65532:
GROUP
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"

cp "$repo/Dockerfile" "$staging/Dockerfile"
# The legacy builder (no buildx here) is what Docker Engine 20.10 offers without plugins;
# FROM scratch needs no registry with either builder.
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --quiet -f "$staging/Dockerfile" -t "$tag" "$staging" >/dev/null
echo "built $tag ($link, $(docker image inspect -f '{{.Size}}' "$tag") bytes)"
