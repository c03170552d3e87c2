#!/bin/sh
# Starts Redis for portcullis with `requirepass` taken from $REDISCLI_AUTH (the PORTCULLIS_REDIS_PASSWORD
# secret; the same variable lets `redis-cli` in the health checks authenticate). The password goes into
# /run/redis/auth.conf (a tmpfs, mode 0600) that redis.conf includes: it is in no manifest, no process
# argument and no file on a disk. Each byte is written as \xHH inside double quotes, so any password
# survives Redis's config parser. The same file is in deploy/kubernetes/redis/configmap.yaml and
# deploy/compose/redis-start.sh; tests/deploy checks they agree.
set -eu
: "${REDISCLI_AUTH:?must be set (from PORTCULLIS_REDIS_PASSWORD) and not empty: an empty requirepass turns authentication off}"
umask 077
hex=$(printf %s "$REDISCLI_AUTH" | od -An -v -tx1 | tr -d ' \n' | sed 's/../\\x&/g')
printf 'requirepass "%s"\n' "$hex" > /run/redis/auth.conf
exec redis-server /etc/redis/redis.conf
