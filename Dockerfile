# lfuse in a container: restore (if the volume is empty), mount, run the
# application, ship every commit when it stops. Build: docker build -t lfuse .
# Run it as in examples/README.md (it needs /dev/fuse and CAP_SYS_ADMIN).
FROM golang:1.26-alpine AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# lfuse needs no cgo: a static binary runs on any base image.
RUN CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o /out/lfuse ./cmd/lfuse

FROM alpine:3.20
RUN apk add --no-cache fuse3 ca-certificates sqlite
COPY --from=build /out/lfuse /usr/local/bin/lfuse
# The mount point of examples/lfuse.toml: lfuse refuses one that does not
# exist, and nothing else in the image or the StatefulSet makes it.
RUN mkdir -p /data
# The application's image adds itself here and sets exec in the config.
ENTRYPOINT ["lfuse", "mount", "-config", "/etc/lfuse.toml"]
