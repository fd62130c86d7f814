#!/usr/bin/env bash
# Start the uploader with uv: no image build, the script's dependencies come from
# its inline metadata.
#
#   ./start-uploader.sh [CONFIG_FILE] [extra flags...]
#
# CONFIG_FILE defaults to $UPLOADER_CONFIG, else ./uploader-config.yaml. Secrets come
# from the environment (DATABRICKS_TOKEN), never from this script's arguments.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/sqlite_to_databricks_uploader.py"

config="${UPLOADER_CONFIG:-./uploader-config.yaml}"
if [[ $# -gt 0 && "$1" != -* ]]; then
    config="$1"
    shift
fi

if ! command -v uv >/dev/null 2>&1; then
    echo "error: uv is not installed; install it with 'pip install uv' or" \
         "'curl -LsSf https://astral.sh/uv/install.sh | sh', then run this again" >&2
    exit 2
fi
if [[ ! -f "$config" ]]; then
    echo "error: config file not found: $config (copy uploader-config.yaml.example" \
         "and edit it, or pass its path as the first argument)" >&2
    exit 2
fi

# exec: the uploader becomes this process, so SIGTERM from systemd, Docker or
# Bacalhau reaches Python and it stops after the current batch.
exec uv run --quiet --script "$script" --config "$config" "$@"
