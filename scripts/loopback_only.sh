#!/usr/bin/env bash
# Runs a command whose only network is the loopback interface: a new network namespace (`unshare --net`) with `lo`
# up. `make test` runs the test suite so. The tests only ever talk to 127.0.0.1, but some libraries listen on every
# interface whatever address they are given (torch's TCPStore, which accelerate's launches start, binds all of
# them), and vLLM looks for the machine's outward address; in the namespace there is no interface but `lo`, so
# nothing a test starts can be reached from, or reach, another machine. Where no namespace can be made (it needs
# root), or with BIMODE_LOOPBACK_ONLY=0, the command runs on the machine's network, and this says so.
set -euo pipefail
if [ "${BIMODE_LOOPBACK_ONLY:-1}" != 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null \
        && unshare --net true 2>/dev/null; then
    exec unshare --net sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "loopback_only.sh: running on the machine's network (no network namespace: it needs root and unshare)" >&2
exec "$@"
