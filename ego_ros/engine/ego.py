# SPDX-License-Identifier: Apache-2.0
"""Ego: personal concepts for a vision-language model, without training and without a detector.

Seifi et al., *Ego: Embedding-Guided Personalization of Vision-Language Models* (2025). Data flow:

    register(name, views)                                   ask(question, images)
      view --encode--> visual tokens V (N, D)                  memories of the relevant concepts (§3.5)
        generate keywords, estimate area alpha                   "name is <soft tokens>." for each concept
        teacher-forced pass: keyword->V attention (eq. 3)        + image(s) + question --generate--> answer
        keep top K_c of V in raster order                     recognize(image)
      memory = concatenation over views  --> MemoryStore        "name is <soft>. <image> Is name in ...?" -> P(yes)

Visual tokens are the projector outputs, already in the LLM's input-embedding space: a memory goes back into a
prompt as soft tokens, and reference images are never re-encoded at question time.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from . import prompts
from .backends import Batch, EncodedImage, SoftTokens, backend_for
from .boxes import concept_box
from . import calibration as calib
from .config import EgoConfig, default_calibration_dir, default_memory_dir
from .figure import remove_views, save_views
from .images import MAX_DECODE_PIXELS, ImageInput, downscale, to_rgb
from .loading import fingerprint, load_model
from .memory import ConceptExists, ConceptMemory, MemoryStore, UnknownConcept, ViewRecord, validate_name
from .prefix_cache import PrefixCache, fork, prefill, prefix_batch, prefix_length, score_continuations
from .regions import Box, box_share, check_region, regions_per_view, scaled, tokens_inside
from .scoring import score_visual_tokens, score_visual_tokens_per_layer, select_tokens, tokens_to_keep
from .vllm_server import ServerError, VllmServer, WrongModel

log = logging.getLogger("ego_ros.engine")

# Where recognition puts the concept relative to the frame (see Ego.yes_probabilities).
RECOGNITION_ORDERS = ("concept_first", "image_first")


@dataclass
class ViewTrace:
    """Everything needed to recompute one view's scores independently (see test_method_fidelity)."""

    model_inputs: dict  # input_ids, attention_mask, mm_token_type_ids, image_grid_thw, pixel_values of the pass
    keyword_positions: torch.Tensor  # (R,) sequence positions of the keyword tokens
    visual_positions: torch.Tensor  # (N,) sequence positions of the view's visual tokens
    layers: list[int]
    scores: torch.Tensor  # (N,) eq. 3
    selected: torch.Tensor  # (K_c,) ascending indices into the N visual tokens
    keywords: list[str]
    keywords_fallback: bool  # True when the model produced no word and FALLBACK_KEYWORDS were scored instead
    area_answer: str
    area_percent: float
    area_parsed: bool
    image: EncodedImage


@dataclass
class ConceptInfo:
    name: str
    keywords: list[str]
    num_views: int
    num_tokens: int
    area_percent: float
    model: str = ""
    created: float = 0.0
    updated: float = 0.0
    traces: list[ViewTrace] = field(default_factory=list, repr=False)  # the views added by this call only

    @classmethod
    def of(cls, memory: ConceptMemory, traces: list[ViewTrace] | None = None) -> "ConceptInfo":
        return cls(memory.name, memory.keywords, memory.num_views, memory.num_tokens, memory.area_percent,
                   memory.model, memory.created, memory.updated, traces or [])


@dataclass
class Answer:
    text: str
    concepts: list[str]  # the concepts whose memories were in context
    timings: dict[str, float]  # seconds: encode, generate, total
    prompt_tokens: int
    new_tokens: int


