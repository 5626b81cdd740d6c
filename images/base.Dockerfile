# A local stand-in for gcr.io/distroless/cc-debian12:nonroot, for machines
# that reach no container registry: only the shared libraries the dishpatch
# binaries load, CA certificates, and the nonroot user. No shell, no package
# manager. `hack/images.sh base` assembles rootfs/ from the host (Debian 12,
# the same release distroless is built from) and builds this.
FROM scratch
COPY rootfs/ /
USER 65532:65532
