# syntax=docker/dockerfile:1
#
# consul-esm container image: a static Go build on a small Alpine base, run as the non-root user
# consul-esm (UID 100, GID 1000, as HashiCorp's image).
#
#   docker build -t consul-esm --build-arg GIT_COMMIT="$(git rev-parse --short HEAD)" .
#   docker run --rm --network host -v /etc/consul-esm.d:/consul-esm/config:ro consul-esm
#   docker run --rm --network host consul-esm -config-file=/consul-esm/config/consul-esm.hcl
#
# Arguments starting with "-" are passed to consul-esm; anything else runs as a command.
# Cross-builds work with buildx: docker buildx build --platform linux/arm64 .

ARG GO_VERSION=1.26
ARG ALPINE_VERSION=3.23

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-alpine AS build
ARG TARGETOS
ARG TARGETARCH
ARG GIT_COMMIT=""
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X 'main.GitCommit=${GIT_COMMIT}'" -o /out/consul-esm .

FROM alpine:${ALPINE_VERSION} AS release-default
ARG VERSION=dev
ARG GIT_COMMIT=""
ARG BIN_NAME=consul-esm
ENV BIN_NAME=$BIN_NAME

LABEL org.opencontainers.image.title="consul-esm" \
      org.opencontainers.image.description="External Service Monitor for HashiCorp Consul" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$GIT_COMMIT" \
      org.opencontainers.image.licenses="MPL-2.0" \
      version="$VERSION" \
      revision="$GIT_COMMIT"

# Alpine's base already has the CA bundle HTTPS checks need; nothing else is installed.
RUN addgroup -S -g 1000 consul-esm \
    && adduser -S -D -H -u 100 -G consul-esm -h /consul-esm -s /sbin/nologin consul-esm \
    && mkdir -p /consul-esm/config \
    && chown -R consul-esm:consul-esm /consul-esm

COPY LICENSE /usr/share/doc/consul-esm/LICENSE.txt
COPY --from=build /out/consul-esm /bin/consul-esm
COPY --chmod=0755 docker-entrypoint.sh /bin/docker-entrypoint.sh

USER consul-esm:consul-esm
WORKDIR /consul-esm
ENTRYPOINT ["/bin/docker-entrypoint.sh"]
CMD ["/bin/consul-esm", "-config-dir=/consul-esm/config"]
