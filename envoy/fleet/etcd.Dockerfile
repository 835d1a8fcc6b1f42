# etcd (Debian's etcd-server) FROM scratch, for the fleet: `make etcd-image` fills rootfs/
# with envoy/docker/rootfs.sh. Its data lives under /tmp, which user 101 may write.
FROM scratch
COPY rootfs/ /
USER 101:101
EXPOSE 2379 2380
ENTRYPOINT ["/usr/local/bin/etcd"]
