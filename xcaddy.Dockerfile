# Caddy with the restream_auth plugin, configured as a Restream API sidecar
# (caddyfile.example).
#
# Build from this source tree (the default):
#   docker build -f xcaddy.Dockerfile -t caddy-restream-auth .
# or from the published module instead (COPY . /src is then unused):
#   docker build -f xcaddy.Dockerfile --build-arg PLUGIN_VERSION=v0.1.0 -t caddy-restream-auth .
#
# Run; the named volume keeps the rotating token chain across restarts and
# upgrades (Restream invalidates the old refresh token on every refresh, so
# losing it means re-authorizing):
#   docker run -d --name restream-sidecar -p 127.0.0.1:8080:8080 \
#     -e RESTREAM_CLIENT_ID -e RESTREAM_CLIENT_SECRET -e RESTREAM_REFRESH_TOKEN \
#     -v restream-data:/data caddy-restream-auth

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

# The base image runs: caddy run --config /etc/caddy/Caddyfile --adapter caddyfile
