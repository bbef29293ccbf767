#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Serve MODEL with vLLM for ego_ros (generation: vllm, vllm_url: http://HOST:PORT): OpenAI-compatible API, memories
# and frames taken as image embeddings, recognition's log-probabilities over the yes/no tokens alone.
#
#   bash scripts/serve_vllm.sh MODEL [PORT] [more vllm arguments...]    # PORT default 8000
#
# MODEL: the same checkpoint folder the node loads (the node refuses a server whose answers are another model's).
# Uses $EGO_ROS_VLLM_VENV (default ./.venv-vllm, made by scripts/setup_vllm.sh). On a CPU it reserves
# $VLLM_CPU_KVCACHE_SPACE GiB of KV cache (default here 1) and computes in float32.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EGO_ROS_VLLM_VENV:-$repo/.venv-vllm}
model=${1:?usage: serve_vllm.sh MODEL [PORT] [vllm arguments...]}
port=${2:-8000}
shift $(( $# >= 2 ? 2 : 1 ))
if [[ ! -x $venv/bin/python ]]; then
  echo "serve_vllm: no vLLM venv at $venv: run bash scripts/setup_vllm.sh first" >&2
  exit 1
fi
cpu=()
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  cpu=(--dtype float32 --enforce-eager --gpu-memory-utilization 0.1)
fi
# vllm-cpu installs no `vllm` command that runs (it looks for a package named vllm): the server's module works for both.
exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --port "$port" \
  --enable-mm-embeds --logprobs-mode processed_logprobs --limit-mm-per-prompt '{"image": 32}' "${cpu[@]}" "$@"
