#!/usr/bin/env bash
# Make this machine able to build and run the image: `make test-images` runs it first.
#
# With a Docker engine that answers, there is nothing to do. Otherwise (a Debian
# machine with root and no daemon) it installs podman from Debian's packages and
# configures it for machines like the ones CI runs on:
#   - runc as the OCI runtime (crun fails on cgroup v1 hosts such as these);
#   - netavark networking, which needs Debian's iptables;
#   - default container ulimits below the host's hard limits (podman's own
#     defaults ask for more open files than such hosts allow, and every
#     container then fails to start);
#   - debootstrap, to build the base image when no registry can be reached.
# podman-compose comes from PyPI (requirements-dev.lock) into the venv.
set -euo pipefail

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  echo "container engine: docker"
  exit 0
fi

SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
missing=()
for tool in podman runc debootstrap iptables; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (and what podman needs) with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    podman runc netavark aardvark-dns iptables debootstrap uidmap >/dev/null
fi

conf=/etc/containers/containers.conf.d/50-shoal.conf
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=65536
nofile=$(( nofile < 65536 ? nofile : 65536 ))
nproc=$(( nproc < 16384 ? nproc : 16384 ))
want=$(cat <<EOF
# Written by deploy/container-host.sh for \`make test-images\`.
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
EOF
)
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
  $SUDO mkdir -p "$(dirname "$conf")"
  printf '%s\n' "$want" | $SUDO tee "$conf" >/dev/null
  echo "podman configured: $conf"
fi
echo "container engine: $(podman --version)"
