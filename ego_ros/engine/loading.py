# SPDX-License-Identifier: Apache-2.0
"""Load a VLM checkpoint (a local folder or a hub id already in the local cache) the way transformers does.

Everything goes through ``from_pretrained``, so a tiny test folder and ``Qwen/Qwen2.5-VL-7B-Instruct`` take the
same path. The concept placeholder is added to the tokenizer when missing; it must land on an existing embedding
row (real checkpoints have spare rows), since resizing the embeddings would change the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message names it and says what to do."""


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    image_processor: object
    name: str  # what the user asked for: a folder or a hub id
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ModelLoadError(f"invalid device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # bf16 where the hardware has it, full precision on the CPU (bf16 matmuls are slow there)
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelLoadError(f"invalid dtype {dtype!r}; use auto, {', '.join(names)}")
    return names[dtype]


# What loading a model of a supported family imports (about 1,000 modules: transformers' model code, and the parts
# of torch it pulls in, sympy, dynamo...). Imported ahead of a load by import_model_code().
MODEL_CODE = ("transformers.modeling_utils", "transformers.generation.utils", "transformers.models.auto.modeling_auto",
              "transformers.models.auto.processing_auto", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
              "transformers.models.qwen2_5_vl.processing_qwen2_5_vl", "transformers.models.qwen3_vl.modeling_qwen3_vl",
              "transformers.models.internvl.modeling_internvl")


def import_model_code() -> None:
    """Import the code a model load needs, now. A load that imports it holds the GIL in stretches of 100-180 ms
    (C extensions initialising, bytecode unmarshalled), which stalls every other thread of the process: the node
    calls this before it offers any service, so that its lifecycle services answer at once during a load."""
    import importlib

    for module in MODEL_CODE:
        importlib.import_module(module)


def load_model(name: str | os.PathLike, *, device: str, dtype: str | torch.dtype, placeholder: str) -> LoadedModel:
    """Model, tokenizer and image processor of ``name``, on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from .backends import UnsupportedModel, check_supported

    name = str(name)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} is not a model folder: it has no config.json")
        source, local_only = str(local), True
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"model folder {name} does not exist")
    else:  # a hub id: the local cache first; a download only where the hub answers (no minute of retries offline)
        source, local_only = name, _in_hub_cache(name) or bool(os.environ.get("HF_HUB_OFFLINE")) or not _hub_reachable()
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    try:
        # The family first, from config.json alone: an unsupported checkpoint is refused before any weight is read.
        model_type = AutoConfig.from_pretrained(source, local_files_only=local_only).model_type
        check_supported(model_type)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=target_dtype, local_files_only=local_only)
    except UnsupportedModel as error:
        raise ModelLoadError(f"cannot load model {name!r}: {error}") from None
    except (OSError, ValueError, ImportError) as error:
        if source == name and not local.exists():
            raise ModelLoadError(
                f"cannot load model {name!r}: it is not a local folder and could not be fetched from the hub "
                f"({type(error).__name__}). On a machine without hub access, download it elsewhere "
                f"(`hf download {name} --local-dir DIR`), copy DIR here and pass its path as the model."
            ) from None
        raise ModelLoadError(f"cannot load model from {source}: {error}") from None
    model.to(target_device).eval()
    _ensure_chat_template(tokenizer, source, local_only)
    _ensure_placeholder(tokenizer, model, placeholder)
    return LoadedModel(model, tokenizer, image_processor, name, target_device, target_dtype)


def _ensure_chat_template(tokenizer, source: str, local_only: bool) -> None:
    """Checkpoints that keep the chat template beside the processor (chat_template.json/.jinja) rather than in
    tokenizer_config.json load a tokenizer without one; the prompts are built with it, so take it from there."""
    if tokenizer.chat_template:
        return
    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, filename, local_files_only=local_only, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            text = Path(path).read_text(encoding="utf-8")
            tokenizer.chat_template = json.loads(text)["chat_template"] if filename.endswith(".json") else text
            return
    raise ModelLoadError(f"{source} has no chat template (in tokenizer_config.json, chat_template.jinja or "
                         "chat_template.json): the engine builds its prompts with it")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection: a robot off the network should fail in seconds, not retry."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _ensure_placeholder(tokenizer, model, placeholder: str) -> None:
    if placeholder not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [placeholder]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        raise ModelLoadError(
            f"the concept placeholder {placeholder} got token id {token_id}, but the model has only {rows} "
            "embedding rows; this checkpoint has no spare row for it"
        )


def fingerprint(model) -> str:
    """A short id of the model's weights and architecture: memories only make sense for the model that made them.

    It hashes the architecture config and a strided sample of the input embeddings and of the first and last
    vision-tower parameters, each rounded to bf16 so that the same checkpoint loaded in fp32 or bf16, on any
    device, has the same fingerprint.
    """
    architecture = _architecture(model.config.to_dict())
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode())
    vision = [p for n, p in model.named_parameters() if "visual" in n or "vision" in n]
    for weight in [model.get_input_embeddings().weight, *vision[:1], *vision[-1:]]:
        sample = weight.detach().flatten()[:: max(1, weight.numel() // 4096)][:4096]
        digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


_TRANSIENT_CONFIG_KEYS = {"dtype", "torch_dtype", "transformers_version", "use_cache", "output_attentions"}


def _architecture(config: dict) -> dict:
    """The config without fields that vary between loads of the same weights (dtype, ids of the run)."""
    keep = {}
    for key, value in config.items():
        if isinstance(value, dict):
            value = _architecture(value)
        elif key in _TRANSIENT_CONFIG_KEYS or str(key).startswith("_"):
            continue
        keep[key] = value
    return keep
