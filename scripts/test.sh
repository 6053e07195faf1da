#!/usr/bin/env bash
# Install what the tests need (when missing), then run the project's gates:
# formatting, lints, and the whole test suite against real NBD servers.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit)
command -v nbd-server >/dev/null 2>&1 || missing+=(nbd-server)
command -v qemu-nbd >/dev/null 2>&1 || missing+=(qemu-utils)
command -v nbdcopy >/dev/null 2>&1 || missing+=(libnbd-bin)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v script >/dev/null 2>&1 || missing+=(bsdutils)
command -v groff >/dev/null 2>&1 || missing+=(groff-base)
# TLS: the openssl crate builds against the system's OpenSSL (found with
# pkg-config), and the TLS tests make their certificates and keys with
# certtool and psktool.
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
{ command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; } || missing+=(libssl-dev)
{ command -v certtool && command -v psktool; } >/dev/null 2>&1 || missing+=(gnutls-bin)
# nbd+ssh: the tests start their own sshd on 127.0.0.1 (never the system
# service), log in with ssh, and run OpenBSD nc on the "remote" side.
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
{ command -v ssh && command -v ssh-keygen; } >/dev/null 2>&1 || missing+=(openssh-client)
{ command -v nc && nc -h 2>&1 | grep -q -- '-U'; } || missing+=(netcat-openbsd)

if ((${#missing[@]})); then
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    # Packages such as nbd-server start a system service when installed;
    # the tests start their own servers, so keep the system from starting
    # any while we install (and remove the guard only if we added it).
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    [ -z "$guard" ] || $sudo rm -f /usr/sbin/policy-rc.d
fi
# sshd refuses to start without its privilege separation directory.
if [ -x /usr/sbin/sshd ] && [ ! -d /run/sshd ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo mkdir -p -m 0755 /run/sshd
fi

cargo fmt --all -- --check
# The NBD crate builds alone, and an embedder of the library (no default
# features) gets neither the command line's crates nor the copier's in it.
cargo build --quiet -p nbdcp-nbd
cargo build --quiet -p nbdcp --no-default-features --lib
if cargo tree -p nbdcp --no-default-features -e normal | grep -E '(clap|env_logger|indicatif) v'; then
    echo "scripts/test.sh: the library without its cli feature depends on the crates above" >&2
    exit 1
fi
if cargo tree -p nbdcp-nbd -e normal | grep -E '^[^ ]*nbdcp v'; then
    echo "scripts/test.sh: the NBD crate depends on the copier" >&2
    exit 1
fi
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace --quiet 2>&1
# The fuzz crate replays its seed corpus and past findings (no libFuzzer).
(cd fuzz && cargo test --quiet 2>&1)
# The manual page and completions are what the clap definition gives.
cargo run --quiet -p xtask -- check
