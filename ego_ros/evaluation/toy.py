# SPDX-License-Identifier: Apache-2.0
"""The method measured on the toy world: localisation, recognition of personal instances (and whether its answers
change with a concept's name), the §3.5 filter, boxes, and registering from a box on a cluttered view.

All three need a model that has learned to see (the trained toy model, ``ego_ros.toy``); on a random
model they measure position bias. ``bench/quality.py`` prints them; ``test/test_quality.py`` holds their orderings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ego_ros.engine.boxes import concept_box
from ego_ros.engine.calibration import subject_tokens
from ego_ros.engine.images import to_rgb
from ego_ros.engine.scoring import select_tokens, tokens_to_keep
from ego_ros.toy.world import Instance, Scene, look_alike, personal_instances, random_instance, render_scene, view_of

from .methods import introduction
from .metrics import RecognitionScore, recognition_score

# Concept names: ordinary names (the toy model was taught made-up names of random letters, each meaning nothing).
NAMES = ("Rex", "Anna", "Milo", "Kiki", "Otto", "Luna", "Bruno", "Nala", "Pepe", "Zora", "Tito", "Maya", "Coco",
         "Finn", "Ivy", "Juno", "Leo", "Mira", "Nico", "Oscar", "Pia", "Quinn", "Rosa", "Sami", "Tess", "Umar",
         "Vera", "Wes", "Yara", "Zeno")


# --- localisation -------------------------------------------------------------------------------------------------


def localisation(ego, samples, layer_sets: dict[str, list[int]], on_sample=None) -> dict[str, float]:
    """Share of the kept tokens that are subject tokens (cell >= 50% mask), averaged over ``samples``.

    Each sample is (image, mask, area percent); K_c comes from the true area (``tokens_to_keep``, as register
    with ``area_percent``), so the figure measures where attention points, not how well the area is guessed.
    One pass per image scores every layer; each entry of ``layer_sets`` is eq. 3 over its layers. "random" is
    the expected share of a random choice (subject tokens / all tokens).
    """
    shares: dict[str, list[float]] = {name: [] for name in [*layer_sets, "random"]}
    for done, (image, mask, area) in enumerate(samples, 1):
        (encoded,) = ego.backend.encode([to_rgb(image, ego.config.max_image_pixels)])
        subject = subject_tokens(np.asarray(mask, dtype=bool), encoded.grid_thw)
        per_layer = ego.layer_scores(encoded)  # (num_layers, N)
        k = tokens_to_keep(ego.config.max_tokens_per_view, area, encoded.num_tokens, ego.config.min_tokens_per_view)
        for name, layers in layer_sets.items():
            kept = select_tokens(per_layer[list(layers)].mean(dim=0), k).numpy()
            shares[name].append(float(subject[kept].mean()))
        shares["random"].append(float(subject.mean()))
        if on_sample is not None:
            on_sample(done)
    return {name: float(np.mean(values)) for name, values in shares.items()}


def localisation_samples(count: int, seed: int) -> list[tuple[Image.Image, np.ndarray, float]]:
    """Scenes for localisation: (image, main subject's mask, its area in percent)."""
    rng = np.random.default_rng([seed, 0x10C])
    scenes = [render_scene(rng) for _ in range(count)]
    return [(s.image, s.subject.mask, s.subject.area_percent) for s in scenes]


# --- recognition of personal instances ----------------------------------------------------------------------------


@dataclass
class RecognitionSet:
    concepts: dict[str, Instance]  # name -> the personal instance
    references: dict[str, list[Image.Image]]  # name -> its reference views
    tests: list[Scene]  # test images; a concept is present where scene.contains(its instance)
    reference_masks: dict[str, list[np.ndarray]] = field(default_factory=dict)  # name -> its mask in each view

    def present(self, scene: Scene, name: str) -> bool:
        return scene.contains(self.concepts[name])


def recognition_set(num_concepts: int = 10, *, seed: int = 0, views: int = 5, positives: int = 4,
                    look_alikes: int = 2) -> RecognitionSet:
    """Personal instances with ``views`` reference views each, and per concept ``positives`` test images showing it
    (half as the main subject, half small among others) and ``look_alikes`` showing a look-alike instead."""
    if num_concepts > len(NAMES):
        raise ValueError(f"at most {len(NAMES)} concepts")
    instances = personal_instances(num_concepts, seed)
    rng = np.random.default_rng([seed, 0x7E57])
    concepts = dict(zip(NAMES, instances))
    views_of = {name: [view_of(inst, seed=seed * 7919 + 100 * i + v) for v in range(views)]
                for i, (name, inst) in enumerate(concepts.items())}
    tests = []
    for inst in instances:
        for j in range(positives):
            if j % 2 == 0:
                tests.append(render_scene(rng, inst))
            else:
                tests.append(render_scene(rng, None, distractors=[inst, random_instance(rng)]))
        for _ in range(look_alikes):
            tests.append(render_scene(rng, look_alike(inst, rng)))
    return RecognitionSet(concepts, {name: [view.image for view in shown] for name, shown in views_of.items()}, tests,
                          {name: [view.subject.mask for view in shown] for name, shown in views_of.items()})


def introduce(ego, data: RecognitionSet, on_concept=None) -> dict:
    """Register every concept from all its views (the one introduction every method starts from)."""
    introduced = {}
    for done, (name, views) in enumerate(data.references.items(), 1):
        introduced[name] = ego.register(name, views)
        if on_concept is not None:
            on_concept(done)
    return introduced


@dataclass
class ToyRecognition:
    """The paper's recognition score of one (method, views); the share of positives it said "yes" to, by how the
    instance was shown ("main subject", "small among others"); and the share of negatives it said "no" to, by kind:
    "look-alikes" (an instance of the concept's kind and colour, another pattern or accent) and "other objects"."""

    score: RecognitionScore
    found: dict[str, float]
    rejected: dict[str, float]


def recognition(ego, data: RecognitionSet, introduced: dict, runs: list[tuple[str, int]], *, threshold: float = 0.5,
                on_image=None) -> dict[tuple[str, int], ToyRecognition]:
    """The paper's protocol for each (method, views) in ``runs``: every test image asked about every concept."""
    decisions: dict[tuple[str, int], list] = {run: [] for run in runs}
    positives: dict[tuple[str, int], dict[str, list[bool]]] = {
        run: {"main subject": [], "small among others": []} for run in runs}
    negatives: dict[tuple[str, int], dict[str, list[bool]]] = {
        run: {"look-alikes": [], "other objects": []} for run in runs}
    intros = {  # the random method draws other tokens for each concept (seed i)
        run: {name: introduction(run[0], info, run[1], seed=i) for i, (name, info) in enumerate(introduced.items())}
        for run in runs}
    for done, scene in enumerate(data.tests, 1):
        (encoded,) = ego.backend.encode([to_rgb(scene.image, ego.config.max_image_pixels)])
        for run in runs:
            for name, p_yes in ego.yes_probabilities(encoded, intros[run]).items():
                present = data.present(scene, name)
                decisions[run].append((name, p_yes > threshold, present))
                if present:
                    positives[run][positive_kind(scene, data.concepts[name])].append(p_yes > threshold)
                else:
                    negatives[run][negative_kind(scene, data.concepts[name])].append(p_yes <= threshold)
        if on_image is not None:
            on_image(done)
    return {run: ToyRecognition(recognition_score(d), _shares(positives[run]), _shares(negatives[run]))
            for run, d in decisions.items()}


def _shares(by_kind: dict[str, list[bool]]) -> dict[str, float]:
    return {kind: float(np.mean(v)) if v else float("nan") for kind, v in by_kind.items()}


def positive_kind(scene: Scene, instance: Instance) -> str:
    """How a scene shows ``instance``: as its "main subject", or "small among others" (a distractor's size)."""
    return "main subject" if scene.subject.instance == instance else "small among others"


def negative_kind(scene: Scene, instance: Instance) -> str:
    """How a scene without ``instance`` is a negative for it: "look-alikes" when it shows an instance of the same
    kind and colour (another pattern or accent), else "other objects"."""
    same_look = any((o.instance.kind, o.instance.colour) == (instance.kind, instance.colour) for o in scene.objects)
    return "look-alikes" if same_look else "other objects"


def answers_under_names(ego, data: RecognitionSet, introduced: dict, names: list[str],
                        on_image=None) -> tuple[np.ndarray, np.ndarray]:
    """Every (test image, concept) question of ``data`` asked under each of ``names`` in place of the concept's own
    (its memory: Ego's tokens from the first view of its ``introduce``): whether the answer was "yes", (names,
    images, concepts), and whether the concept is in the image, (images, concepts). A name says nothing of what a
    concept looks like, so the answers should not change with it. ``on_image()`` after each test image."""
    memories = [introduction("ego", info, 1) for info in introduced.values()]
    said = np.zeros((len(names), len(data.tests), len(memories)), dtype=bool)
    for i, scene in enumerate(data.tests):
        (encoded,) = ego.backend.encode([to_rgb(scene.image, ego.config.max_image_pixels)])
        for j, memory in enumerate(memories):
            for k, name in enumerate(names):
                said[k, i, j] = ego.yes_probabilities(encoded, {name: memory})[name] > 0.5
        if on_image is not None:
            on_image()
    present = np.array([[data.present(scene, name) for name in introduced] for scene in data.tests])
    return said, present


# --- the many-concepts filter (§3.5) ------------------------------------------------------------------------------


def filter_recall(ego, data: RecognitionSet, question: str = "What is in this image?") -> float:
    """How often a concept present in a test image is among those put in context, when not all of them fit.

    ``ego`` must hold every concept of ``data`` (more than ``max_concepts_in_context``); the question names none,
    so the choice is by similarity alone.
    """
    hits = []
    for scene in data.tests:
        present = [name for name in data.concepts if data.present(scene, name)]
        if not present:
            continue
        (encoded,) = ego.backend.encode([to_rgb(scene.image, ego.config.max_image_pixels)])
        chosen = set(ego.concepts_for(question, [encoded]))
        hits += [name in chosen for name in present]
    return float(np.mean(hits))


# --- boxes: where a recognised concept is -------------------------------------------------------------------------


def box_hits(ego, data: RecognitionSet) -> dict[str, float]:
    """Share of boxes with IoU >= 0.5 against the instance's true box, over ``data``'s test images that show it.

    ``ego`` must hold every concept of ``data`` (``introduce``). "main subject" and "among others" split the images
    by how the instance appears; "among others, another memory" boxes a small instance with the next concept's
    memory: what a box gets that the concept itself does not lead (there, the main subject is something else).
    """
    names = list(data.concepts)
    memories = [ego.store.get(name).vectors for name in names]
    hits: dict[str, list[bool]] = {"main subject": [], "among others": [], "among others, another memory": []}
    for scene in data.tests:
        shown = [(i, placed) for i, name in enumerate(names) for placed in scene.objects
                 if placed.instance == data.concepts[name]]
        if not shown:
            continue
        (encoded,) = ego.backend.encode([to_rgb(scene.image, ego.config.max_image_pixels)])
        for i, placed in shown:
            role = "main subject" if placed is scene.subject else "among others"
            hits[role].append(iou(concept_box(encoded, memories[i], scene.image.size), placed.box) >= 0.5)
            if role == "among others":
                other = concept_box(encoded, memories[(i + 1) % len(names)], scene.image.size)
                hits["among others, another memory"].append(iou(other, placed.box) >= 0.5)
    return {role: float(np.mean(values)) for role, values in hits.items()}


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes, x1 and y1 exclusive."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- registering from a box on a cluttered view -------------------------------------------------------------------

REGION_WAYS = ("whole view", "inside the box", "crop")
CROP_CONTEXT = 0.5  # the crop way: this share of the box's width (height) added on each side


def region_registration(ego, count: int, seed: int, later: int = 4) -> dict[str, dict[str, float]]:
    """How well a concept is registered from one view where it is small beside another object, given its box.

    Per way of confining (``REGION_WAYS``): no box; the engine's ``register(regions=...)``, which ranks only the
    tokens inside the box; a crop around the box with context, enlarged to the view's size, alpha the box's share
    of it. Reports the share of kept tokens on the instance ("on the instance"), and the share of boxes with IoU
    >= 0.5 that its memory gives in ``later`` new scenes, half with the instance as the main subject, half small
    among others.
    """
    rng = np.random.default_rng([seed, 0xB0C5])
    scores: dict[str, dict[str, list]] = {way: {"on the instance": [], "main subject": [], "among others": []}
                                          for way in REGION_WAYS}
    for instance in personal_instances(count, seed):
        view, placed = _shown_among_others(rng, instance)
        mask = placed.mask
        memories = {}
        for way in REGION_WAYS:
            if way == "crop":
                image, mask_shown, area = _crop(view.image, mask, placed.box)
                info = ego.register("probe", [image], area_percent=area)
            else:
                mask_shown = mask
                info = ego.register("probe", [view.image], regions=[placed.box] if way == "inside the box" else None)
            ego.forget("probe")
            trace = info.traces[0]
            kept = trace.selected.numpy()
            scores[way]["on the instance"].append(float(subject_tokens(mask_shown, trace.image.grid_thw)[kept].mean()))
            memories[way] = trace.image.features[kept]
        for j in range(later):
            scene, shown = (render_scene(rng, instance), None) if j % 2 == 0 else _shown_among_others(rng, instance)
            shown = shown or scene.subject
            (encoded,) = ego.backend.encode([to_rgb(scene.image, ego.config.max_image_pixels)])
            role = "main subject" if shown is scene.subject else "among others"
            for way, memory in memories.items():
                scores[way][role].append(iou(concept_box(encoded, memory, scene.image.size), shown.box) >= 0.5)
    return {way: {what: float(np.mean(v)) for what, v in by.items()} for way, by in scores.items()}


def _shown_among_others(rng, instance: Instance):
    """A scene in which ``instance`` is drawn small beside another object, the main subject; and where it is."""
    while True:
        scene = render_scene(rng, None, distractors=[instance, random_instance(rng)])
        placed = next((o for o in scene.objects if o.instance == instance), None)
        if placed is not None:
            return scene, placed


def _crop(image: Image.Image, mask: np.ndarray, box) -> tuple[Image.Image, np.ndarray, float]:
    """The crop around ``box`` with ``CROP_CONTEXT``, enlarged to as many pixels as ``image``; its mask; alpha."""
    x0, y0, x1, y1 = box
    margin_x, margin_y = CROP_CONTEXT * (x1 - x0), CROP_CONTEXT * (y1 - y0)
    window = (max(0, int(x0 - margin_x)), max(0, int(y0 - margin_y)),
              min(image.width, int(np.ceil(x1 + margin_x))), min(image.height, int(np.ceil(y1 + margin_y))))
    width, height = window[2] - window[0], window[3] - window[1]
    scale = (image.width * image.height / (width * height)) ** 0.5
    size = (round(width * scale), round(height * scale))
    crop = image.crop(window).resize(size, Image.Resampling.BICUBIC)
    crop_mask = Image.fromarray(mask.astype(np.uint8) * 255).crop(window).resize(size, Image.Resampling.NEAREST)
    return crop, np.asarray(crop_mask) > 127, 100.0 * (x1 - x0) * (y1 - y0) / (width * height)
