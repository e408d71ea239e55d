#!/usr/bin/env bash
# What tests/test_interop.py needs: cargo and Debian's packaged Rust crates,
# installed when missing and this user may (root, or sudo without a password).
set -euo pipefail

# tests/test_interop.py builds tests/interop (the seed's types under real serde)
# offline, against Debian's packaged Rust crates; cargo comes from rustup's
# ~/.cargo/bin or, failing that, from Debian. Without them that test fails.
crates=(librust-serde-dev librust-serde-derive-dev librust-serde-json-dev librust-chrono-dev librust-uuid-dev)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
missing=()
for pkg in "${crates[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
command -v cargo >/dev/null || missing+=(cargo)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        apt=(apt-get)
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        apt=(sudo apt-get)
    else
        apt=()
        echo "tests/interop/setup.sh: cannot install ${missing[*]} (not root); the interop tests will fail" >&2
    fi
    if ((${#apt[@]})); then
        "${apt[@]}" update -qq
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq "${missing[@]}" >/dev/null
    fi
fi

