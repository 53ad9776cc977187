#!/bin/sh
# The edge images' default command (installed as /usr/local/bin/bedside-agent-start).
#
# First start of a device: $BEDSIDE_HOME/agent.toml does not exist yet, so the device enrols
# with the single-use token the data team made ('bedside aggregator invite'): it makes its own
# keys, checks the endpoint's pinned certificate, gets its broker certificate and the model, and
# writes agent.toml. The token is then deleted (it is used up either way). Every start after
# that runs the agent at once. 'exec' makes the agent PID 1: 'docker stop' (SIGTERM) stops its
# loop cleanly.
#
#   BEDSIDE_HOME        the device's directory, a volume (default /var/lib/bedside)
#   BEDSIDE_TOKEN_FILE  the token (default $BEDSIDE_HOME/enroll.token; a Docker secret works)
set -eu

home="${BEDSIDE_HOME:-/var/lib/bedside}"
config="$home/agent.toml"

if [ ! -f "$config" ]; then
    token="${BEDSIDE_TOKEN_FILE:-$home/enroll.token}"
    if [ ! -f "$token" ]; then
        echo "bedside-agent-start: $config does not exist and there is no enrollment token at" \
             "$token. Put the line 'bedside aggregator invite' printed there (or set" \
             "BEDSIDE_TOKEN_FILE), or mount a device directory that holds agent.toml." >&2
        exit 2
    fi
    # A failure (aggregator not reachable yet) exits non-zero: the container's restart policy
    # tries again, with the keys made by this attempt.
    bedside edge enroll --token-file "$token" --dir "$home"
    rm -f "$token" 2>/dev/null \
        || echo "bedside-agent-start: could not delete $token (read-only?);" \
        "it is used up, delete it where it came from" >&2
fi

exec bedside edge run --config "$config"
