#!/usr/bin/env bash
# Starts a tpserve head node: Ray (token auth), Redis (password made once, listening only on
# $TPSERVE_BIND), nginx in front of Serve, then the Serve app from a Serve config file.
# Redis and nginx belong to a detached Ray actor (infra/services.py), so `ray stop` -- and
# so `ray down` -- stops them too. Run by cluster.yaml's head_start_ray_commands; extra
# arguments go to `ray start`.
#
# Knobs (environment): TPSERVE_BIND (default: the first address of `hostname -I`),
# TPSERVE_RAY_PORT 6379, TPSERVE_DASHBOARD_PORT 8265, TPSERVE_REDIS_PORT 6380,
# TPSERVE_HTTP_PORT 8000 (Serve, loopback only), TPSERVE_NGINX_LISTEN 0.0.0.0:8080,
# TPSERVE_SERVE_CONFIG cluster/serve.yaml, TPSERVE_ENGINE_JSON '{}' (EngineConfig overrides),
# TPSERVE_STATE ~/.tpserve (Redis password and configs, nginx prefix). Ray's token: the
# one copied here (cluster.yaml's file_mounts), else one made in ~/.ray/auth_token.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then  # the project's environment (infra/install.sh makes it)
  export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
fi
export RAY_AUTH_MODE=token
python3 -m cluster.ray_token  # Ray refuses to start with token auth and no token: make one
set -a; . cluster/ray.env; set +a  # Serve's settings on this node (Ray reads them at start)
bind=${TPSERVE_BIND:-$(hostname -I | awk '{print $1}')}
ray_port=${TPSERVE_RAY_PORT:-6379}
dash_port=${TPSERVE_DASHBOARD_PORT:-8265}
redis_port=${TPSERVE_REDIS_PORT:-6380}
http_port=${TPSERVE_HTTP_PORT:-8000}
nginx_listen=${TPSERVE_NGINX_LISTEN:-0.0.0.0:8080}
serve_config=${TPSERVE_SERVE_CONFIG:-cluster/serve.yaml}
state=${TPSERVE_STATE:-$HOME/.tpserve}

# the routers find Redis through the environment Ray's workers inherit; never printed
TPSERVE_REDIS_URL=$(python3 -m infra.services redis-url --state "$state" --bind "$bind" \
  --redis-port "$redis_port")
export TPSERVE_REDIS_URL

# `ray start`, made again if Ray's own start timed out (a busy machine: infra/ray_start.py)
python3 -m infra.ray_start --head --node-ip-address "$bind" --port "$ray_port" \
  --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" --disable-usage-stats "$@"
python3 -m infra.services up --state "$state" --bind "$bind" --redis-port "$redis_port" \
  --nginx-listen "$nginx_listen" --upstream "127.0.0.1:$http_port" \
  --ray-address "$bind:$ray_port"
python3 -m cluster.control deploy "$serve_config" --dashboard "http://127.0.0.1:$dash_port" \
  --http-host 127.0.0.1 --http-port "$http_port" --engine-json "${TPSERVE_ENGINE_JSON:-{\}}"
echo "tpserve head up: nginx on $nginx_listen, Serve on 127.0.0.1:$http_port"
