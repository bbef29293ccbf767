# SPDX-License-Identifier: Apache-2.0
"""Heads written into the toy model's decoder: how a small model is given in-context matching.

Learning to compare a memory with an image from yes/no answers alone stays at chance on a CPU's budget (a plateau:
nothing rewards a memory row for attending to an image row like it until something reads the result, and the
decoder cannot even tell memory rows from image rows: both are projector vectors). So the recipe writes the
comparison into five heads of layers 0-2, each fitted by least squares to the inputs its layer really gets, and
then trains the layers above them around them (``train.py``). The model stays a plain
``Qwen2_5_VLForConditionalGeneration``; only some of its weights are set rather than learned:

    layer 0            an identity (``silence``) but for head 3, "inside an image": every row attends to
                       <|vision_start|> (value +1) and <|vision_end|> (-1) past a sink (<|im_start|>, 0), so image
                       rows get +1 on a residual direction of their own, memory rows (before the image or after it)
                       and text 0. Memory and image rows reach layer 1 otherwise as the projector made them.
    layer 1, heads 0-1 matchers: every feature row (image or memory) attends to the feature rows whose attribute
                       codes agree with its own (head 0: body colour; head 1: pattern and accent colour; codes read
                       out of the layer's input by ridge regression). A memory row of an instance that is in the
                       image shares its attention between its own memory and the image rows of the instance; one
                       whose instance is not there stays with its memory. What a row gave to image rows and what
                       to memory rows is written on two residual directions: its evidence.
    layer 2, heads 0-1 pooling: every row attends to the memory rows (head 0) or the image rows (head 1) that are
                       on an object (background rows find a little of everything), and the answer's row writes
                       their mean evidence, less a threshold, along lm_head(Yes) - lm_head(No)

Image first, the memory rows find their instance in the image (head 0 pools it); concept first, the image rows
find theirs in the memory (head 1). Queries and keys use only the head dimensions that M-RoPE barely rotates over
a prompt, so a comparison does not depend on where the rows are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ego_ros.engine.soft_tokens import injected_rows

from . import tasks

SPAN = 320  # positions a prompt spans at most (a 224 px image is 64 rows; prompts are ~100-200 tokens)
TAG_HEAD = (0, 3)  # (layer, head)
MATCH_HEADS = {"colour": (1, 0), "pattern+accent": (1, 1)}
POOL_HEADS = ((2, 0), (2, 1))  # pooling memory rows' evidence, image rows' evidence
# Code columns (tasks.attribute_codes) each matcher compares: kind 0-4, colour 5-12, pattern 13-16, accent 17-24.
# Not the kind: the vision tower tells it at a token barely better than chance (an object's inside does not show
# its outline), so it would add noise to every comparison; colour, pattern and accent it tells at 87-100 %.
MATCH_COLUMNS = {"colour": slice(5, 13), "pattern+accent": slice(13, 25)}
LAYERS = (0, 1, 2)  # the layers whose heads are written; the recipe freezes them afterwards


@dataclass
class Strengths:
    """Attention logits of the written heads (the units of q.k * scaling), and what they write."""

    delimiter: float = 20.0  # tag head: <|vision_start|>, <|vision_end|>
    tag_sink: float = 12.0  # tag head: <|im_start|>
    tag: float = 0.5  # tag written: this share of a residual row's typical norm
    match: float = 24.0  # matchers: a full agreement of every attribute a head compares
    features: float = 10.0  # matchers: bonus of feature rows (image or memory) over text
    other_side: float = 3.0  # matchers: more for a row of the other side (image for a memory row, and back)
    evidence: float = 0.5  # evidence written: this share of a residual row's typical norm
    # pooling: logit per unit of evidence, on memory rows and on image rows (0: a plain mean; leaning to the rows
    # that found the most measured worse: background rows find a little of everything)
    pool_memory: float = 0.0
    pool_image: float = 0.0
    objects: float = 10.0  # pooling: logit for a row on an object (its code's colour part sums to 1)
    side: float = 20.0  # pooling: bonus of the rows a pooling head reads (memory rows, or image rows)
    answer: float = 2.0  # pooling: written along lm_head(Yes) - lm_head(No), in typical norms, per unit


@torch.no_grad()
def install(model, backend, samples: list[tasks.Sample], strengths: Strengths = Strengths(), log=print) -> dict:
    """Write the heads into ``model`` from ``samples`` (concept questions of both orders, with their scenes).

    Returns the fit's figures (read-out accuracies, evidence of positives and negatives) for the model card.
    """
    config = model.config.text_config
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError("the written heads need a key/value head each (num_key_value_heads == num_attention_heads)")
    figures: dict = {}
    built, rows = _prompts(backend, samples)
    dims = slow_dims(model)
    feature = rows.image | rows.memory

    # 1. "inside an image" in layer 0
    normed, residual, _ = _run(model, backend, built, [0, 1])
    tag_direction, typical = _spare_direction(residual[1][rows.valid])
    tokens = backend.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|im_start|>"])
    anchors = torch.stack([normed[0][built.input_ids == t][0] for t in tokens])  # (3, D): layer 0 sees embeddings
    attn, head = backend.attention_module(TAG_HEAD[0]), TAG_HEAD[1]
    _clear(attn, head)
    d = attn.head_dim
    attn.q_proj.bias[head * d + dims[0]] = 1.0
    attn.k_proj.weight[head * d + dims[0]] = _through(
        anchors, [strengths.delimiter, strengths.delimiter, strengths.tag_sink]) / attn.scaling
    attn.v_proj.weight[head * d] = _through(anchors, [1.0, -1.0, 0.0])
    attn.o_proj.weight[:, head * d] = strengths.tag * typical * tag_direction

    # 2. matchers in layer 1: every feature row attends to the feature rows whose codes agree with its own
    normed, residual, _ = _run(model, backend, built, [1, 2])
    x = normed[1]
    code_w, code_b = _ridge(x[rows.valid], rows.codes[rows.valid])  # text rows: a code of zeros
    image_w, image_b = _ridge(x[rows.valid], rows.image[rows.valid].float()[:, None])
    memory_w, memory_b = _ridge(x[rows.valid], rows.memory[rows.valid].float()[:, None])
    figures["layer 1 read-outs"] = {
        "image rows": _separation(x @ image_w + image_b, rows.image, rows.valid),
        "memory rows": _separation(x @ memory_w + memory_b, rows.memory, rows.valid),
        **{name: _code_accuracy(x[feature] @ code_w + code_b, rows.codes[feature], columns)
           for name, columns in MATCH_COLUMNS.items()},
    }
    evidence_directions = []
    skip = [tag_direction]
    for _ in range(2):  # what a row found among image rows, and among memory rows
        direction, typical = _spare_direction(residual[2][rows.valid], skip=skip)
        evidence_directions.append(direction)
        skip.append(direction)
    for name, (layer, head) in MATCH_HEADS.items():
        attn = backend.attention_module(layer)
        _clear(attn, head)
        columns = MATCH_COLUMNS[name]
        width = columns.stop - columns.start
        if width + 3 > len(dims):
            raise ValueError(f"{name}: {width} code dimensions and 3 more do not fit {len(dims)} slow dimensions")
        groups = len(name.split("+"))  # one-hot groups compared: a full agreement is a code dot product of this
        scale = float(np.sqrt(strengths.match / groups))
        code_rows = [head * d + j for j in dims[:width]]
        attn.q_proj.weight[code_rows] = scale * code_w[:, columns].T
        attn.q_proj.bias[code_rows] = scale * code_b[columns]
        attn.k_proj.weight[code_rows] = scale * code_w[:, columns].T / attn.scaling
        attn.k_proj.bias[code_rows] = scale * code_b[columns] / attn.scaling
        # every feature row weighs ``features`` more than text, and ``other_side`` more for the other side's rows:
        # q (memory, image) . k (image, memory); with no sink, a memory row whose instance is not in the image
        # stays with its own memory
        bonus = head * d + dims[width]
        attn.q_proj.bias[bonus] = 1.0
        attn.k_proj.weight[bonus] = strengths.features * (image_w + memory_w)[:, 0] / attn.scaling
        attn.k_proj.bias[bonus] = strengths.features * (image_b + memory_b)[0] / attn.scaling
        sides = ((memory_w, memory_b, image_w, image_b), (image_w, image_b, memory_w, memory_b))
        for j, (query_w, query_b, key_w, key_b) in zip(dims[width + 1 : width + 3], sides):
            attn.q_proj.weight[head * d + j] = query_w[:, 0]
            attn.q_proj.bias[head * d + j] = query_b[0]
            attn.k_proj.weight[head * d + j] = strengths.other_side * key_w[:, 0] / attn.scaling
            attn.k_proj.bias[head * d + j] = strengths.other_side * key_b[0] / attn.scaling
        for value, (w, b), direction in zip((0, 1), ((image_w, image_b), (memory_w, memory_b)), evidence_directions):
            attn.v_proj.weight[head * d + value] = w[:, 0]
            attn.v_proj.bias[head * d + value] = b[0]
            attn.o_proj.weight[:, head * d + value] = strengths.evidence * typical * direction

    # 3. pooling in layer 2: memory rows' evidence among image rows (image first), image rows' among memory rows
    normed, _, heads = _run(model, backend, built, [1, 2])
    x = normed[2]
    d1 = backend.attention_module(1).head_dim
    found = [sum(heads[1][..., h * d1 + value] for _, h in MATCH_HEADS.values()) for value in (0, 1)]  # (B, S)
    objects = rows.codes[..., MATCH_COLUMNS["colour"]].sum(-1)  # 1 on an object, 0 elsewhere
    objects_w, objects_b = _ridge(x[rows.valid], objects[rows.valid][:, None])
    image_w, image_b = _ridge(x[rows.valid], rows.image[rows.valid].float()[:, None])
    memory_w, memory_b = _ridge(x[rows.valid], rows.memory[rows.valid].float()[:, None])
    yes, no = (backend.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("Yes", "No"))
    answer = model.lm_head.weight[yes] - model.lm_head.weight[no]
    _, typical = _spare_direction(residual[2][rows.valid])
    figures["evidence"], figures["layer 2 read-outs"] = {}, {
        "objects r2": _r2(x[rows.valid] @ objects_w + objects_b, objects[rows.valid][:, None])}
    sides = (("memory", (memory_w, memory_b)), ("image", (image_w, image_b)))
    for (layer, head), (side, side_fit), evidence in zip(POOL_HEADS, sides, found):
        on_side = rows.memory if side == "memory" else rows.image
        evidence_w, evidence_b = _ridge(x[feature], evidence[feature][:, None])
        figures["layer 2 read-outs"][f"evidence at {side} rows r2"] = _r2(
            x[on_side] @ evidence_w + evidence_b, evidence[on_side][:, None])
        pool = strengths.pool_memory if side == "memory" else strengths.pool_image
        pooled = _pooled(evidence, objects, on_side, pool, strengths.objects)
        threshold, figures["evidence"][f"pooled at {side} rows"] = _threshold(pooled, samples)
        attn = backend.attention_module(layer)
        _clear(attn, head)
        keys = ((side_fit, strengths.side), ((evidence_w, evidence_b), pool),
                ((objects_w, objects_b), strengths.objects))
        for j, ((w, b), strength) in zip(dims, keys):
            attn.q_proj.bias[head * d + j] = 1.0
            attn.k_proj.weight[head * d + j] = strength * w[:, 0] / attn.scaling
            attn.k_proj.bias[head * d + j] = strength * b[0] / attn.scaling
        attn.v_proj.weight[head * d] = evidence_w[:, 0]
        attn.v_proj.bias[head * d] = evidence_b[0] - threshold
        attn.o_proj.weight[:, head * d] = strengths.answer * typical * answer / answer.norm()
    log(f"matching heads written: {figures}")
    return figures


def _pooled(evidence, objects, on_side, pool: float, object_weight: float) -> list[float]:
    """What a pooling head gets on each prompt: its rows' evidence, weighted as its attention weighs them."""
    pooled = []
    for b in range(evidence.shape[0]):
        if not on_side[b].any():
            pooled.append(float("nan"))
            continue
        e, o = evidence[b][on_side[b]], objects[b][on_side[b]]
        weights = torch.softmax(pool * e + object_weight * o, dim=0)
        pooled.append(float((weights * e).sum()))
    return pooled


