# Caddy with the restream_auth plugin, configured as a Restream API sidecar
# (caddyfile.example). The image is called caddy-restream-auth everywhere
# (README.md, docs/deployment.md, deploy/).
#
# Build from this source tree (the default):
#   docker build -f xcaddy.Dockerfile -t caddy-restream-auth .
# or from the published module instead (COPY . /src is then unused):
#   docker build -f xcaddy.Dockerfile --build-arg PLUGIN_VERSION=v0.1.0 -t caddy-restream-auth .
#
# Run with the secrets from an env file (never on the command line), the API
# published on the host's loopback only, and a named volume that keeps the
# rotating token chain across restarts and upgrades (Restream invalidates the
# old refresh token on every refresh, so losing it means re-authorizing):
#   docker run -d --name restream-sidecar --env-file restream.env \
#     -p 127.0.0.1:8080:8080 -v restream-data:/data caddy-restream-auth
# restream.env holds RESTREAM_CLIENT_ID, RESTREAM_CLIENT_SECRET and
# RESTREAM_REFRESH_TOKEN (see caddyfile.example).

ARG CADDY_VERSION=2.11.9

FROM caddy:${CADDY_VERSION}-builder AS builder
ARG CADDY_VERSION

# "local": build the plugin from the build context copied to /src.
# Anything else: a version of the published module (v0.1.0, latest, a commit).
ARG PLUGIN_VERSION=local
ARG PLUGIN_MODULE=github.com/restream-sidecar/caddy-restream-auth
# go.mod may ask for a newer Go than the builder image ships; let the go
# command fetch that toolchain instead of failing.
ARG GOTOOLCHAIN=auto

COPY . /src

RUN set -eux; \
	if [ "$PLUGIN_VERSION" = "local" ]; then \
		GOTOOLCHAIN="$GOTOOLCHAIN" xcaddy build "v${CADDY_VERSION#v}" \
			--with "$PLUGIN_MODULE=/src" \
			--output /usr/bin/caddy; \
	else \
		GOTOOLCHAIN="$GOTOOLCHAIN" xcaddy build "v${CADDY_VERSION#v}" \
			--with "$PLUGIN_MODULE@$PLUGIN_VERSION" \
			--output /usr/bin/caddy; \
	fi; \
	/usr/bin/caddy list-modules | grep -q '^http.handlers.restream_auth$'

FROM caddy:${CADDY_VERSION}

COPY --from=builder /usr/bin/caddy /usr/bin/caddy
COPY caddyfile.example /etc/caddy/Caddyfile

# Caddy's storage (XDG_DATA_HOME=/data in this image) holds the token chain.
VOLUME /data
EXPOSE 8080

# caddyfile.example binds the API listener to 127.0.0.1 unless RESTREAM_BIND
# says otherwise; a published port reaches it only through the container's
# network interface. Publish it on the host's loopback
# (-p 127.0.0.1:8080:8080), never on every interface, and keep the container
# off networks shared with containers you do not trust: the listener adds
# the account's credentials to whatever reaches it.
ENV RESTREAM_BIND=0.0.0.0

# restream_auth_health on caddyfile.example's health listener: healthy while
# the account can serve requests (busybox wget is in the base image). A new
# chain waiting for its first authorization is unhealthy until then.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
	CMD wget -q -O /dev/null http://127.0.0.1:9180/healthz || exit 1

# The base image runs: caddy run --config /etc/caddy/Caddyfile --adapter caddyfile
