#!/usr/bin/env bash
# make deploy-smoke: build the CPU image and run it for real, on loopback.
#   1. a Debian base image made from Debian packages (no registry image can be pulled here);
#   2. a wheelhouse from pip download (torch: the local CPU wheel), so the build runs offline;
#   3. podman build --network none (runc + vfs storage: what works as root on these machines);
#   4. run the container with the default model mounted read-only, read-only root filesystem;
#   5. gRPC health check, one Generate, a scrape of /metrics;
#   6. SIGTERM and a clean drain: exit code 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${SMOKE_DIR:-/tmp/attnserve-smoke}
IMAGE=localhost/attnserve:cpu
BASE=localhost/pybase:bookworm
NAME=attnserve-smoke
GRPC_PORT=${SMOKE_GRPC_PORT:-50071}
METRICS_PORT=${SMOKE_METRICS_PORT:-8071}
MODEL=$($PY -m attnserve.model.fetch)

mkdir -p "$WORK"
cat > "$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
cat > "$WORK/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
CONF
export CONTAINERS_CONF="$WORK/containers.conf" CONTAINERS_STORAGE_CONF="$WORK/storage.conf"

step() { printf '\n== %s\n' "$*"; }

step "base image $BASE"
if ! podman image exists "$BASE"; then
  mmdebstrap --quiet --variant=minbase --include=python3-minimal,python3,python3-venv,passwd \
    bookworm "$WORK/base.tar" http://deb.debian.org/debian
  podman import --quiet "$WORK/base.tar" "$BASE" >/dev/null
fi

step "wheelhouse deploy/wheels"
$PY -m pip download --quiet --disable-pip-version-check -d deploy/wheels --only-binary=:all: \
  --find-links "${TORCH_WHEELS:-/opt/wheels}" -c requirements/constraints.txt \
  torch==2.13.0 numpy tokenizers safetensors gguf jinja2 grpcio grpcio-tools grpcio-health-checking \
  grpcio-reflection protobuf prometheus-client "setuptools>=68" wheel pip

step "podman build $IMAGE (offline)"
podman build --quiet --network none -f deploy/Dockerfile -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE" --build-arg PIP_ARGS="--no-index --find-links /wheels" . >/dev/null
podman image ls "$IMAGE"

step "run $NAME on 127.0.0.1:$GRPC_PORT (metrics :$METRICS_PORT)"
podman rm --force --ignore "$NAME" >/dev/null
podman run --detach --name "$NAME" --network host --read-only --tmpfs /tmp \
  --volume "$(dirname "$MODEL"):/models:ro" "$IMAGE" \
  --model "/models/$(basename "$MODEL")" --host 127.0.0.1 --port "$GRPC_PORT" \
  --metrics-host 127.0.0.1 --metrics-port "$METRICS_PORT" --dtype float32 --kv-cache-memory 256MiB \
  --shutdown-timeout 20 >/dev/null
trap 'podman rm --force --ignore "$NAME" >/dev/null 2>&1 || true' EXIT

step "health, Generate, /metrics, SIGTERM drain"
TARGET="127.0.0.1:$GRPC_PORT" METRICS="http://127.0.0.1:$METRICS_PORT/metrics" NAME="$NAME" $PY - <<'PYCODE'
import os, subprocess, threading, time, urllib.request
from client import Client

target, name = os.environ["TARGET"], os.environ["NAME"]
with Client(target, timeout=120) as c:
    deadline, status = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        try:
            status = c.health()
        except Exception:
            status = None
        if status == "SERVING":
            break
        time.sleep(1)
    print("health:", status)
    assert status == "SERVING"
    reply = c.generate("What is the capital of France?", chat=True, temperature=0, max_tokens=24)
    print("Generate:", repr(reply.text), "| tokens", reply.usage.completion_tokens)
    assert "Paris" in reply.text
metrics = urllib.request.urlopen(os.environ["METRICS"], timeout=10).read().decode()
lines = [l for l in metrics.splitlines() if l.startswith(("attnserve_request_success_total", "attnserve_generation_tokens_total"))]
print("/metrics:", *lines, sep="\n  ")
assert lines

# SIGTERM with a stream in flight: it must finish, then the container exits 0.
done = []
def stream():
    with Client(target, timeout=120) as c:
        done.append(sum(len(m.token_ids) for m in c.generate_stream("Tell me a story.", chat=True, max_tokens=32, ignore_eos=True, temperature=0)))
t = threading.Thread(target=stream); t.start()
time.sleep(1.0)
subprocess.run(["podman", "kill", "--signal", "TERM", name], check=True, capture_output=True)
t.join(120)
code = subprocess.run(["podman", "wait", name], capture_output=True, text=True).stdout.strip()
print("in-flight stream tokens after SIGTERM:", done, "| container exit code:", code)
assert done == [32] and code == "0"
PYCODE

step "server log (tail)"
podman logs "$NAME" 2>&1 | tail -n 6

# vfs storage copies every layer (several GB): clean up unless asked to keep it.
if [ -z "${SMOKE_KEEP:-}" ]; then
  podman rm --force --ignore "$NAME" >/dev/null
  podman system reset --force >/dev/null 2>&1 || true
  rm -rf "$WORK"
fi
echo
echo "deploy-smoke: OK"
