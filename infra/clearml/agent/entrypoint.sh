#!/bin/sh
# Entry point of the housing ClearML agent container.
#   housing-agent-entrypoint daemon    # worker for $CLEARML_AGENT_QUEUES (default: "default")
#   housing-agent-entrypoint services  # services-mode worker for $CLEARML_AGENT_QUEUES
# Any other arguments are passed to clearml-agent unchanged.
# Credentials come from CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY; they are never printed.
set -eu

mode="${1:-daemon}"

case "$mode" in
    daemon | services)
        if [ -z "${CLEARML_API_ACCESS_KEY:-}" ] || [ -z "${CLEARML_API_SECRET_KEY:-}" ]; then
            echo "clearml-agent: no credentials." >&2
            echo "  Set CLEARML_AGENT_ACCESS_KEY and CLEARML_AGENT_SECRET_KEY in infra/clearml/.env" >&2
            echo "  (web UI: Settings > Workspace > Create new credentials), then run" >&2
            echo "  docker compose --profile agent up -d clearml-agent   (or --profile services ...)" >&2
            exit 78
        fi
        queues="${CLEARML_AGENT_QUEUES:-default}"
        echo "clearml-agent: ${mode} mode, server ${CLEARML_API_HOST:-?}, queues: ${queues}," \
            "access key ${CLEARML_API_ACCESS_KEY%"${CLEARML_API_ACCESS_KEY#????}"}..."
        set -- daemon --foreground --cpu-only --create-queue
        if [ "$mode" = services ]; then
            set -- "$@" --services-mode
        fi
        # Word splitting of $queues is intended: "default cpu" means two queues.
        # shellcheck disable=SC2086
        exec clearml-agent "$@" --queue $queues
        ;;
    *)
        exec clearml-agent "$@"
        ;;
esac
