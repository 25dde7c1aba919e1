# Entrepot broker image: one binary in an otherwise empty FROM scratch image, running as
# uid 65532 with the message store on the /data volume.
#
# Build (no registry needed; nothing is pulled):
#   bash docker/build.sh                 # tag entrepot:dev; --tag NAME:TAG for another
# The build context is not the repository: docker/build.sh compiles a static `entrepot`
# on the host (glibc crt-static; `--dynamic` copies the libraries `ldd` lists instead),
# stages it with /etc/passwd, /etc/group and an empty data/ into a temporary directory and
# runs `docker build` there. A plain `docker build .` in the repository fails by design.
#
# Run:
#   docker run --rm -p 5672:5672 -p 8080:8080 -v entrepot-data:/data entrepot:dev
#   docker run --rm entrepot:dev --sync never       # extra `serve` flags go after the image
#   docker run --rm --entrypoint /usr/local/bin/entrepot entrepot:dev validate /manifests
#
# The ENTREPOT_* defaults below win over the same keys of a `--config` file (variables and
# flags override the file): change them with `-e ENTREPOT_...=` or a flag, not the file.
# No HEALTHCHECK: the image has no shell or client to run one. Probe GET /healthz (live)
# and /readyz (ready) on port 8080 from the orchestrator instead.
FROM scratch

COPY rootfs/ /
# Owned by the broker's user, so a fresh named volume (which copies the image's /data,
# ownership included) is writable without running as root.
COPY --chown=65532:65532 data/ /data/

USER 65532:65532
WORKDIR /data
VOLUME /data
# 5671: AMQP over TLS, once a certificate is given (--listen-tls with --tls-cert/--tls-key).
# 5673: the inter-node (Raft) port of a clustered node (--peers or --peers-dns).
EXPOSE 5671 5672 5673 8080

ENV ENTREPOT_LISTEN=0.0.0.0:5672 \
    ENTREPOT_HTTP=0.0.0.0:8080 \
    ENTREPOT_DATA_DIR=/data \
    NO_COLOR=1

ENTRYPOINT ["/usr/local/bin/entrepot", "serve"]
