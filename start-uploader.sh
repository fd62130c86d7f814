#!/usr/bin/env bash
# Start the uploader with uv: no image build, the script's dependencies come from
# its inline metadata.
#
#   ./start-uploader.sh [CONFIG_FILE] [extra flags...]
#       runs the script here, with uv (exec: SIGTERM reaches the uploader)
#   ./start-uploader.sh --container [CONFIG_FILE] [extra flags...]
#       runs it in the public uv image (ghcr.io/astral-sh/uv), as
#       examples/docker-compose.yml does: the script and config mounted read-only, the
#       sensor data directory read-only at /data, the state directory at /state
#
# CONFIG_FILE defaults to $UPLOADER_CONFIG, else ./uploader-config.yaml. Secrets come
# from the environment (DATABRICKS_TOKEN, ...), never from this script's arguments.
# Container mode reads:
#   DATA_DIR    host directory of the SQLite file (default ./data); the config's
#               sqlite path must then be /data/<file> (or set SQLITE_PATH=/data/<file>)
#   STATE_HOST_DIR  host directory for last_upload.json (default ./state)
#   UV_IMAGE    the image (default ghcr.io/astral-sh/uv:python3.12-bookworm-slim)
#   SOURCE_ID   this node's identity (required: a container's host name changes)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/sqlite_to_databricks_uploader.py"

container=false
if [[ "${1:-}" == "--container" ]]; then
    container=true
    shift
fi
config="${UPLOADER_CONFIG:-./uploader-config.yaml}"
if [[ $# -gt 0 && "$1" != -* ]]; then
    config="$1"
    shift
fi
if [[ ! -f "$config" ]]; then
    echo "error: config file not found: $config (copy uploader-config.yaml.example" \
         "and edit it, or pass its path as the first argument)" >&2
    exit 2
fi

if [[ "$container" == false ]]; then
    if ! command -v uv >/dev/null 2>&1; then
        echo "error: uv is not installed; install it with 'pip install uv' or" \
             "'curl -LsSf https://astral.sh/uv/install.sh | sh', then run this again" >&2
        exit 2
    fi
    # exec: the uploader becomes this process, so SIGTERM from systemd, Docker or
    # Bacalhau reaches Python and it stops after the current batch.
    exec uv run --quiet --script "$script" --config "$config" "$@"
fi

if ! command -v docker >/dev/null 2>&1; then
    echo "error: --container needs docker; without it, run ./start-uploader.sh $config" >&2
    exit 2
fi
if [[ -z "${SOURCE_ID:-}" ]]; then
    echo "error: set SOURCE_ID (this node's identity in the _source_id column); a" \
         "container's host name changes with every container" >&2
    exit 2
fi
data_dir="$(cd "${DATA_DIR:-./data}" && pwd)"
state_dir="${STATE_HOST_DIR:-./state}"
mkdir -p "$state_dir"
state_dir="$(cd "$state_dir" && pwd)"
config_abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"

# Pass on the settings the uploader reads from the environment, when they are set here
# (their values never appear on this command line: `-e NAME` copies them).
env_args=()
for name in SOURCE_ID SQLITE_PATH SQLITE_TABLE_NAME TIMESTAMP_COL BATCH_SIZE \
        UPLOAD_INTERVAL ONCE DELTA_URI DATABRICKS_HOST DATABRICKS_HTTP_PATH \
        DATABRICKS_TOKEN DATABRICKS_DATABASE DATABRICKS_CATALOG DATABRICKS_SCHEMA \
        DATABRICKS_TABLE DATABRICKS_CLIENT_ID DATABRICKS_CLIENT_SECRET DATABRICKS_VOLUME \
        SANITIZE_HASH_KEY LOG_LEVEL LOG_FORMAT; do
    if [[ -n "${!name:-}" ]]; then
        env_args+=(-e "$name")
    fi
done

# exec: docker run passes SIGTERM to the container; --init forwards it to uv, which
# forwards it to Python.
exec docker run --rm --init --name "sqlite-uploader-${SOURCE_ID}" \
    -v "$script:/app/sqlite_to_databricks_uploader.py:ro" \
    -v "$config_abs:/app/uploader-config.yaml:ro" \
    -v "$data_dir:/data:ro" \
    -v "$state_dir:/state" \
    -e STATE_DIR=/state -e UV_PYTHON_DOWNLOADS=never "${env_args[@]}" \
    "${UV_IMAGE:-ghcr.io/astral-sh/uv:python3.12-bookworm-slim}" \
    uv run --quiet --script /app/sqlite_to_databricks_uploader.py \
    --config /app/uploader-config.yaml "$@"
