# The `helm test` client: bash, curl and openssl (to sign an HS256 token).
ARG BASE=debian:12-slim
FROM ${BASE}
RUN if ! command -v curl >/dev/null || ! command -v openssl >/dev/null; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl openssl ca-certificates && \
      rm -rf /var/lib/apt/lists/*; fi
USER 65532:65532
ENTRYPOINT ["/bin/bash"]
