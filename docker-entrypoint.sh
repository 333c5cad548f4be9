#!/bin/sh
# The official envoyproxy/envoy image's entrypoint contract, with sesame as PID 1 in its place:
# - arguments that start with a flag are Envoy's (`docker run IMAGE -c /x.yaml`);
# - `loglevel` adds `--log-level` to an Envoy command;
# - as root, Envoy (or any other command) runs as the user `envoy`; ENVOY_UID and ENVOY_GID
#   change its ids, ENVOY_UID=0 keeps root. sesame itself stays root: it signals, reaps and owns
#   its control socket. SESAME_ENVOY_USER, when set, wins over all of this.
# Unlike the official script, no usermod/groupmod: the ids go to sesame as they are (it takes
# numeric ids), so /etc/passwd is never edited and a read-only root filesystem works.
set -e

if [ "${1#-}" != "$1" ]; then
    set -- envoy "$@"
fi
if [ "$1" = envoy ] && [ -n "${loglevel:-}" ]; then
    set -- "$@" --log-level "$loglevel"
fi

if [ -z "${SESAME_ENVOY_USER:-}" ] && [ "${ENVOY_UID:-}" != 0 ] && [ "$(id -u)" = 0 ]; then
    user="${ENVOY_UID:-envoy}"
    if [ -n "${ENVOY_GID:-}" ]; then
        user="$user:$ENVOY_GID"
    elif [ -n "${ENVOY_UID:-}" ]; then
        # As `usermod -u` would leave it: the new uid in the envoy group.
        user="$user:envoy"
    fi
    # Envoy opens /dev/stdout and /dev/stderr by name for access logs: the container's log pipes
    # must be the user's, as the official image makes them.
    chown "$user" /dev/stdout /dev/stderr
    export SESAME_ENVOY_USER="$user"
fi

exec sesame run -- "$@"