def _threshold(pooled: list[float], samples: list[tasks.Sample]) -> tuple[float, dict]:
    """The pooled evidence halfway between the yes and the no questions' means (where the side holds rows)."""
    yes = [p for p, s in zip(pooled, samples) if s.answer == "Yes" and not np.isnan(p)]
    no = [p for p, s in zip(pooled, samples) if s.answer == "No" and not np.isnan(p)]
    if not yes or not no:
        return 0.0, {}
    threshold = 0.5 * (float(np.mean(yes)) + float(np.mean(no)))
    return threshold, {"yes": round(float(np.mean(yes)), 3), "no": round(float(np.mean(no)), 3),
                       "threshold": round(threshold, 3)}


# --- what the fitting prompts hold, row by row --------------------------------------------------------------------


@dataclass
class Rows:
    valid: torch.Tensor  # (B, S) bool: not padding
    image: torch.Tensor  # (B, S) bool: a visual token of the prompt's image
    memory: torch.Tensor  # (B, S) bool: a memory (soft token) row
    codes: torch.Tensor  # (B, S, 25): attribute codes of feature rows (tasks.attribute_codes), 0 elsewhere


def _prompts(backend, samples: list[tasks.Sample]):
    """The samples built by the engine's backend, and what each row of them is."""
    from .train import resolve

    images = [image for sample in samples for image in sample.images]
    encoded = backend.encode(images)
    prompts, codes, start = [], [], 0
    for sample in samples:
        own = encoded[start : start + len(sample.images)]
        start += len(sample.images)
        prompts.append([resolve(part, own) for part in sample.parts])
        per_image = [tasks.attribute_codes(tasks.token_attributes(scene)) for scene in sample.scenes]
        row_codes = []
        for part in sample.parts:
            if isinstance(part, tasks.ImageRef):
                row_codes.append(per_image[part.index])
            elif isinstance(part, tasks.MemoryRef):
                row_codes.append(per_image[part.index][list(part.tokens)])
        codes.append(np.concatenate(row_codes) if row_codes else np.zeros((0, 25), np.float32))
    built = backend.build(prompts)
    ids = built.input_ids
    image, memory = ids == backend.image_token_id, ids == backend.placeholder_id
    row_codes = torch.zeros((*ids.shape, 25))
    for b, sample_codes in enumerate(codes):
        row_codes[b][image[b] | memory[b]] = torch.from_numpy(sample_codes)
    return built, Rows(built.attention_mask.bool(), image, memory, row_codes)


