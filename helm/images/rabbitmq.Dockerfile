# The in-chart RabbitMQ for development: Debian's rabbitmq-server.
# With a registry: docker build -f rabbitmq.Dockerfile .   (BASE=debian:12-slim
# installs the package). Without one, build.sh passes a base that already
# holds the package's files and INSTALL is skipped.
ARG BASE=debian:12-slim
FROM ${BASE}
ARG INSTALL=auto
RUN if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server && \
      rm -rf /var/lib/apt/lists/*; fi; \
    mkdir -p /var/lib/rabbitmq /etc/rabbitmq && chown -R 65532:65532 /var/lib/rabbitmq
ENV HOME=/var/lib/rabbitmq PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/bin
USER 65532:65532
EXPOSE 5672
# The server script itself, not Debian's wrapper (which insists on root or the rabbitmq user).
ENTRYPOINT ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
