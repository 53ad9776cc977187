#!/bin/sh
# The HEALTHCHECK of the Bedside images (installed as /usr/local/bin/bedside-healthcheck):
#
#   bedside-healthcheck agent AGENT_TOML            a verified model is in service
#   bedside-healthcheck aggregator AGGREGATOR_TOML  the federation has a model version
#
# Both read local state only (the 'status --json' commands: no network, no torch). Exit 0:
# healthy; anything else: not (a failing 'bedside' command says why on standard error).
set -eu

case "${1:-}" in
    agent)
        status="$(bedside edge status --json --config "$2")"
        printf '%s' "$status" \
            | python -c 'import json, sys; sys.exit(json.load(sys.stdin)["serving_version"] is None)'
        ;;
    aggregator)
        status="$(bedside aggregator status --json --config "$2")"
        printf '%s' "$status" \
            | python -c 'import json, sys; sys.exit(not json.load(sys.stdin)["versions"])'
        ;;
    *)
        echo "usage: bedside-healthcheck agent|aggregator CONFIG" >&2
        exit 2
        ;;
esac
