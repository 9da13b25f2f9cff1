"""LLaVA-1.5's prompt token ids by tokenization name, on a tokenizer built like the real one.

The expected ids are written out: the authors' setup (transformers 4.x, ``legacy`` behaviour)
put ``▁`` (29871) after ``<image>``; transformers 5 loading ``llava-hf``'s config
(``legacy: false``) drops it.
"""

from __future__ import annotations

import pytest
import torch

from jmllm.align.testing import llava_1_5_tokenizer, tiny_llava_config
from jmllm.joint import JointModel
from jmllm.joint.chat import format_prompt
from jmllm.joint.chat.tokenization import TokenizationError, llava_tokenizer, prepend_scheme
from jmllm.joint.model import JointModelError

QUESTION = "Is there a cat in the image? Only answer with 'yes' or 'no'."
# the issue-independent facts: BOS, <image>, "▁", "\n" (byte fallback), "▁US", "ER", ":"
PAPER_LEGACY = [1, 32000, 29871, 13]
PAPER_CHECKPOINT = [1, 32000, 13]
CARD_LEGACY = [1, 3148, 1001, 29901, 29871, 32000, 29871, 13]
CARD_CHECKPOINT = [1, 3148, 1001, 29901, 29871, 32000, 13]


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-1.5-tokenizer")
    llava_1_5_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint_folder):
    """The tokenizer as transformers 5 loads llava-hf's files (``legacy: false``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_folder)


def _ids(tokenizer, text):
    return tokenizer(text).input_ids


def test_legacy_gives_the_authors_ids_for_both_templates(loaded):
    paper = format_prompt(QUESTION, "paper")
    card = format_prompt(QUESTION, "llava-1.5")
    legacy = llava_tokenizer(loaded, "legacy")
    assert prepend_scheme(loaded) == "first" and prepend_scheme(legacy) == "always"
    assert _ids(legacy, paper)[:4] == PAPER_LEGACY
    assert _ids(legacy, card)[:8] == CARD_LEGACY
    assert _ids(loaded, paper)[:3] == PAPER_CHECKPOINT
    assert _ids(loaded, card)[:7] == CARD_CHECKPOINT
    assert llava_tokenizer(loaded, "checkpoint") is loaded
    # the only difference is that one token: the question's own ids are the same
    for text in (paper, card):
        with_space, without = _ids(legacy, text), _ids(loaded, text)
        at = with_space.index(32000) + 1
        assert with_space[at] == 29871 and with_space[:at] + with_space[at + 1 :] == without
    # the loaded tokenizer is left as it was
    assert _ids(loaded, paper)[:3] == PAPER_CHECKPOINT


def test_legacy_equals_transformers_own_legacy_flag(checkpoint_folder, loaded):
    """An independent route to the same ids: transformers' ``legacy=True`` at load time."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(checkpoint_folder, legacy=True)
    legacy = llava_tokenizer(loaded, "legacy")
    texts = [
        format_prompt(QUESTION, "paper"),
        format_prompt(QUESTION, "llava-1.5"),
        "USER: <image>\nHi? ASSISTANT: A cat.</s>USER: And? ASSISTANT:",
        "<image><image>\nUSER: two images' tokens\nASSISTANT:",
        "no special token at all",
    ]
    for text in texts:
        assert _ids(legacy, text) == _ids(reference, text), text
        # decoding is the same under both
        assert legacy.decode(_ids(legacy, text)) == loaded.decode(_ids(legacy, text))


def test_legacy_needs_a_sentencepiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", vocab={"<unk>": 0, "a": 1}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    byte_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert prepend_scheme(byte_level) is None
    assert llava_tokenizer(byte_level, "checkpoint") is byte_level
    with pytest.raises(TokenizationError, match="no SentencePiece Metaspace"):
        llava_tokenizer(byte_level, "legacy")
    with pytest.raises(TokenizationError, match="unknown tokenization 'always'"):
        llava_tokenizer(byte_level, "always")


@pytest.fixture(scope="module")
def replica_joint(tiny_joint, loaded):
    """The tiny J with a LLaVA whose vocabulary and image token are LLaVA-1.5's (32064, 32000)
    and the LLaVA-1.5-style tokenizer."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_llava_config(vocab_size=32064, image_token_id=32000, pad_token_id=32001)
    llava = LlavaForConditionalGeneration(config).eval()
    return JointModel(
        tiny_joint.owl,
        llava,
        tiny_joint.alignment,
        tokenizer=loaded,
        owl_tokenizer=tiny_joint.owl_tokenizer,
    )


def test_joint_prompts_by_tokenization(replica_joint, sample_images):
    model = replica_joint
    n = model.num_image_tokens
    image = [1] + [32000] * n
    legacy = model.prompt_inputs(QUESTION, "paper", tokenization="legacy")["input_ids"][0]
    assert legacy[: n + 3].tolist() == [*image, 29871, 13]
    default = model.prompt_inputs(QUESTION, "paper")["input_ids"][0]  # interactive: checkpoint
    assert default[: n + 2].tolist() == [*image, 13]
    card = model.prompt_inputs(QUESTION, "llava-1.5", tokenization="legacy")["input_ids"][0]
    assert card[: n + 7].tolist() == [1, 3148, 1001, 29901, 29871] + [32000] * n + [29871, 13]
    emb = model.embed(sample_images[0])
    answer = model.generate(
        emb, QUESTION, max_new_tokens=2, template="paper", tokenization="legacy"
    )[0]
    assert answer.prompt_ids.tolist() == legacy.tolist()
    assert (answer.template, answer.tokenization) == ("paper", "legacy")
    assert model.generate(emb, QUESTION, max_new_tokens=1)[0].tokenization == "checkpoint"
    with pytest.raises(JointModelError, match="unknown tokenization 'first'"):
        model.prompt_inputs(QUESTION, tokenization="first")


def test_reply_is_the_text_the_authors_split_off(replica_joint, loaded):
    """``JointAnswer.reply``: ``decode(prompt + answer).split("ASSISTANT: ")[1]`` raw; ``text``
    is stripped. An answer without a leading space has no reply (their ``[1]`` fails)."""
    model = replica_joint
    prompt = model.prompt_inputs(QUESTION, "paper", tokenization="legacy")["input_ids"][0]
    space, yes = 29871, loaded("Yes", add_special_tokens=False).input_ids[1:]  # drop "▁"
    newline, eos = 13, loaded.eos_token_id
    cases = {
        (space, *yes, eos): ("Yes", "Yes"),
        (space, space, *yes, eos): ("Yes", " Yes"),
        (space, *yes, newline, eos): ("Yes", "Yes\n"),
        (*yes, eos): ("Yes", None),
    }
    for ids, (text, reply) in cases.items():
        answer = model.decode_answer(torch.tensor(ids), prompt, "q", template="paper")
        assert (answer.text, answer.reply) == (text, reply), ids
        full = loaded.decode(
            torch.cat([prompt, torch.tensor(ids)]),
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        parts = full.split("ASSISTANT: ")
        assert (parts[1] if len(parts) > 1 else None) == reply


@pytest.mark.parametrize("name", ["jmllm.joint.chat.tokenization", "jmllm.joint.chat.templates"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
