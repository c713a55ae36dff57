# docker/kubernetes.yml's image for the test: op-bridge-openclaw plus the fake 1Password (its
# store and control file, root-only) and a stand-in `openclaw` that just stays up.
# Context: a directory holding store.json, control.json and openclaw.
ARG IMAGE=op-bridge-openclaw
FROM ${IMAGE}
COPY --chown=0:0 --chmod=0600 store.json control.json /fake/
COPY --chown=0:0 --chmod=0755 openclaw /usr/local/bin/openclaw
ENV FAKE_OP_STORE=/fake/store.json FAKE_OP_CONTROL=/fake/control.json