class Ego:
    """The engine. Create it with :meth:`Ego.load`. Not thread-safe by design: one worker owns it."""

    def __init__(self, loaded, config: EgoConfig, memory_dir, calibration_dir=None):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.device = loaded.device
        self.config = config
        self.backend = backend_for(
            loaded.model, loaded.tokenizer, loaded.image_processor,
            placeholder=prompts.CONCEPT_PLACEHOLDER, max_pixels=config.max_image_pixels,
            memory_layout=config.memory_layout,
        )
        self.num_layers = len(self.backend.decoder_layers)
        if config.layers is not None and config.layers[-1] >= self.num_layers:
            raise ValueError(f"layers {list(config.layers)} out of range: the model has {self.num_layers} "
                             "decoder layers")
        self.fingerprint = fingerprint(self.model)
        # Layers for eq. 3: explicit ones win, else this model's saved calibration (§3.4), else the middle half.
        self.calibration_dir = Path(calibration_dir) if calibration_dir is not None else default_calibration_dir()
        choice = calib.choose_layers(config.layers, self.calibration_dir, self.fingerprint, self.num_layers)
        self.layers: list[int] = choice.layers
        self.layers_source: str = choice.source  # for people: "set explicitly", "calibrated on ...", "default: ..."
        self.calibration: calib.Calibration | None = choice.calibration  # the one in use, if any
        self.hidden_size = self.model.get_input_embeddings().weight.shape[1]
        self.store = MemoryStore(memory_dir, self.fingerprint, self.hidden_size, self.backend.deepstack_layers)
        self._special_texts = [t for t in self.tokenizer.all_special_tokens if t] + [prompts.CONCEPT_PLACEHOLDER]
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos])
        # Never generate a placeholder, an image token or a chat-control token: the answer is plain text.
        special = set(self.tokenizer.all_special_ids)
        special |= {self.tokenizer.convert_tokens_to_ids(t) for t in self._special_texts}
        self._never_generate = sorted(special - self._eos_ids)
        self._yes_ids = self._first_token_ids(prompts.YES_WORDS)
        self._no_ids = self._first_token_ids(prompts.NO_WORDS) - self._yes_ids
        self.prefixes = PrefixCache()  # the KV of the latest questions' concept block (see prefix_cache)
        # Continuing a cached prefix needs the backend's prefix contract (backends/__init__.py), and rows without
        # DeepStack features: a continuation would have to carry the prefix's DeepStack rows too (not done yet).
        self._continues_prefixes = hasattr(self.backend, "prefix_ids") and not self.backend.deepstack_layers
        # A question's concept block is cached only when it holds no image: generate continuing a cache computes
        # the decoding steps' M-RoPE positions from the uncached part and every image grid, which a memory laid
        # out as an image (memory_layout: image) in the cached part would shift.
        self._caches_concept_blocks = self._continues_prefixes and config.memory_layout == "text"
        self.server: VllmServer | None = None  # generation: vllm (engine/vllm_server.py)
        if config.generation == "vllm":
            if self.backend.family not in ("qwen2_5_vl", "qwen3_vl"):
                raise ValueError(f"generation vllm supports Qwen2.5-VL and Qwen3-VL, not {self.backend.family}")
            self.server = VllmServer(config.vllm_url, self.backend, hidden_size=self.hidden_size)
            try:
                self._check_server()
            except WrongModel:
                raise
            except ServerError as error:  # not up yet: checked again at the first request
                log.warning("%s; answers wait for it", error)

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        memory_dir=None,
        calibration_dir=None,
        layers: Sequence[int] | None = None,
        max_tokens_per_view: int = EgoConfig.max_tokens_per_view,
        **settings,
    ) -> "Ego":
        """Load ``model`` (a folder or a cached hub id) and open the concept memories under ``memory_dir``.

        ``layers``: the decoder layers of eq. 3; without them, the model's calibration under ``calibration_dir``
        (default: $EGO_ROS_CALIBRATION_DIR, else ~/.local/share/ego_ros/calibration), else the middle half.
        ``settings`` are further :class:`EgoConfig` fields (``max_image_pixels``, ``max_concepts_in_context``...).
        """
        config = EgoConfig(layers=tuple(layers) if layers is not None else None,
                           max_tokens_per_view=max_tokens_per_view, **settings)
        loaded = load_model(model, device=device, dtype=dtype, placeholder=prompts.CONCEPT_PLACEHOLDER)
        return cls(loaded, config, memory_dir if memory_dir is not None else default_memory_dir(), calibration_dir)

    # --- concepts ---------------------------------------------------------------------------------------------

    def concepts(self) -> list[ConceptInfo]:
        return [ConceptInfo.of(memory) for memory in self.store.snapshot().values()]

    def forget(self, name: str) -> None:
        self.store.remove(name)
        remove_views(self.store.root, name)
        self.prefixes.clear()  # only to free it: a prefix is keyed on its memories and would not match again

    def register(
        self,
        name: str,
        views: Sequence[ImageInput],
        *,
        append: bool = False,
        create: bool = True,
        area_percent: float | Sequence[float] | None = None,
        regions=None,
        description: str | None = None,
        on_view: Callable[[int, int], None] | None = None,
    ) -> ConceptInfo:
        """Introduce a concept from reference views (paper §3.2); with ``append``, add views to an existing one.

        ``area_percent``: the subject's share of each view when the caller knows it (from a mask, or a person
        saying so); it replaces the model's own estimate of alpha. One value for all views or one per view.
        ``regions``: which object each view is about, a box (x0, y0, x1, y1) in the view's pixels, one for all views
        or one per view (None: the whole view); only tokens inside it are kept (see ``regions``), and alpha is its
        share of the view unless ``area_percent`` says otherwise. ``description``: the user's words for the object
        ("the blue mug with the star"), scored as the keywords instead of the model's own description.
        ``on_view(done, total)`` is called after each view, for progress; an exception it raises stops the
        registration there, with nothing stored (how the node cancels a long one). ``create=False`` with
        ``append``: refuse a name that is not registered instead of creating it.

        The concept is written only if its name still holds what it held when this call began: a concept forgotten
        (or replaced) on another thread meanwhile is not written back (ConceptChanged).
        """
        name = self._check_text(validate_name(name), "name")
        if isinstance(views, (str, bytes)) or not hasattr(views, "__len__"):
            views = [views]
        if len(views) == 0:
            raise ValueError(f"register {name!r}: give at least one view")
        existing = self.store.find(name)  # one read: the memory this registration builds on, checked at put
        if existing is None and append and not create:
            raise UnknownConcept(f"no concept named {name!r} to add views to; register it first (append false)")
        if existing is not None and not append:
            raise ConceptExists(f"concept {name!r} already exists; use append to add views or forget it first")
        areas = self._areas(area_percent, len(views))
        if description is not None:
            description = self._check_text(description, "description").strip() or None
        images, boxes = self._views(views, regions_per_view(regions, len(views)))  # all checked before any work
        areas = [box_share(box, image.size) if given is None and box is not None else given
                 for given, box, image in zip(areas, boxes, images)]
        traces = []
        for image, area, box in zip(self.backend.encode(images), areas, boxes):
            traces.append(self._introduce_view(image, area, description, box))
            if on_view is not None:
                on_view(len(traces), len(images))

        vectors = torch.cat([t.image.features[t.selected] for t in traces]).detach().cpu()
        # A DeepStack model's kept tokens keep their DeepStack features too (see backends/qwen3_vl.py).
        deepstack = (torch.cat([t.image.deepstack[:, t.selected] for t in traces], dim=1).detach().cpu()
                     if self.backend.deepstack_layers else None)
        records = [
            ViewRecord(grid_thw=t.image.grid_thw, indices=t.selected.tolist(), keywords=t.keywords,
                       area_percent=t.area_percent, area_parsed=t.area_parsed, num_visual_tokens=t.image.num_tokens,
                       layers=list(t.layers), tiles=t.image.tiles)
            for t in traces
        ]
        now = time.time()
        if existing is not None:
            vectors = torch.cat([existing.vectors, vectors.to(existing.vectors.dtype)])
            if deepstack is not None:
                deepstack = torch.cat([existing.deepstack, deepstack.to(existing.deepstack.dtype)], dim=1)
            records = existing.views + records
        memory = ConceptMemory(
            name=name, vectors=vectors, views=records, layers=self.layers,
            # K bounds every view's selection; views appended under a smaller K keep their larger older ones
            max_tokens_per_view=max(self.config.max_tokens_per_view, existing.max_tokens_per_view if existing else 0),
            model=self.model_name,
            fingerprint=self.fingerprint, created=existing.created if existing else now, updated=now,
            deepstack=deepstack,
        )
        self.store.put(memory, expected=existing)
        try:  # the views as the model saw them, so `ego-ros show` can draw the kept tokens on them
            save_views(self.store.root, name, images, start=existing.num_views if existing else 0)
        except OSError as error:
            log.warning("concept %r is stored, but its reference views could not be saved: %s", name, error)
        return ConceptInfo.of(memory, traces)

    @torch.no_grad()
    def _views(self, views, regions) -> tuple[list[Image.Image], list[Box | None]]:
        """The images the model is shown for ``views``, and each one's region in the pixels it is shown with."""
        images, boxes = [], []
        for view, region in zip(views, regions):
            if region is None:
                images.append(to_rgb(view, self.config.max_image_pixels))
                boxes.append(None)
                continue
            full = to_rgb(view, MAX_DECODE_PIXELS)  # the box is in the view's own pixels, before any shrinking
            shown = downscale(full, self.config.max_image_pixels)
            images.append(shown)
            boxes.append(scaled(check_region(region, full.size), full.size, shown.size))
        return images, boxes

    def _introduce_view(self, image: EncodedImage, given_area: float | None = None, description: str | None = None,
                        region: Box | None = None) -> ViewTrace:
        # 1. Keywords (the user's description when there is one) and, unless the caller knows it, the area, in one
        #    batched greedy generation.
        keyword_ids, area_ids = self._describe(image, ask_area=given_area is None, keywords=description is None)
        if description is not None:
            keyword_ids = self.tokenizer(description, add_special_tokens=False)["input_ids"]
        if given_area is None:
            area_answer = self.tokenizer.decode(area_ids, skip_special_tokens=True)
            area_percent, area_parsed = parse_area(area_answer, self.config.fallback_area_percent)
        else:
            area_answer, area_percent, area_parsed = "", given_area, True

        # 2. Which generated tokens are keywords: words only, no punctuation, whitespace or special tokens.
        keyword_ids, word_rows, fallback = self._keyword_rows(keyword_ids)
        keywords = split_keywords(self.tokenizer.decode(keyword_ids, skip_special_tokens=True))

        # 3. Teacher-forced pass over [instruction, image, keywords]; eq. 3 on the selected layers.
        batch, keyword_positions, visual_positions = self._teacher_forced(image, keyword_ids, word_rows)
        scores = score_visual_tokens(self.model, self.backend, batch, keyword_positions, visual_positions, self.layers)

        # 4. Keep the top K_c tokens in raster order (of those inside the region, when there is one).
        k = tokens_to_keep(self.config.max_tokens_per_view, area_percent, image.num_tokens,
                           self.config.min_tokens_per_view)
        ranked = scores
        if region is not None:
            inside = tokens_inside(region, image.grid_thw, image.size, image.tiles).to(scores.device)
            ranked = scores.masked_fill(~inside, float("-inf"))
            k = min(k, int(inside.sum()))
        return ViewTrace(
            model_inputs={**batch.model_inputs(), "pixel_values": batch.pixel_values},
            keyword_positions=keyword_positions, visual_positions=visual_positions, layers=list(self.layers),
            scores=scores, selected=select_tokens(ranked, k), keywords=keywords, keywords_fallback=fallback,
            area_answer=area_answer, area_percent=area_percent, area_parsed=area_parsed, image=image,
        )

    def _describe(self, image: EncodedImage, *, ask_area: bool,
                  keywords: bool = True) -> tuple[list[int] | None, list[int] | None]:
        """The model's keywords for the main subject of ``image`` (token ids, greedy; with ``keywords``) and, with
        ``ask_area``, its answer to the area question, in one batched generation."""
        questions = ([[image, prompts.KEYWORDS]] if keywords else []) + ([[image, prompts.AREA]] if ask_area else [])
        if not questions:
            return None, None
        answers = self._generate(self.backend.build(questions),
                                 max(self.config.keyword_max_new_tokens, self.config.area_max_new_tokens))
        keyword_ids = answers.pop(0)[: self.config.keyword_max_new_tokens] if keywords else None
        # The whole area answer is parsed: a wordy one ("The subject, a mug, covers about 35%") states its number
        # after more than area_max_new_tokens tokens, and cutting it would fall back to 100 % without a word.
        return keyword_ids, (answers[0] if ask_area else None)

    def _keyword_rows(self, keyword_ids: list[int]) -> tuple[list[int], list[int], bool]:
        """(the response to teacher-force, the indices of its word tokens, whether it is the fallback).

        Word tokens contain a letter or digit; when the model generated none, FALLBACK_KEYWORDS are scored instead.
        """
        word_rows = [i for i, token in enumerate(keyword_ids) if self._is_word(token)]
        if word_rows:
            return keyword_ids, word_rows, False
        # Nothing usable was generated: score the instruction's own subject words instead.
        keyword_ids = self.tokenizer(prompts.FALLBACK_KEYWORDS, add_special_tokens=False)["input_ids"]
        return keyword_ids, [i for i, token in enumerate(keyword_ids) if self._is_word(token)], True

    def _teacher_forced(self, image: EncodedImage, keyword_ids: list[int], word_rows: list[int]):
        """The scoring pass's batch [instruction, image, keywords], with the keyword rows' and the image's
        sequence positions: (batch, keyword_positions (R,), visual_positions (N,))."""
        batch = self.backend.build([[image, prompts.KEYWORDS]], responses=[keyword_ids])
        prompt_length = batch.input_ids.shape[1] - len(keyword_ids)
        return batch, torch.tensor(word_rows) + prompt_length, batch.image_positions[0][0]

    # --- layer calibration (§3.4) ------------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(
        self,
        samples: Iterable[tuple[ImageInput, object]],
        *,
        max_layers: int | None = None,
        source: str = "",
        on_sample: Callable[[int, int | None], None] | None = None,
        save: bool = False,
    ) -> "calib.Calibration":
        """Measure how well each decoder layer's keyword attention finds the subject, and choose layers for eq. 3.

        ``samples``: (image, mask) pairs; the mask is a boolean (H, W) array or a PIL image (white = subject) of
        the image's size. For each, the model describes the main subject with the keyword prompt of
        :meth:`register` and one teacher-forced pass scores every visual token on every layer. A token is a
        subject token when at least 50% of its 28x28 px cell is mask. Measure (``calibration.MEASURE``): per
        image, with K its number of subject tokens, the share of each layer's K highest-scoring tokens that are
        subject tokens (R-precision, = recall at K), averaged over images.

        Two rules choose at most ``max_layers`` layers (default: a quarter of the decoder): the paper's (the best
        single layers) and greedy forward selection on the combined scores; the better one on these images is
        kept, unless the middle-half default beats both (then it is kept); all are recorded, with chance's figure
        (see calibration.py).

        A sample whose mask is empty, not boolean, or not the image's size is refused (``InvalidCalibration``,
        naming its index). One whose subject covers no visual token (too small) or every token (measures
        nothing) is skipped and counted in ``num_skipped``; if every sample is skipped, that is an error.

        ``source``: where the images come from, in words, for the record. ``on_sample(done, total)`` after each
        sample (``total`` is None for an iterable without a length). ``save``: write the result (see
        :meth:`save_calibration`) and use its layers from now on.
        """
        max_layers = calib.default_max_layers(self.num_layers) if max_layers is None else max_layers
        if not isinstance(max_layers, int) or isinstance(max_layers, bool) or max_layers < 1:
            raise ValueError(f"max_layers must be a positive integer, got {max_layers!r}")
        total = len(samples) if hasattr(samples, "__len__") else None
        per_image, subjects, skipped = [], [], 0
        for index, (image, mask) in enumerate(samples):
            rgb = to_rgb(image, self.config.max_image_pixels)
            mask = calib.as_mask(mask, index, calib.input_size(image))
            (encoded,) = self.backend.encode([rgb])
            subject = calib.subject_tokens(mask, encoded.grid_thw, tiles=encoded.tiles)
            if 0 < subject.sum() < subject.size:
                per_image.append(self.layer_scores(encoded).numpy())
                subjects.append(subject)
            else:
                skipped += 1
            if on_sample is not None:
                on_sample(index + 1, total)
        if not per_image:
            raise calib.InvalidCalibration(
                f"no usable calibration sample: the masks of all {skipped} samples cover no visual token (subject "
                "under half of every 28x28 px cell) or every one" if skipped else "no calibration samples given")
        result = calib.summarise(per_image, subjects, max_layers=max_layers, model=self.model_name,
                                 fingerprint=self.fingerprint, source=source, num_skipped=skipped)
        if save:
            self.save_calibration(result)
        return result

    @torch.no_grad()
    def layer_scores(self, image: EncodedImage) -> torch.Tensor:
        """Eq. 3 per decoder layer for ``image``'s keyword description, as in register: (num_layers, N).

        The scores of any layer set are the mean of its rows (calibration, and comparing layer sets).
        """
        keyword_ids, _ = self._describe(image, ask_area=False)
        keyword_ids, word_rows, _ = self._keyword_rows(keyword_ids)
        batch, keyword_positions, visual_positions = self._teacher_forced(image, keyword_ids, word_rows)
        return score_visual_tokens_per_layer(self.model, self.backend, batch, keyword_positions, visual_positions,
                                             list(range(self.num_layers)))

    def save_calibration(self, calibration: "calib.Calibration") -> Path:
        """Write ``calibration`` as ``<calibration_dir>/<fingerprint>.json`` (atomically) and use its layers now.

        Later loads of this model use them too, unless they are given layers explicitly.
        """
        if calibration.fingerprint != self.fingerprint or calibration.num_layers != self.num_layers:
            raise ValueError(f"this calibration is of the model {calibration.fingerprint} "
                             f"({calibration.model}), not of this one ({self.fingerprint})")
        path = calib.save_calibration(calibration, self.calibration_dir)
        self.layers, self.layers_source, self.calibration = list(calibration.layers), calibration.summary(), calibration
        return path

    # --- questions --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def ask(
        self,
        question: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        concepts: Sequence[str] | None = None,
        times: Sequence[float] | None = None,
        max_new_tokens: int | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        on_new_text: Callable[[str, int], None] | None = None,
    ) -> Answer:
        """Answer ``question`` about one image, or about several frames of a clip (oldest first).

        ``times``: each frame's time in seconds (any origin); shown relative to the newest frame.
        ``on_text`` receives the answer so far as it grows, ``on_new_text`` only what each token added and the
        number of tokens so far (both once per token); setting ``cancel`` stops generation early.
        """
        start = time.perf_counter()
        question = self._check_text(question.strip() if isinstance(question, str) else question, "question")
        if not question:
            raise ValueError("the question is empty")
        frames = self._as_list(images)
        if not frames:
            raise ValueError("ask needs at least one image")
        if times is not None and len(times) != len(frames):
            raise ValueError(f"{len(times)} times given for {len(frames)} images")
        encoded = self.backend.encode([to_rgb(f, self.config.max_image_pixels) for f in frames])
        encoded_at = time.perf_counter()
        # One consistent read of the memories: a concept forgotten meanwhile on another thread is simply not there.
        memories = self.store.snapshot(self._known_names(concepts) if concepts is not None else None)
        names = self.concepts_for(question, encoded, memories=memories)
        parts, concept_parts = self._question_prompt(question, encoded, times, names, memories)
        batch = self.backend.build([parts])
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        if self.server is not None:
            text, new_tokens = self._served().generate(parts, max_new_tokens, on_text=on_text,
                                                       on_new_text=on_new_text, cancel=cancel,
                                                       banned=self._never_generate)
        else:
            prefix = self._concept_prefix(batch, concept_parts, [memories[name] for name in names])
            (answer_ids,) = self._generate(batch, max_new_tokens, on_text, cancel, on_new_text, prefix=prefix)
            text, new_tokens = self.tokenizer.decode(answer_ids, skip_special_tokens=True), len(answer_ids)
        done = time.perf_counter()
        return Answer(
            text=text.strip(),
            concepts=names,
            timings={"encode": encoded_at - start, "generate": done - encoded_at, "total": done - start},
            prompt_tokens=batch.input_ids.shape[1],
            new_tokens=new_tokens,
        )

    def _question_prompt(self, question: str, encoded: list[EncodedImage], times, names: list[str],
                         memories: dict[str, ConceptMemory]) -> tuple[list, list]:
        """The parts of :meth:`ask`'s prompt, and of its concept block, which it begins with (the cached prefix)."""
        parts: list = []
        if names:
            parts.append(prompts.CONCEPTS_HEADER)
            for name in names:
                parts += [prompts.CONCEPT_INTRO.format(name=name), memories[name].soft_tokens, ".\n"]
        concept_parts = list(parts)
        if len(encoded) > 1:
            newest = times[-1] if times is not None else 0.0
            parts.append(prompts.VIDEO_HEADER + "\n")
            for i, image in enumerate(encoded):
                seconds = (times[i] - newest) if times is not None else float(i - len(encoded) + 1)
                parts += [prompts.FRAME_LABEL.format(seconds=seconds), image, "\n"]
        else:
            parts.append(encoded[0])
        parts.append(question)
        return parts, concept_parts

    @torch.no_grad()
    def recognize(self, image: ImageInput | EncodedImage, concepts: Sequence[str] | None = None, *,
                  boxes: bool = False) -> dict[str, float] | dict[str, tuple[float, Box]]:
        """{name: probability that the concept is in ``image``}, from the yes/no logits of one prompt per concept
        (in the config's ``recognition_order``: see :meth:`yes_probabilities`).

        With ``boxes``: {name: (probability, box)}, the box (x0, y0, x1, y1) where the image's visual tokens match
        the concept's memory best (``boxes``), in the pixels of ``image`` as given (of a file, as shown to the model).
        """
        # One consistent read: a concept forgotten on another thread meanwhile is not scored (and does not fail
        # the others); one asked for by name and unknown is an error.
        memories = self.store.snapshot(self._known_names(concepts) if concepts is not None else None)
        if not memories:
            return {}
        encoded, size = self._encode_one(image)
        scores = self.yes_probabilities(encoded, {name: [memory.soft_tokens] for name, memory in memories.items()})
        if not boxes:
            return scores
        return {name: (p, concept_box(encoded, memories[name].vectors, size)) for name, p in scores.items()}

    def _encode_one(self, image: ImageInput | EncodedImage) -> tuple[EncodedImage, tuple[int, int]]:
        """``image`` encoded (as it is if it already is), and its size as given (width, height)."""
        if isinstance(image, EncodedImage):
            return image, image.size
        if isinstance(image, np.ndarray) and image.ndim >= 2:
            size = (image.shape[1], image.shape[0])
        elif isinstance(image, Image.Image):
            size = image.size
        else:
            size = None
        shown = to_rgb(image, self.config.max_image_pixels)
        (encoded,) = self.backend.encode([shown])
        return encoded, size or shown.size

    @torch.no_grad()
    def yes_probabilities(self, image: EncodedImage, introductions: dict[str, list], *,
                          order: str | None = None) -> dict[str, float]:
        """P(yes) to "Is NAME in this image?" for each name, its concept introduced by ``introductions[name]``.

        An introduction is a list of prompt parts after "NAME is ": a memory (soft tokens) as in
        :meth:`recognize`, or text, or encoded images; an empty one leaves the name alone, with no introduction.
        This is the recognition prompt with the concept given in other ways (the evaluation's baselines).

        ``order`` (default: the config's ``recognition_order``): "concept_first" puts each introduction before
        the image, one whole prompt per concept; "image_first" puts the image first, prefills it once and scores
        every concept's continuation (introduction and question) from its KV cache.
        """
        order = order or self.config.recognition_order
        if order not in RECOGNITION_ORDERS:
            raise ValueError(f"recognition order {order!r}: use one of {', '.join(RECOGNITION_ORDERS)}")
        yes, no = sorted(self._yes_ids), sorted(self._no_ids)
        if self.server is not None:
            return self._served_yes_probabilities(image, introductions, order, yes, no)
        names, result = list(introductions), {}
        image_prefix = None  # (token ids, KV cache) of the image, prefilled at the first chunk
        for start in range(0, len(names), self.config.recognition_batch_size):
            chunk = names[start : start + self.config.recognition_batch_size]
            intros = [_introduction(n, introductions[n]) for n in chunk]
            batch = self.backend.build([_recognition_prompt(image, n, intro, order) for n, intro in zip(chunk, intros)])
            if order == "image_first" and image_prefix is None:
                image_prefix = self._image_prefix(image, batch)
            if order == "image_first" and image_prefix[1] is not None:
                ids, cache = image_prefix
                vectors = [_vectors_of(p) for intro in intros for p in intro if not isinstance(p, str)]
                vectors = torch.cat(vectors).to(self.device, self.model.dtype) if vectors else torch.zeros(0, 0)
                logits = score_continuations(self.model, self.backend, batch, len(ids), cache, vectors)
            else:
                with self.backend.injecting(batch):
                    logits = self.model(**batch.model_inputs(), use_cache=False, logits_to_keep=1).logits[:, -1]
            answer = torch.cat([logits[:, yes], logits[:, no]], dim=-1).float().softmax(dim=-1)  # (B, |yes|+|no|)
            for name, p_yes in zip(chunk, answer[:, : len(yes)].sum(dim=-1).tolist()):
                result[name] = p_yes
        return result

    def _served_yes_probabilities(self, image: EncodedImage, introductions: dict[str, list], order: str,
                                  yes: list[int], no: list[int]) -> dict[str, float]:
        """:meth:`yes_probabilities` from the vLLM server: one request per concept, all in flight at once (the
        server batches them; with image first, its prefix cache shares the frame)."""
        server = self._served()
        names = list(introductions)
        prompt_of = {n: _recognition_prompt(image, n, _introduction(n, introductions[n]), order) for n in names}
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), self.config.recognition_batch_size))) as pool:
            return dict(zip(names, pool.map(lambda name: server.yes_probability(prompt_of[name], yes, no), names)))

    def _served(self) -> VllmServer:
        """The vLLM server, checked to serve this engine's weights (at load, else at the first request)."""
        if self.server.model is None:
            self._check_server()
        return self.server

    def _check_server(self) -> None:
        """Refuse a server whose model is not this engine's: on a probe prompt (text and a memory-like embedding
        item), each of the server's five likeliest next tokens must have the engine's own log-probability within
        0.1 nats (bf16 on a GPU server stays well inside that; other weights do not). Compared token by token, not
        as ranks, so that near-ties ordered differently by another kernel are not a mismatch."""
        served = self.server.served_model()
        generator = torch.Generator().manual_seed(0)
        probe = [prompts.CONCEPT_INTRO.format(name="Rex"),
                 torch.randn(4, self.hidden_size, generator=generator).to(self.model.dtype), ".\n",
                 prompts.RECOGNIZE.format(name="Rex")]
        batch = self.backend.build([probe])
        with torch.no_grad(), self.backend.injecting(batch):
            logits = self.model(**batch.model_inputs(), use_cache=False, logits_to_keep=1).logits[0, -1]
        own = torch.log_softmax(logits.float(), dim=-1)
        theirs = self.server.top_logprobs(probe, 5, model=served)
        if not theirs or any(abs(logprob - float(own[token])) > 0.1 for token, logprob in theirs.items()):
            raise WrongModel(f"vLLM server at {self.server.url} serves {served!r}, whose answers differ from this "
                             f"engine's model {self.model_name!r} (weights {self.fingerprint}): start it with the "
                             "same checkpoint")
        self.server.model = served

    def _image_prefix(self, image: EncodedImage, batch: Batch):
        """(the token ids every image-first recognition prompt begins with, their KV cache), the cache None if a
        prompt of ``batch`` does not begin with those ids (then each prompt is run whole)."""
        if not self._continues_prefixes:
            return (), None
        ids = self.backend.prefix_ids([image])
        if any(prefix_length(batch, row, ids) is None for row in range(batch.input_ids.shape[0])):
            return ids, None
        return ids, prefill(self.model, self.backend, prefix_batch(batch, len(ids), batch.injected[: image.num_tokens],
                                                                   [image]))

    @torch.no_grad()
    def complete(self, parts: list, max_new_tokens: int | None = None) -> str:
        """The greedy answer to one prompt given as parts (text, encoded images, soft tokens), as :meth:`ask`
        builds it: for the evaluation, which introduces concepts in other ways than by their stored memory."""
        (answer_ids,) = self._generate(self.backend.build([parts]), max_new_tokens or self.config.max_new_tokens)
        return self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()

    # --- helpers ----------------------------------------------------------------------------------------------

    def _concept_prefix(self, batch: Batch, parts: list, memories: list[ConceptMemory]):
        """(prefix length, its placeholder rows, a private copy of its KV cache) for a question whose prompt
        ``batch`` begins with the concept block ``parts`` of ``memories``; None without concepts, with the cache
        off, or if the prompt's tokens do not begin with the block's own (then the whole prompt is prefilled)."""
        if not memories or not self.config.prefix_cache or not self._caches_concept_blocks:
            return None
        if self.config.static_cache:  # a static cache is allocated by generate itself: it cannot start from ours
            return None
        ids = self.backend.prefix_ids(parts)
        length = prefix_length(batch, 0, ids)
        if length is None:
            log.debug("the concept block's tokens merge with what follows: prefilling the whole prompt")
            return None
        rows = sum(_vectors_of(part).shape[0] for part in parts if not isinstance(part, str))
        cache = self.prefixes.get(self.model, ids, memories)
        if cache is None:
            cache = prefill(self.model, self.backend, prefix_batch(batch, length, batch.injected[:rows], []))
            self.prefixes.put(self.model, ids, memories, cache)
            cache = fork(cache)
        return length, rows, cache

    def _generate(self, batch: Batch, max_new_tokens: int, on_text=None, cancel=None,
                  on_new_text=None, prefix=None, logits: list | None = None) -> list[list[int]]:
        """Greedy generation with the batch's vectors in place; returns each row's new tokens up to EOS.

        ``prefix``: (length, placeholder rows, KV cache) of the tokens the (single) prompt begins with, from
        :meth:`_concept_prefix`; only the rest of the prompt is prefilled. ``logits``: a list to receive each
        step's logits, (B, V) (for the tests that compare paths).
        """
        from .streaming import CancelCriteria, TextCallbackStreamer

        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                      suppress_tokens=self._never_generate, pad_token_id=self.backend.pad_id)
        if on_text is not None or on_new_text is not None:
            kwargs["streamer"] = TextCallbackStreamer(self.tokenizer, on_text, on_new_text)
        if cancel is not None:
            kwargs["stopping_criteria"] = [CancelCriteria(cancel)]
        continued = batch
        if prefix is not None:
            _, rows, kwargs["cache"] = prefix
            continued = dataclasses.replace(batch, injected=batch.injected[rows:])  # the prefix's rows are cached
            self.backend.forget_positions()  # positions come from the whole prompt, not from the last call's state
        elif self.config.static_cache:
            kwargs["cache_implementation"] = "static"
        if logits is not None:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        with self.backend.injecting(continued, once=True):  # once: the prefill is the only forward with rows to fill
            output = self.model.generate(**batch.model_inputs(), **kwargs)
        if logits is not None:
            logits.extend(output.logits)
            output = output.sequences
        rows = []
        for new in output[:, batch.input_ids.shape[1] :].tolist():
            end = next((i for i, t in enumerate(new) if t in self._eos_ids), len(new))
            rows.append(new[:end])
        return rows

    def concepts_for(self, question: str, encoded: list[EncodedImage], requested=None, *,
                     memories: dict[str, ConceptMemory] | None = None) -> list[str]:
        """The concepts to put in context: the requested ones (or all), at most ``max_concepts_in_context``.

        Paper §3.5: when they do not all fit, keep those whose memory is most similar to the test image's visual
        tokens (for each memory token its best cosine match among the image tokens, averaged). Concepts named in
        the question go first, whatever their similarity: the user asked about them.
        """
        if memories is None:
            memories = self.store.snapshot(self._known_names(requested) if requested is not None else None)
        names = list(memories)
        limit = self.config.max_concepts_in_context
        if len(names) <= limit:
            return names
        test = torch.nn.functional.normalize(torch.cat([e.features for e in encoded]).float().cpu(), dim=-1)
        similarity = {}
        for name in names:
            memory = torch.nn.functional.normalize(memories[name].vectors.float(), dim=-1)
            similarity[name] = (memory @ test.T).max(dim=1).values.mean().item()
        named = named_in(question, names)
        ranked = sorted((n for n in names if n not in named), key=similarity.get, reverse=True)
        return (named + ranked)[:limit]

    @staticmethod
    def _known_names(names: Sequence[str]) -> list[str]:
        """The requested names, deduplicated; snapshot() raises UnknownConcept for any it does not know."""
        if isinstance(names, str):
            names = [names]
        return list(dict.fromkeys(names))

    def _check_text(self, text, what: str) -> str:
        """Refuse text that smuggles in the model's control tokens (they would shift every injected row)."""
        if not isinstance(text, str):
            raise ValueError(f"{what} must be a string, got {type(text).__name__}")
        for special in self._special_texts:
            if special in text:
                raise ValueError(f"{what} must not contain the model's control token {special}")
        return text

    @staticmethod
    def _areas(area_percent, num_views: int) -> list[float | None]:
        if area_percent is None:
            return [None] * num_views
        areas = [area_percent] * num_views if isinstance(area_percent, (int, float)) else list(area_percent)
        if len(areas) != num_views:
            raise ValueError(f"{len(areas)} area values given for {num_views} views")
        for area in areas:
            if not isinstance(area, (int, float)) or not 0.0 <= float(area) <= 100.0:
                raise ValueError(f"area_percent must be a number in [0, 100], got {area!r}")
        return [float(a) for a in areas]

    def _is_word(self, token_id: int) -> bool:
        if token_id in self._never_generate or token_id in self._eos_ids:
            return False
        return any(ch.isalnum() for ch in self.tokenizer.decode([token_id]))

    def _first_token_ids(self, words: Sequence[str]) -> set[int]:
        return {self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}

    @staticmethod
    def _as_list(images) -> list:
        if isinstance(images, (list, tuple)):
            return list(images)
        return [images]


