# SPDX-License-Identifier: Apache-2.0
"""The instruction texts of the method, in one place so that they can be read (and tuned) together."""

# The reserved token whose input-embedding rows are overwritten with a concept's memory vectors (soft tokens).
# Added to the tokenizer when the checkpoint does not have it; it must never be generated.
CONCEPT_PLACEHOLDER = "<|ego_concept|>"

# Concept introduction (paper §3.2): the keywords whose attention picks the visual tokens.
KEYWORDS = (
    "Describe the main subject of this image with a few short keywords. "
    "List five keywords, separated by commas."
)

# Concept introduction: the subject's share of the image, alpha in K_c = min(K, alpha * N_r / 100).
AREA = "What percentage of the image does the main subject cover? Answer with a single number between 0 and 100."

# Inference (paper §3.3): each concept's name followed by its soft tokens, before the image(s) and the question.
CONCEPT_INTRO = "{name} is "
CONCEPTS_HEADER = "Personal concepts you know:\n"

# Several images are frames of one clip, oldest first, each with its time relative to the newest.
VIDEO_HEADER = "The frames below are from the last seconds of video, oldest first."
FRAME_LABEL = "Frame at {seconds:+.1f} s:"

# Recognition: one yes/no question per concept; the answer's first-token logits give the probability.
RECOGNIZE = "Is {name} in this image? Answer yes or no."
YES_WORDS = ("Yes", "yes")
NO_WORDS = ("No", "no")

# Scored instead of the keywords when the model's answer holds no word at all (a degenerate generation).
FALLBACK_KEYWORDS = "main subject"

# Questions beyond concept introduction and recognition: a caption (the evaluation's captioning recall) and where a
# concept is. The toy model is trained on them too, in the same format as at inference.
CAPTION = "Describe this image in one short sentence."
LOCATE = "Where is {name} in this image?"


def choice(question: str, a: str, b: str) -> str:
    """A two-option question, answered with the option's letter: the evaluation's A/B VQA, as the toy model is
    taught it."""
    return f"{question}\nA. {a}\nB. {b}\nAnswer with the option's letter."
