#!/usr/bin/env bash
# Makes sure the real services the tests use answer on loopback, starting any that does not
# (with the same commands the machine image uses). Usage: scripts/services.sh redis postgres ...
set -u
up() { # name, check command
  local name=$1; shift
  for _ in $(seq 1 50); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "services: $name is not answering" >&2; return 1
}
status=0
for svc in "$@"; do
  case $svc in
    redis)
      redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || {
        echo "services: starting Redis" >&2
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
          --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null
      }
      up redis redis-cli -h 127.0.0.1 -p 6379 ping || status=1 ;;
    postgres)
      pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 || {
        echo "services: starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start >/dev/null 2>&1
      }
      up postgres psql -h 127.0.0.1 -U postgres -d test -c 'select 1' || status=1 ;;
    *) echo "services: unknown service $svc" >&2; status=1 ;;
  esac
done
exit $status
