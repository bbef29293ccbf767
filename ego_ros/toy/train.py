# SPDX-License-Identifier: Apache-2.0
"""Train a small Qwen2.5-VL on the toy world, on a CPU, into a hub-style checkpoint that ``Ego.load`` reads.

The model is the real ``Qwen2_5_VLForConditionalGeneration`` (6 decoder layers of width 128, a 2-block vision
tower of width 64; 1.6 M parameters), its tokenizer trained on the toy world's words and the engine's prompts.
Training has two phases: describing scenes (keywords, area, presence, caption: the model learns to see), then
the full mix, in which concept tasks (a memory in context) are half the samples (see ``tasks``).
Every training prompt is built by the engine's own backend (chat template, visual tokens, soft tokens written over
placeholder rows by the same embedding hook as at inference), so nothing about the format is re-implemented here.

Deterministic for a seed on a given machine and torch build: the data of step i is drawn from ``[seed, i]``, the
weights from ``seed``, and torch uses a fixed number of threads.

``model_dir(out)`` returns a trained checkpoint, training it only when ``out`` holds none made by this recipe (the
recipe's hash covers the sources of the toy world, the trainer, the tiny-model builder and the prompts).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ego_ros.engine import prompts
from ego_ros.engine.backends import EncodedImage
from ego_ros.engine.backends.qwen2_5_vl import Qwen2_5_VLBackend
from ego_ros.engine.soft_tokens import injected_rows
from ego_ros.testing import tiny_qwen2_5_vl

from . import tasks, world

RECIPE_FILE = "toy_world.json"
# Weight of the dense loss at the image's tokens beside the answer's: it teaches every visual token to say what is
# on it (and whether it is the thing asked about) long before a single yes/no answer per image could.
DENSE_WEIGHT = 1.0


@dataclass(frozen=True)
class Recipe:
    steps: int = 1150
    describe_steps: int = 350  # the first phase: single-image description tasks only (and cheaper steps)
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    threads: int = 2  # fixed, so that the float reductions (and so the weights) do not depend on the machine
    text: tuple = (("hidden_size", 128), ("intermediate_size", 384), ("num_hidden_layers", 6),
                   ("num_attention_heads", 4), ("num_key_value_heads", 2),
                   ("rope_scaling", (("type", "mrope"), ("mrope_section", (4, 6, 6)))))
    vision: tuple = (("hidden_size", 64), ("intermediate_size", 128), ("num_heads", 2))

    def model_sizes(self) -> tuple[dict, dict]:
        def unfold(pairs):
            return {k: unfold(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple) else
                    (list(v) if isinstance(v, tuple) else v) for k, v in pairs}
        return unfold(self.text), unfold(self.vision)


def recipe_hash(recipe: Recipe, seed: int) -> str:
    """Changes whenever anything that shapes the trained weights changes: sources, recipe, seed, library versions."""
    import transformers

    digest = hashlib.sha256(json.dumps([asdict(recipe), seed, torch.__version__, transformers.__version__],
                                       default=str).encode())
    for module in (world, tasks, tiny_qwen2_5_vl, prompts):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def toy_corpus() -> list[str]:
    """The tokenizer's training text: the tiny model's, the engine's prompts, and every toy-world answer word."""
    words = [*world.KINDS, *world.COLOURS, *(w for w in world.PATTERN_WORDS.values() if w)]
    texts = [value for name, value in vars(prompts).items() if name.isupper() and isinstance(value, str)]
    answers = ["Yes", "No", "It is not in this image.", "Top left. Top. Top right. Left. Centre. Right.",
               "Bottom left. Bottom. Bottom right.", "A red mug with stripes, a blue ball and a green box.",
               " ".join(str(i) for i in range(101)), " ".join(words), ", ".join(words), *tasks._SYLLABLES]
    return [line for line in tiny_qwen2_5_vl._CORPUS if line.strip()] + texts + answers


def model_dir(out_dir: Path, *, seed: int = 0, recipe: Recipe = Recipe(), progress: bool = True) -> Path:
    """``out_dir`` holding a toy model of this recipe and seed, trained first if it is missing or stale."""
    out_dir = Path(out_dir)
    try:
        made = json.loads((out_dir / RECIPE_FILE).read_text())
        if made.get("recipe_hash") == recipe_hash(recipe, seed) and (out_dir / "model.safetensors").is_file():
            return out_dir
    except (OSError, ValueError):
        pass
    return train(out_dir, seed=seed, recipe=recipe, progress=progress)


