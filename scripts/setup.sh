#!/usr/bin/env bash
# Idempotent setup of a fresh Debian 12 machine (run as root): system packages, the Python
# environment in .venv with bpfnet and its dev extras, and the BPF objects.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(clang-16 clang-format-16 llvm-16 libbpf-dev libbpf1 bpftool libpcap-dev libpcap0.8 iproute2 nftables
          iptables tcpdump xdp-tools ethtool iperf3 python3-venv python3-dev gcc etcd-server etcd-client
          podman runc containernetworking-plugins busybox-static)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# etcd-server's package enables (and, where services may start, starts) a system etcd on
# 127.0.0.1:2379. bpfnet does not use it: `bpfnet agent --store etcd://...` talks to the cluster the
# operator runs, and the tests start their own members on free loopback ports. Keep it off.
if [[ -d /run/systemd/system ]]; then
  systemctl disable --now etcd.service >/dev/null 2>&1 || true
else
  systemctl disable etcd.service >/dev/null 2>&1 || true
  if [[ -x /etc/init.d/etcd ]]; then
    update-rc.d etcd disable >/dev/null 2>&1 || true
    # only the service's own process (its pid file): never the etcd members tests run
    if [[ -s /run/etcd.pid ]]; then /etc/init.d/etcd stop >/dev/null 2>&1 || true; fi
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -qq --upgrade pip
.venv/bin/python -m pip install -qq -e '.[dev]'
.venv/bin/python hatch_build.py >/dev/null
echo "setup: ready (.venv/bin/bpfnet)"
