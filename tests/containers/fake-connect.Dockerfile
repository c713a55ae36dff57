# The fake 1Password Connect server (tests/fake-connect/server.py) as a container, for the
# Compose fleet test. Context: a directory holding server.py.
ARG BASE_IMAGE=localhost/opb-bookworm:3
FROM ${BASE_IMAGE}
COPY server.py /srv/fake-connect/server.py
ENV FAKE_CONNECT_BIND=0.0.0.0 FAKE_CONNECT_PORT=8080
CMD ["python3", "/srv/fake-connect/server.py"]