def train(out_dir: Path, *, seed: int = 0, recipe: Recipe = Recipe(), progress: bool = True) -> Path:
    """Train from scratch and write the checkpoint (and ``toy_world.json``: recipe, hash, losses) to ``out_dir``."""
    from tqdm import tqdm

    torch.set_num_threads(recipe.threads)
    text_sizes, vision_sizes = recipe.model_sizes()
    model, tokenizer, image_processor = tiny_qwen2_5_vl.make_qwen2_5_vl(
        seed=seed, max_pixels=world.SIZE * world.SIZE, placeholder=prompts.CONCEPT_PLACEHOLDER,
        text_overrides=text_sizes, vision_overrides={**vision_sizes, "out_hidden_size": text_sizes["hidden_size"]},
        corpus=toy_corpus())
    backend = Qwen2_5_VLBackend(model, tokenizer, image_processor, placeholder=prompts.CONCEPT_PLACEHOLDER,
                                max_pixels=world.SIZE * world.SIZE)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, recipe))

    model.train()
    started, losses, task_losses = time.perf_counter(), [], {}
    bar = tqdm(range(recipe.steps), desc="training the toy model", unit="step", disable=not progress)
    for step in bar:
        rng = np.random.default_rng([seed, step])
        weights = tasks.DESCRIBE_WEIGHTS if step < recipe.describe_steps else tasks.TASK_WEIGHTS
        batch = [tasks.make_sample(rng, weights) for _ in range(recipe.batch_size)]
        per_sample = _losses(model, backend, batch, end_of_turn)
        loss = per_sample.mean()  # each answer's mean token loss: long captions do not drown the yes/no answers
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        for sample, value in zip(batch, per_sample.tolist()):
            task_losses.setdefault(sample.task, []).append(value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}",
                            **{task: f"{np.mean(v[-200:]):.2f}" for task, v in sorted(task_losses.items())})
    model.eval()

    tiny_qwen2_5_vl.save_checkpoint(out_dir, model, tokenizer, image_processor)
    record = {"recipe_hash": recipe_hash(recipe, seed), "seed": seed, "recipe": asdict(recipe),
              "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.perf_counter() - started, 1),
              "loss": {"first_50_steps": float(np.mean(losses[:50])), "last_50_steps": float(np.mean(losses[-50:])),
                       **{f"last_200_{task}": float(np.mean(v[-200:])) for task, v in sorted(task_losses.items())}},
              "task_weights": {"describe": tasks.DESCRIBE_WEIGHTS, "all": tasks.TASK_WEIGHTS}}
    (Path(out_dir) / RECIPE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return Path(out_dir)


def _losses(model, backend: Qwen2_5_VLBackend, batch: list[tasks.Sample], end_of_turn: int) -> torch.Tensor:
    """Each sample's mean token cross-entropy over its answer (and end of turn), (B,)."""
    images = [image for sample in batch for image in sample.images]
    encoded = backend.encode(images, grad=True)
    prompts_, answers, start = [], [], 0
    for sample in batch:
        own = encoded[start : start + len(sample.images)]
        start += len(sample.images)
        prompts_.append([_resolve(part, own) for part in sample.parts])
        answers.append(backend.tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [end_of_turn])
    built = backend.build(prompts_, responses=answers)
    with injected_rows(model, backend.injected_token_ids, built.injected):
        logits = model(**built.model_inputs(), use_cache=False).logits  # (B, S, V)
    width = built.input_ids.shape[1]
    per_sample = []
    for row, (sample, answer) in enumerate(zip(batch, answers)):  # left padding: every answer ends the row
        positions = torch.arange(width - len(answer), width)
        loss = torch.nn.functional.cross_entropy(logits[row, positions - 1].float(), built.input_ids[row, positions])
        if sample.token_words is not None:  # dense supervision at the image's own tokens (see tasks.Sample)
            image_positions = built.image_positions[row][-1]
            kept = [i for i, word in enumerate(sample.token_words) if word is not None]
            if kept:
                targets = torch.tensor([_first_token(backend.tokenizer, sample.token_words[i]) for i in kept])
                loss = loss + DENSE_WEIGHT * torch.nn.functional.cross_entropy(
                    logits[row, image_positions[kept]].float(), targets)
        per_sample.append(loss)
    return torch.stack(per_sample)


def _first_token(tokenizer, word: str) -> int:
    return tokenizer(word, add_special_tokens=False)["input_ids"][0]


def _resolve(part, encoded: list[EncodedImage]):
    if isinstance(part, tasks.ImageRef):
        return encoded[part.index]
    if isinstance(part, tasks.MemoryRef):
        return encoded[part.index].features[list(part.tokens)]
    return part


def _learning_rate_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
