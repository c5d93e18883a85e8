#!/bin/sh
# Entrypoint of the consul-esm image. Arguments that start with "-" are flags for consul-esm:
#   docker run consul-esm -config-dir=/consul-esm/config     runs /bin/consul-esm -config-dir=...
# Anything else runs as given (docker run -it consul-esm sh). exec keeps consul-esm as PID 1, so
# `docker stop` (SIGTERM) reaches it and it shuts down gracefully.
set -e

if [ "${1#-}" != "$1" ]; then
	set -- "${CONSUL_ESM_BINARY:-/bin/consul-esm}" "$@"
fi

exec "$@"