def _vectors_of(part) -> torch.Tensor:
    """The (n, D) rows a prompt part puts at the input embeddings: an image's features, a memory's vectors."""
    if isinstance(part, EncodedImage):
        return part.features
    return part.vectors if isinstance(part, SoftTokens) else part


def named_in(question: str, names: Iterable[str]) -> list[str]:
    """The names the question mentions as whole words, case-insensitively: "Al" is in "Where is Al?" but not
    in "Always"; a name that starts or ends with punctuation ("R2-D2!") only needs that edge to match as is."""
    lowered = question.casefold()
    found = []
    for name in names:
        key = re.escape(name.casefold())
        before = r"(?<!\w)" if name[:1].isalnum() or name[:1] == "_" else ""
        after = r"(?!\w)" if name[-1:].isalnum() or name[-1:] == "_" else ""
        if re.search(before + key + after, lowered):
            found.append(name)
    return found


_NUMBER = re.compile(r"(\d+(?:[.,]\d+)?)\s*(%|percent)?", re.IGNORECASE)


def parse_area(answer: str, fallback: float) -> tuple[float, bool]:
    """The first number in the answer as a percentage clamped to [0, 100], or ``fallback`` if there is none.

    "about 35%" -> 35; "0.4" -> 0.4 (a fraction is not guessed at); "150" -> 100; "a lot" -> fallback.
    """
    match = _NUMBER.search(answer)
    if match is None:
        return float(fallback), False
    return min(100.0, max(0.0, float(match.group(1).replace(",", ".")))), True


def split_keywords(text: str) -> list[str]:
    """Keywords from a free-form answer: split on commas, semicolons and new lines, trimmed, deduplicated."""
    words = (w.strip(" .\t-*\"'") for w in re.split(r"[,;\n]", text))
    return list(dict.fromkeys(w for w in words if w))


def _introduction(name: str, introduction: list) -> list:
    """The prompt parts that introduce a concept ("NAME is <memory>." and a new line); none for an empty one."""
    return [prompts.CONCEPT_INTRO.format(name=name), *introduction, ".\n"] if introduction else []


def _recognition_prompt(image, name: str, intro: list, order: str) -> list:
    """The recognition prompt's parts in ``order``: the introduction before the frame, or after it."""
    question = prompts.RECOGNIZE.format(name=name)
    return [*intro, image, question] if order == "concept_first" else [image, *intro, question]
