# SPDX-License-Identifier: Apache-2.0
"""The toy world's scenes and ground truth, its command, its training tasks and the trainer's determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ego_ros.engine import prompts
from ego_ros import toy as toy_world
from ego_ros.toy import world
from ego_ros.toy import tasks

REPO = Path(__file__).resolve().parents[1]


def test_a_seed_gives_the_same_scene_and_another_seed_another():
    a, b, c = toy_world.scene(5), toy_world.scene(5), toy_world.scene(6)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.to_json() == b.to_json()
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("seed", range(8))
def test_ground_truth_is_exact(seed):
    scene = toy_world.scene(seed)
    pixels = np.asarray(scene.image).astype(int)
    assert scene.objects[0].role == "subject" and all(o.role == "distractor" for o in scene.objects[1:])
    union = np.zeros(pixels.shape[:2], dtype=int)
    for placed in scene.objects:
        ys, xs = np.nonzero(placed.mask)
        assert placed.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        union += placed.mask
        # Inside the mask every pixel is the body colour, the accent colour or a blend of the two (rotated edges),
        # up to the noise.
        body = np.array(world.COLOURS[placed.instance.colour])
        accent = np.array(world.COLOURS[placed.instance.accent or placed.instance.colour])
        inside = pixels[placed.mask] - body
        span = accent - body
        t = np.clip(inside @ span / max(1, span @ span), 0, 1)[:, None]
        distance = np.abs(inside - t * span).max(axis=1)
        assert np.mean(distance < 45) > 0.95, placed.instance
    assert union.max() == 1, "objects overlap"
    assert scene.subject.area_percent == max(o.area_percent for o in scene.objects)


def test_personal_instances_differ_from_their_look_alikes_only_by_a_detail():
    mine = toy_world.personal_instances(12, seed=0)
    assert len(set(mine)) == 12 and all(i.pattern != "plain" for i in mine)
    rng = np.random.default_rng(0)
    for instance in mine:
        other = toy_world.look_alike(instance, rng)
        assert other != instance
        assert (other.kind, other.colour) == (instance.kind, instance.colour)
    assert toy_world.personal_instances(12, seed=0) == mine


def test_views_of_an_instance_vary():
    mug = toy_world.Instance("mug", "red", "striped", "white")
    views = [toy_world.view_of(mug, seed=s) for s in range(4)]
    assert all(v.subject.instance == mug for v in views)
    assert len({v.subject.box for v in views}) == 4
    assert len({round(v.subject.area_percent) for v in views}) > 1


def test_instances_refuse_impossible_descriptions():
    with pytest.raises(ValueError, match="accent"):
        toy_world.Instance("mug", "red", "striped")
    with pytest.raises(ValueError, match="accent"):
        toy_world.Instance("mug", "red", "striped", "red")
    with pytest.raises(ValueError, match="unknown"):
        toy_world.Instance("teapot", "red")


def test_scenes_command_writes_images_masks_and_ground_truth(tmp_path):
    out = tmp_path / "scenes"
    subprocess.run([sys.executable, "-m", "ego_ros.toy", "scenes", str(out), "--count", "3",
                    "--seed", "7"], check=True, cwd=REPO, capture_output=True)
    record = json.loads((out / "scenes.json").read_text())
    assert record["seed"] == 7 and len(record["scenes"]) == 3
    samples = toy_world.calibration_samples(3, seed=7)
    for (name, truth), (image, mask) in zip(sorted(record["scenes"].items()), samples):
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), np.asarray(image))
        written = np.asarray(Image.open(out / f"{name}.mask.png"))
        assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
        assert np.array_equal(written == 255, mask)
        subject = truth["objects"][0]
        assert subject["role"] == "subject" and subject["kind"] in world.KINDS
        ys, xs = np.nonzero(mask)
        assert subject["box"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_scenes_command_refuses_a_bad_count(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ego_ros.toy", "scenes", str(tmp_path / "x"),
                          "--count", "0"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "--count must be at least 1" in run.stderr
    assert not (tmp_path / "x").exists()


def test_token_coverage_counts_each_28px_block():
    mask = np.zeros((56, 84), dtype=bool)
    mask[:28, :28] = True  # token 0 fully
    mask[28:42, 28:56] = True  # token 4 half
    coverage = tasks.token_coverage(mask)
    assert coverage.tolist() == [1.0, 0, 0, 0, 0.5, 0]
    assert tasks.object_tokens(mask) == (0, 4)
    with pytest.raises(ValueError, match="token blocks"):
        tasks.token_coverage(np.zeros((30, 28), dtype=bool))


def test_a_token_is_labelled_with_the_object_covering_most_of_it_from_a_memorys_coverage_on():
    """The seeing stage labels a token wherever a memory would take it (MASK_COVERAGE), with the object covering
    most of it: labelling only half-covered tokens taught a small instance's edge tokens to read as background."""
    def placed(instance, blocks):
        mask = np.zeros((world.SIZE, world.SIZE), dtype=bool)
        for token, rows in blocks.items():  # rows of the token's 28 px block the object fills
            y, x = divmod(token, world.SIZE // tasks.TOKEN_PX)
            mask[y * 28:y * 28 + rows, x * 28:(x + 1) * 28] = True
        return world.PlacedObject(instance, (0, 0, 1, 1), mask)

    mug, ball = toy_world.Instance("mug", "red", "striped", "white"), toy_world.Instance("ball", "blue")
    # token 0: the mug alone; 1: mug 0.29, ball 0.39; 2: ball 0.21 (under MASK_COVERAGE); 3: a tie at 0.5
    scene = world.Scene(Image.new("RGB", (world.SIZE, world.SIZE)),
                        [placed(mug, {0: 28, 1: 8, 3: 14}), placed(ball, {1: 11, 2: 6, 3: 14})])
    classes = tasks.token_attributes(scene)
    assert classes.shape == (64, 4)
    assert classes[0].tolist() == classes[3].tolist() == tasks.attribute_indices(mug)
    assert classes[1].tolist() == tasks.attribute_indices(ball)
    assert (classes[2:3] == tasks.NONE).all() and (classes[4:] == tasks.NONE).all()


def test_answers_name_what_the_scene_holds():
    rng = np.random.default_rng(1)
    mug = toy_world.Instance("mug", "red", "striped", "white")
    scene = world.render_scene(rng, mug, distractors=[toy_world.Instance("ball", "blue")])
    assert mug.keywords == ["red", "mug", "stripes"]
    assert tasks.caption(scene) == "A red mug with stripes and a blue ball."
    assert tasks.where(scene, toy_world.Instance("box", "green")) == "It is not in this image."
    x0, y0, x1, y1 = scene.subject.box
    row = ("Top", "", "Bottom")[min(2, int(3 * (y0 + y1) / 2 / 224))]
    assert tasks.where(scene, mug).startswith(row or ("Left", "Centre", "Right")[min(2, int(3 * (x0 + x1) / 2 / 224))])


def test_dense_words_say_what_is_on_each_token():
    mug, ball = toy_world.Instance("mug", "red", "striped", "white"), toy_world.Instance("ball", "blue")
    scene = world.render_scene(np.random.default_rng(2), mug, distractors=[ball])
    colours = tasks.colour_words(scene)
    answers = tasks.answer_words(scene, lambda instance: instance == mug)
    assert len(colours) == len(answers) == 64
    on_mug = tasks.token_coverage(scene.subject.mask) >= 0.5
    on_ball = tasks.token_coverage(scene.objects[1].mask) >= 0.5
    assert on_mug.any() and on_ball.any()
    assert [colours[i] for i in np.flatnonzero(on_mug)] == ["red"] * on_mug.sum()
    assert [colours[i] for i in np.flatnonzero(on_ball)] == ["blue"] * on_ball.sum()
    assert all(colours[i] is None for i in np.flatnonzero(~(on_mug | on_ball)))
    assert [a == "Yes" for a in answers] == on_mug.tolist()


def test_calibration_from_the_toy_world(tmp_path, tiny_model_dir):
    """`ego-ros calibrate toy` reads the same scenes as toy_world.calibration_samples, and calibrates on them."""
    from ego_ros.engine.calibration_data import pair_samples

    samples = pair_samples(toy_world.calibration_samples(3, seed=7), "toy world, seed 7")
    assert len(samples) == 3
    for (got_image, got_mask), (image, mask) in zip(samples, toy_world.calibration_samples(3, seed=7)):
        assert np.array_equal(np.asarray(got_image), np.asarray(image)) and np.array_equal(got_mask, mask)
    run = subprocess.run([sys.executable, "-m", "ego_ros.cli", "calibrate", "toy", "--count", "3", "--seed", "7",
                          "--model", str(tiny_model_dir), "--calibration-dir", str(tmp_path), "--no-save"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "3 images (toy world, seed 7)" in run.stdout and "chosen: layers" in run.stdout


def test_training_samples_use_the_engine_prompts(ego):
    """Every sample builds, with the engine's own backend, into a prompt whose question is an engine prompt."""
    rng = np.random.default_rng(3)
    samples = [tasks.make_sample(rng) for _ in range(60)]
    assert {s.task for s in samples} == set(tasks.TASK_WEIGHTS)
    questions = {prompts.KEYWORDS, prompts.AREA, prompts.CAPTION}
    for sample in samples:
        question = sample.parts[-1]
        assert question in questions or question.startswith(("Is ", "Where is ", "What colour is ")), question
        if sample.task == "concept":
            name = question.split(" ")[2] if question.startswith("Where") else question.split(" ")[1]
            assert prompts.CONCEPT_INTRO.format(name=name) in sample.parts
        if sample.task == "choice":  # the evaluation's A/B question; the answer the option of the memory's colour
            name = question.split("?")[0].split(" ")[-1]
            colour = sample.scenes[-1].subject.instance.colour if len(sample.scenes) > 1 else None
            options = dict(line.split(". ") for line in question.split("\n")[1:3])
            assert question == prompts.choice(f"What colour is {name}?", options["A"], options["B"])
            assert prompts.CONCEPT_INTRO.format(name=name) in sample.parts and sample.answer in options
            assert colour is None or options[sample.answer] == colour
    assert all(len(s.token_words) == 64 for s in samples)  # one word (or None) per visual token of the image
    encoded = ego.backend.encode(samples[0].images)
    built = ego.backend.build([[p if isinstance(p, str) else encoded[p.index] if isinstance(p, tasks.ImageRef)
                                else encoded[p.index].features[list(p.tokens)] for p in samples[0].parts]])
    assert built.injected.shape[0] == sum(
        encoded[p.index].num_tokens if isinstance(p, tasks.ImageRef) else len(p.tokens)
        for p in samples[0].parts if not isinstance(p, str))


SMALL = dict(vision_steps=2, vision_batch_size=2, steps=2, describe_steps=1, batch_size=3, warmup_steps=1,
             circuit=False,
             text=(("hidden_size", 32), ("intermediate_size", 64), ("num_hidden_layers", 2),
                   ("num_attention_heads", 2), ("num_key_value_heads", 1),
                   ("rope_scaling", (("type", "mrope"), ("mrope_section", (2, 3, 3))))),
             vision=(("hidden_size", 32), ("intermediate_size", 32), ("num_heads", 2), ("depth", 2),
                     ("fullatt_block_indexes", (1,))))


def test_training_is_deterministic_for_a_seed_and_loads_as_a_checkpoint(tmp_path):
    from ego_ros.engine import Ego
    from ego_ros.toy.train import RECIPE_FILE, Recipe, model_dir, train

    recipe = Recipe(**SMALL)
    runs = [train(tmp_path / name, seed=seed, recipe=recipe, progress=False)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    weights = [Path(run, "model.safetensors").read_bytes() for run in runs]
    assert weights[0] == weights[1] and weights[0] != weights[2]
    record = json.loads((runs[0] / RECIPE_FILE).read_text())
    assert record["seed"] == 0 and record["recipe"]["steps"] == 2

    ego = Ego.load(str(runs[0]), memory_dir=tmp_path / "memory", calibration_dir=tmp_path / "calibration")
    assert ego.backend.decoder_layers[0].self_attn.q_proj.weight.shape == (32, 32)
    assert ego.recognize(toy_world.scene(0).image) == {}

    # model_dir keeps a checkpoint made by this recipe, and retrains one made by another.
    stamp = (runs[0] / "model.safetensors").stat().st_mtime_ns
    assert model_dir(runs[0], seed=0, recipe=recipe, progress=False) == runs[0]
    assert (runs[0] / "model.safetensors").stat().st_mtime_ns == stamp
    record["recipe_hash"] = "stale"
    (runs[0] / RECIPE_FILE).write_text(json.dumps(record))
    model_dir(runs[0], seed=0, recipe=recipe, progress=False)
    assert json.loads((runs[0] / RECIPE_FILE).read_text())["recipe_hash"] != "stale"
    assert (runs[0] / "model.safetensors").read_bytes() == weights[0]


def test_training_from_a_checkpoints_seeing_stage_makes_the_same_model(tmp_path, capsys):
    """``seeing_from`` takes the vision tower of a checkpoint whose card records the same seeing-stage sources:
    the model is byte for byte the one training from scratch makes, its card the seeing stage's record and where it
    came from. A card of other seeing sources, a recipe that changes the seeing stage, or a folder with no model is
    refused with the reason, from Python and from the command, before anything is written; a recipe that changes
    only the later stages is not."""
    from dataclasses import replace

    from ego_ros.toy.__main__ import main
    from ego_ros.toy.train import RECIPE_FILE, Recipe, SeeingStageRefused, seeing_sources, train

    recipe = Recipe(**SMALL)
    scratch = train(tmp_path / "scratch", recipe=recipe, progress=False)
    card = json.loads((scratch / RECIPE_FILE).read_text())
    assert card["seeing_sources"] == seeing_sources(recipe, 0)
    resumed = train(tmp_path / "resumed", recipe=recipe, progress=False, seeing_from=scratch)
    assert (resumed / "model.safetensors").read_bytes() == (scratch / "model.safetensors").read_bytes()
    seeing = json.loads((resumed / RECIPE_FILE).read_text())["stages"]["seeing"]
    assert seeing.pop("taken from") == {"recipe_hash": card["recipe_hash"], "seeing_sources": card["seeing_sources"]}
    assert seeing == card["stages"]["seeing"]

    later_only = replace(recipe, steps=3, memory_learning_rate=5e-4)
    assert seeing_sources(later_only, 0) == seeing_sources(recipe, 0)
    train(tmp_path / "later", recipe=later_only, progress=False, seeing_from=scratch)
    for other, seed in ((replace(recipe, vision_steps=3), 0), (recipe, 1)):
        assert seeing_sources(other, seed) != seeing_sources(recipe, 0)
        with pytest.raises(SeeingStageRefused, match="made by other sources, recipe or seed"):
            train(tmp_path / "refused", recipe=other, seed=seed, progress=False, seeing_from=scratch)
    card["seeing_sources"] = "other"
    (scratch / RECIPE_FILE).write_text(json.dumps(card))
    with pytest.raises(SeeingStageRefused, match="seeing_sources other"):
        train(tmp_path / "refused", recipe=recipe, progress=False, seeing_from=scratch)
    assert main(["train", str(tmp_path / "refused"), "--seeing-from", str(tmp_path / "nothing")]) == 1
    assert "holds no toy model to take the seeing stage from" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


# --- the committed toy model --------------------------------------------------------------------------------------


def test_the_committed_toy_model_is_the_recipes_and_replays_its_first_steps():
    """The checkpoint in ego_ros/toy/model/ was made by the recipe as it is now (its card's hash), is small enough
    to commit, says how it was made, and the recipe's first steps still give the losses its card recorded: recipe
    and checkpoint cannot drift apart silently. (A recipe change retrains it: python -m ego_ros.toy train
    ego_ros/toy/model.)"""
    import torch

    from ego_ros.toy import CHECKPOINT
    from ego_ros.toy.circuit import Strengths
    from ego_ros.toy.train import RECIPE_FILE, REPLAYED_STEPS, Recipe, build, is_current, learn_to_see, seeing_sources

    assert is_current(CHECKPOINT), "the toy recipe changed: retrain ego_ros/toy/model and commit it with the change"
    size = sum(f.stat().st_size for f in CHECKPOINT.iterdir())
    assert size < 16 * 2**20, f"the committed toy model is {size / 2**20:.1f} MB"
    card = json.loads((CHECKPOINT / RECIPE_FILE).read_text())
    assert set(card["stages"]) == {"seeing", "describing", "writing", "using memories"}
    assert "written by hand" in card["stages"]["writing"] and card["trained_on"]["cpus"] >= 1
    assert card["seconds"] > 0 and card["parameters"] > 1_000_000
    assert card["seeing_sources"] == seeing_sources(Recipe(), 0)  # what `train --seeing-from` checks
    assert card["stages"]["writing"]["fit"]["matching threshold"] == Strengths().threshold

    recipe = Recipe()
    torch.set_num_threads(recipe.threads)
    model, _, _, backend = build(0, recipe)
    replayed = learn_to_see(model, backend, 0, recipe, progress=False, stop_at=REPLAYED_STEPS)["first_losses"]
    recorded = card["stages"]["seeing"]["first_losses"]
    assert len(recorded) == REPLAYED_STEPS
    # float reductions differ between machines (CPU/GPU): a relative tolerance, far below what a changed recipe moves
    assert replayed == pytest.approx(recorded, rel=2e-3)


def test_a_concept_questions_frame_says_nothing_of_its_answer():
    """Positives and negatives are drawn alike (a personal, patterned instance as the main subject or small among
    others), so that nothing but the memory tells them apart. Negatives drawn as any scene had a plain subject far
    more often (29% against 8% of positives here) and fewer objects (1.96 against 2.12): the layers above the written
    heads learned to answer a patterned subject alone (bench/image_bias.py)."""
    frames = {"Yes": [], "No": []}
    for i in range(400):
        sample = tasks.concept_question(np.random.default_rng([78, i]), "image_first")
        if sample.answer in frames:
            scene = sample.scenes[0]
            frames[sample.answer].append((scene.subject.instance.pattern != "plain", len(scene.objects)))
    (patterned_yes, objects_yes), (patterned_no, objects_no) = (np.mean(frames[a], axis=0) for a in ("Yes", "No"))
    assert min(len(f) for f in frames.values()) > 150
    assert abs(patterned_yes - patterned_no) < 0.1, (patterned_yes, patterned_no)
    assert abs(objects_yes - objects_no) < 0.1, (objects_yes, objects_no)


def test_training_memories_hold_one_view_or_several_of_their_instance_in_view_order():
    """A concept question's memory is the engine's layout of a concept registered from 1 to MEMORY_VIEWS views: one
    run of rows, each view's tokens in turn, every view a fresh one of the same instance."""
    counts = []
    for i in range(60):
        sample = tasks.concept_question(np.random.default_rng([77, i]), "image_first")
        runs, run = [], []
        for part in sample.parts:  # the memories: consecutive MemoryRefs after an introduction
            if isinstance(part, tasks.MemoryRef):
                run.append(part)
            elif run:
                runs.append(run)
                run = []
        for memory in runs:
            instances = {sample.scenes[ref.index].subject.instance for ref in memory}
            assert len(instances) == 1 and len({ref.index for ref in memory}) == len(memory)
            assert [ref.index for ref in memory] == sorted(ref.index for ref in memory)
            counts.append(len(memory))
    assert min(counts) == 1 and max(counts) == tasks.MEMORY_VIEWS
    assert 0.3 < np.mean(np.array(counts) == 1) < 0.7  # SINGLE_VIEW_SHARE


def test_training_data_never_draws_the_evaluations_seeds():
    """Every training step draws from three numbers [seed, stage, step]; the toy world's scenes, instances, views
    and the evaluation's sets draw from two: no training stream is an evaluation stream. Checked on what they
    render: the first steps' scenes of every stage differ from the test sets' images."""
    from ego_ros.evaluation import toy as protocol
    from ego_ros.toy.train import STAGES, data_rng

    tests = protocol.recognition_set(10, seed=3, views=1)
    shown = {np.asarray(scene.image).tobytes() for scene in tests.tests}
    shown |= {np.asarray(view).tobytes() for views in tests.references.values() for view in views}
    for stage in STAGES:
        for step in range(3):
            drawn = world.render_scene(data_rng(0, stage, step))
            assert np.asarray(drawn.image).tobytes() not in shown


def test_the_recognition_set_keeps_each_reference_views_mask():
    """Each reference view comes with its instance's mask (bench/feature_ceiling.py makes memories of the tokens it
    covers, as the trainer does): inside it the instance's body colour, outside it almost never."""
    from ego_ros.evaluation import toy as protocol

    data = protocol.recognition_set(4, seed=3, views=2)
    for name, instance in data.concepts.items():
        assert len(data.reference_masks[name]) == len(data.references[name]) == 2
        for view, mask in zip(data.references[name], data.reference_masks[name]):
            pixels = np.asarray(view).astype(int)
            assert mask.shape == pixels.shape[:2] and mask.dtype == bool
            body = np.abs(pixels - np.array(world.COLOURS[instance.colour])).sum(-1) < 60
            assert body[mask].mean() > 0.6 and body[~mask].mean() < 0.05


def test_the_recognition_set_shows_each_instance_as_main_subject_and_small_among_others_alike():
    """Half of a concept's positives show it as the main subject, half small among others (the two halves that
    bench/quality.py reports recall of)."""
    from ego_ros.evaluation import toy as protocol

    data = protocol.recognition_set(5, seed=3, views=1, positives=4, look_alikes=2)
    for name, instance in data.concepts.items():
        area = {"main subject": [], "small among others": []}  # the instance's share of each image it is shown in
        for scene in data.tests:
            if data.present(scene, name):
                placed = next(o for o in scene.objects if o.instance == instance)
                area[protocol.positive_kind(scene, instance)].append(placed.area_percent)
        assert len(area["main subject"]) >= 2 and len(area["small among others"]) >= 2, (name, area)
        assert max(area["small among others"]) < min(area["main subject"]), (name, area)


# What the pooling heads write at the answer, yes against no questions (24 each order): measured 0.89 image first,
# 0.76 concept first (its matcher asks image rows to find themselves in a memory: weaker, see docs/toy-world.md)
POOLED_AUC_FLOOR = {"image_first": 0.8, "concept_first": 0.65}


def _model_and_backend(model_dir):
    """The toy model as the recipe holds it: the plain model class and the engine's backend over it."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ego_ros.engine.backends.qwen2_5_vl import Qwen2_5_VLBackend
    from ego_ros.toy.train import Recipe, build

    _, tokenizer, image_processor, _ = build(0, Recipe())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, Qwen2_5_VLBackend(model, tokenizer, image_processor, placeholder=prompts.CONCEPT_PLACEHOLDER,
                                    max_pixels=world.SIZE * world.SIZE)


def test_the_written_heads_do_in_the_committed_model_what_circuit_py_says(toy_model_dir):
    """On concept questions of seeds training never drew: the image tag gives image rows +1 and memory rows 0, the
    memory tag memory rows +1 and an image before them 0; the memory rows of an instance that is in the image find
    more of it than those of one that is not (image first), and the image rows likewise (concept first); and what
    the pooling heads write at the answer separates yes from no questions."""
    from ego_ros.toy import circuit

    model, backend = _model_and_backend(toy_model_dir)
    d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    for order in ("image_first", "concept_first"):
        samples, i = [], 0
        while len(samples) < 24:  # one memory from the instance's tokens each, a yes/no question
            sample = tasks.concept_question(np.random.default_rng([4242, i]), order)
            i += 1
            memories = [p for p in sample.parts if isinstance(p, tasks.MemoryRef)]
            if (sample.answer in ("Yes", "No") and len(memories) == 1 and len(memories[0].tokens) < 40
                    and circuit._order(sample) == order):  # several concepts come first whatever was asked
                samples.append(sample)
        built, rows = circuit._prompts(backend, samples)
        _, _, heads = circuit._run(model, backend, built, [0, 1, 2])
        tags = {name: heads[layer][..., head * d] for name, (layer, head) in circuit.TAG_HEADS.items()}
        assert tags["image"][rows.image].mean() > 0.9 and tags["image"][rows.memory].abs().mean() < 0.1
        assert tags["memory"][rows.memory].mean() > 0.9
        if order == "image_first":
            assert tags["memory"][rows.image].abs().max() < 0.1
        layer, head = circuit.MATCH_HEADS[order]
        found = heads[layer][..., head * d]
        asking = rows.memory if order == "image_first" else rows.image
        on_object = rows.codes[..., circuit.COLOUR].sum(-1) > 0.5
        rows_asking = [asking[b] & on_object[b] for b in range(len(samples))]
        evidence = {answer: np.mean([float(found[b][rows_asking[b]].mean()) for b, s in enumerate(samples)
                                     if s.answer == answer and rows_asking[b].any()]) for answer in ("Yes", "No")}
        assert evidence["Yes"] > evidence["No"] + 0.1, (order, evidence)
        pooled = sum(heads[layer][:, -1, head * d] for layer, head in circuit.POOL_HEADS.values())
        yes = pooled[[s.answer == "Yes" for s in samples]]
        no = pooled[[s.answer == "No" for s in samples]]
        auc = float((yes[:, None] > no[None, :]).float().mean())
        print(f"{order}: pooled evidence at the answer, yes against no: AUC {auc:.2f}")
        assert auc > POOLED_AUC_FLOOR[order], order


def test_the_last_stage_ties_a_single_concepts_answer_to_the_written_evidence(toy_model_dir):
    """Training's loss for a single concept's yes/no question adds, to the answer's own, TIE_WEIGHT x the binary
    cross-entropy between the answer's yes/no log-odds and sigmoid(TIE_SHARPNESS x (what the pooling heads write at
    that row - TIE_THRESHOLD)), recomputed here from a forward of each prompt alone; questions about several
    concepts and other tasks keep their loss."""
    import torch

    from ego_ros.toy import circuit, train

    model, backend = _model_and_backend(toy_model_dir)
    d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    yes, no = backend.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    single, several, i = [], [], 0
    while len(single) < 4 or len(several) < 2:  # both orders, and questions about several concepts
        sample = tasks.concept_question(np.random.default_rng([4343, i]), tasks.ORDERS[i % 2])
        i += 1
        (single if sample.asks_one_concept else several).append(sample)
    batch = single[:4] + several[:2] + [tasks.make_sample(np.random.default_rng(4344), {"presence": 1.0})]
    assert all(s.answer in ("Yes", "No") for s in batch if s.asks_one_concept)
    end_of_turn = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        plain = train._losses(model, backend, batch, end_of_turn)
        with circuit.written_evidence(backend) as evidence:
            tied = train._losses(model, backend, batch, end_of_turn, evidence)
        for sample, added in zip(batch, (tied - plain).tolist()):
            if not sample.asks_one_concept:
                assert added == 0.0, sample.task
                continue
            built, _ = circuit._prompts(backend, [sample])  # the prompt alone: its last row says Yes or No
            pooled = {}
            layer, _ = next(iter(circuit.POOL_HEADS.values()))
            hook = backend.attention_module(layer).o_proj.register_forward_pre_hook(
                lambda _, args: pooled.__setitem__("heads", args[0][0, -1].float()))
            try:
                with train.injected_rows(model, backend.injected_token_ids, built.injected):
                    logits = model(**built.model_inputs(), use_cache=False).logits[0, -1].float()
            finally:
                hook.remove()
            value = sum(pooled["heads"][head * d] for _, head in circuit.POOL_HEADS.values())
            expected = train.TIE_WEIGHT * torch.nn.functional.binary_cross_entropy_with_logits(
                logits[yes] - logits[no], torch.sigmoid(train.TIE_SHARPNESS * (value - train.TIE_THRESHOLD)))
            assert added == pytest.approx(float(expected), abs=1e-4), sample.parts[-1]


def test_a_stale_committed_model_is_refused_with_the_way_to_retrain_it(tmp_path, monkeypatch, capsys):
    """A committed checkpoint whose card's hash is not the recipe's is an error naming the command that retrains
    it, from Python and from `python -m ego_ros.toy model`; nothing is trained or written."""
    from ego_ros.toy import StaleCheckpoint
    from ego_ros.toy.__main__ import main
    from ego_ros.toy.train import RECIPE_FILE

    card = json.loads((toy_world.CHECKPOINT / RECIPE_FILE).read_text())
    card["recipe_hash"] = "stale"
    (tmp_path / RECIPE_FILE).write_text(json.dumps(card))
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(toy_world, "CHECKPOINT", tmp_path)
    with pytest.raises(StaleCheckpoint, match="python -m ego_ros.toy train"):
        toy_world.model_dir()
    assert main(["model"]) == 1
    assert "was not made by the recipe as it is now" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RECIPE_FILE, "model.safetensors"])
    assert (tmp_path / "model.safetensors").read_bytes() == b""


def test_the_tally_grades_what_was_said_against_what_each_frame_showed():
    from ego_ros.toy.camera import ToyCamera
    from ego_ros.toy.tally import IN_VIEW, Tally

    camera = ToyCamera(seed=0)
    frames = [camera.frame_at(t) for t in np.arange(0.0, 30.0, 0.5)]

    def truth(frame, share):
        return {name for name, instance in camera.names.items() if frame.shows(instance, share)}

    honest, always, never = Tally(camera), Tally(camera), Tally(camera)
    for frame in frames:
        honest.add(frame, truth(frame, IN_VIEW))
        always.add(frame, set(camera.names))
        never.add(frame, set())
    assert honest.macro_f1 == 1.0 and all(c.true_positives and c.true_negatives for c in honest.rows.values())
    assert all(c.false_positives == c.false_negatives == 0 for c in honest.rows.values())
    for name, c in always.rows.items():  # "yes" to everything: all shown frames found, every hidden one wrong
        assert (c.false_negatives, c.true_negatives) == (0, 0) and c.recall == 1.0 and c.precision < 0.5
        shown = sum(frame.shows(camera.names[name], IN_VIEW) for frame in frames)
        hidden = sum(not any(s.instance == camera.names[name] for s in frame.visible) for frame in frames)
        assert (c.true_positives, c.false_positives) == (shown, hidden)
        assert shown + hidden < len(frames)  # slivers are not counted
    assert never.macro_f1 == 0.0 and all(c.true_positives == c.false_positives == 0 for c in never.rows.values())
    table = honest.table()
    assert f"| Rex ({camera.names['Rex'].phrase}) | " in table
    assert table.endswith(f"macro F1 100.0 over {len(frames)} frames")
