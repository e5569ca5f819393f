#!/usr/bin/env bash
# Entrypoint of the shoprec image: `shoprec` by default, other programs pass through.
#   docker run IMAGE serve --port 8000   ->  shoprec serve --port 8000
#   docker run IMAGE airflow scheduler   ->  airflow scheduler
# Pass-through is an explicit list (not "anything on PATH"): `shoprec env` must not become
# /usr/bin/env. A path (containing "/") is always executed as given.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  exec shoprec --help
fi

case "$1" in
  shoprec | airflow | uvicorn | mlflow | feast | python | python3 | bash | sh | torchrun)
    exec "$@"
    ;;
  */*)
    exec "$@"
    ;;
  *)
    exec shoprec "$@"
    ;;
esac