@torch.no_grad()
def _run(model, backend, built, layers):
    """Each of ``layers``' normalised attention input and residual input (B, S, D), and its heads' outputs before
    o_proj (B, S, H * d), for one forward of ``built``."""
    normed, residual, heads, handles = {}, {}, {}, []
    for i in layers:
        layer = backend.decoder_layers[i]
        handles += [
            layer.input_layernorm.register_forward_hook(lambda m, a, out, i=i: normed.__setitem__(i, out.float())),
            layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: residual.__setitem__(i, a[0].float())),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: heads.__setitem__(i, a[0].float())),
        ]
    try:
        with injected_rows(model, backend.injected_token_ids, built.injected):
            model(**built.model_inputs(), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return normed, residual, heads


# --- linear algebra -----------------------------------------------------------------------------------------------


def slow_dims(model, span: int = SPAN, max_angle: float = 0.35) -> list[int]:
    """Head dimensions whose rotary frequency turns them less than ``max_angle`` over ``span`` positions, in
    pairs (j, j + d/2) as rotate_half pairs them, slowest first."""
    inv_freq = model.model.language_model.rotary_emb.inv_freq.float()
    half = inv_freq.numel()
    slow = [j for j in range(half - 1, -1, -1) if float(inv_freq[j]) * span < max_angle]
    return [dim for j in slow for dim in (j, j + half)]


def silence(layer) -> None:
    """Make a decoder layer an identity (its attention and MLP write nothing), as layer 0 is before the tag head is
    written into it: so memory rows and image rows reach layer 1 as the projector made them, alike in scale, and
    one read-out of their attributes serves both."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def _clear(attn, head: int) -> None:
    d = attn.head_dim
    rows = slice(head * d, (head + 1) * d)
    for projection in (attn.q_proj, attn.k_proj, attn.v_proj):
        projection.weight[rows] = 0.0
        projection.bias[rows] = 0.0
    attn.o_proj.weight[:, rows] = 0.0


def _through(points: torch.Tensor, values) -> torch.Tensor:
    """The least-norm vector w with points @ w == values: a key or value that is exact on a few known rows."""
    values = torch.tensor(values, dtype=points.dtype)
    return points.T @ torch.linalg.solve(points @ points.T, values)


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ~ x @ w + b with a small ridge: (w (D, k), b (k,))."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    centred = x - mean_x
    covariance = centred.T @ centred / len(x)
    covariance += ridge * covariance.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(covariance, centred.T @ (y - mean_y) / len(x))
    return w.float(), (mean_y - mean_x @ w).float()


def _spare_direction(rows: torch.Tensor, skip: list[torch.Tensor] = ()) -> tuple[torch.Tensor, float]:
    """The residual direction the rows vary least along (one the trained layers barely use), orthogonal to the
    directions in ``skip``; and the rows' typical norm."""
    centred = rows - rows.mean(0)
    for direction in skip:
        centred = centred - torch.outer(centred @ direction, direction)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    direction = vt[-1 - len(skip)]
    for other in skip:
        direction = direction - (direction @ other) * other
    return direction / direction.norm(), float(rows.norm(dim=-1).mean())


def _separation(score: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> float:
    """Balanced accuracy of ``score > 0.5`` for ``truth`` over the valid rows."""
    score, truth = score.squeeze(-1)[valid] > 0.5, truth[valid]
    return round(0.5 * float(score[truth].float().mean() + (~score[~truth]).float().mean()), 4)


def _code_accuracy(predicted: torch.Tensor, codes: torch.Tensor, columns: slice) -> dict:
    """Per attribute group in ``columns``: how often the largest read-out is the true attribute (where known)."""
    result = {}
    for name, options in tasks.ATTRIBUTES.items():
        start = sum(len(o) for o in list(tasks.ATTRIBUTES.values())[: list(tasks.ATTRIBUTES).index(name)])
        if not columns.start <= start < columns.stop:
            continue
        group = slice(start, start + len(options))
        known = codes[:, group].sum(-1) > 0.5
        result[name] = round(float((predicted[known, group].argmax(-1) == codes[known, group].argmax(-1))
                                   .float().mean()), 4)
    return result


def _r2(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return round(1.0 - float(((predicted - truth) ** 2).mean() / truth.var()), 4)
