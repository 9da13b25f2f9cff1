from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from jmllm.judge.captions import (
    captions_from_ground_truth,
    captions_from_joint,
    captions_from_jsonl,
    load_captions,
    save_captions,
)
from jmllm.judge.errors import JudgeError
from jmllm.judge.manifest import Manifest
from jmllm.judge.prompts import CAPTION_PROMPT

TRICKY = 'A "quoted" <b>bold</b> caption | with a pipe,\nsecond line & {braces} <caption>'


def test_ground_truth_is_a_system(manifest: Manifest, tmp_path: Path) -> None:
    gt = captions_from_ground_truth(manifest)
    assert gt.system == "COCO GT"
    assert gt.captions == {im.image_id: im.ground_truth for im in manifest.images}
    path = save_captions(tmp_path / "gt.jsonl", gt, manifest)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["image_id"] for line in lines] == [im.image_id for im in manifest.images]
    assert all(line["prompt"] == CAPTION_PROMPT for line in lines)


def test_jsonl_from_any_system_by_id_or_file_name(manifest: Manifest, tmp_path: Path) -> None:
    source = tmp_path / "theirs.jsonl"
    rows = []
    for i, image in enumerate(manifest.images):
        caption = TRICKY if i == 0 else f"caption {i}"
        if i % 2:
            rows.append({"image_id": int(image.image_id), "answer": caption})
        else:
            assert image.path is not None
            rows.append({"image": f"/elsewhere/{image.path.name}", "answer": caption})
    rows.append({"image_id": "999999", "answer": "not in the manifest"})
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    captions = captions_from_jsonl(manifest, source, "Theirs", caption_field="answer")
    assert captions.captions[manifest.images[0].image_id] == TRICKY.strip()
    assert len(captions.captions) == len(manifest)

    path = save_captions(tmp_path / "theirs-captions.jsonl", captions, manifest)
    loaded = load_captions(path)
    assert loaded.system == "Theirs" and loaded.captions == captions.captions


def test_jsonl_problems_are_named(manifest: Manifest, tmp_path: Path) -> None:
    source = tmp_path / "partial.jsonl"
    source.write_text(json.dumps({"image_id": manifest.images[0].image_id, "caption": "x"}) + "\n")
    with pytest.raises(
        JudgeError, match=f"no caption for {len(manifest) - 1} of the {len(manifest)}"
    ):
        captions_from_jsonl(manifest, source, "S")
    source.write_text("{broken\n")
    with pytest.raises(JudgeError, match=r"partial.jsonl:1: not valid JSON"):
        captions_from_jsonl(manifest, source, "S")
    image_id = manifest.images[0].image_id
    source.write_text(
        json.dumps({"image_id": image_id, "caption": "a"})
        + "\n"
        + json.dumps({"image_id": image_id, "caption": "b"})
    )
    with pytest.raises(JudgeError, match="has two captions"):
        captions_from_jsonl(manifest, source, "S")


def test_joint_extra_missing_gives_a_clear_error(
    manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "jmllm.joint", None)  # as if jmllm-joint were not installed
    with pytest.raises(JudgeError, match=r"pip install 'jmllm-judge\[joint\]'"):
        captions_from_joint(manifest, "J", alignment="w.safetensors")


def test_joint_adapter_loads_once_and_batches(
    manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call shape, without torch: a stand-in JointModel records what it is asked."""
    calls: list[dict[str, Any]] = []

    class StandInError(ValueError):
        pass

    class StandInModel:
        dtype = "torch.float32"

        @classmethod
        def from_pretrained(cls, **kwargs: Any) -> StandInModel:
            calls.append({"from_pretrained": kwargs})
            return cls()

        def embed(self, images: list[str], preprocessing: str = "exif") -> Any:
            return types.SimpleNamespace(images=images, preprocessing=preprocessing)

        def generate(self, emb: Any, prompts: list[str], **kwargs: Any) -> list[Any]:
            images = emb.images
            calls.append(
                {"images": images, "prompts": prompts, "preprocessing": emb.preprocessing, **kwargs}
            )
            if kwargs["max_new_tokens"] == 0:
                raise StandInError("max_new_tokens: must be a positive integer")
            return [
                types.SimpleNamespace(text=f"  answer {len(calls)}-{i} ")
                for i in range(len(images))
            ]

    joint = types.SimpleNamespace(
        JointModel=StandInModel, JointModelError=StandInError, PromptError=StandInError
    )
    monkeypatch.setitem(sys.modules, "jmllm.joint", joint)
    j = captions_from_joint(
        manifest, "J", owl="owl-dir", llava="llava-dir", alignment="w.safetensors", batch_size=3
    )
    assert calls[0] == {
        "from_pretrained": {"owl": "owl-dir", "llava": "llava-dir", "alignment": "w.safetensors"}
    }
    assert [len(c["images"]) for c in calls[1:]] == [3, 3, 2]  # 8 images, one model load
    assert calls[1]["images"] == [str(im.path) for im in manifest.images[:3]]
    assert all(c["prompts"] == [CAPTION_PROMPT] * len(c["images"]) for c in calls[1:])
    assert all(c["vision"] == "joint" for c in calls[1:])
    assert all(c["template"] == "paper" for c in calls[1:])  # the authors' template (Table 1)
    # ... their token ids and their pixels
    assert all(c["tokenization"] == "legacy" for c in calls[1:])
    assert all(c["preprocessing"] == "authors" for c in calls[1:])
    assert j.origin["template"] == "paper"
    assert (j.origin["tokenization"], j.origin["preprocessing"]) == ("legacy", "authors")
    assert j.origin["dtype"] == "float32"
    assert j.captions[manifest.images[0].image_id] == "answer 2-0"

    calls.clear()
    captions_from_joint(manifest, "LLaVA", alignment="w", vision="llava", max_new_tokens=7)
    assert calls[0] == {"from_pretrained": {"alignment": "w"}}  # jmllm-joint's default models
    assert calls[1]["vision"] == "llava" and calls[1]["max_new_tokens"] == 7
    assert calls[1]["template"] == "paper"
    calls.clear()
    captions_from_joint(
        manifest,
        "J",
        alignment="w",
        template="llava-1.5",
        tokenization="checkpoint",
        preprocessing="exif",
    )
    assert all(c["template"] == "llava-1.5" for c in calls[1:])
    assert all(c["tokenization"] == "checkpoint" for c in calls[1:])
    assert all(c["preprocessing"] == "exif" for c in calls[1:])
    with pytest.raises(JudgeError, match="jmllm-joint: max_new_tokens"):
        captions_from_joint(manifest, "J", alignment="w", max_new_tokens=0)


@pytest.mark.slow
def test_captions_from_a_real_tiny_joint_model(
    manifest: Manifest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """J and stock LLaVA through jmllm-joint itself, on its tiny offline checkpoints."""
    pytest.importorskip("jmllm.joint")
    from jmllm.joint.testing import build_tiny_joint

    # the session's one tiny J, shared with the other packages' tests
    tiny = build_tiny_joint(tmp_path_factory.getbasetemp() / "jmllm-cache" / "tiny")
    small = Manifest(manifest.images[:3], seed=0)
    sources = {"owl": str(tiny.owl), "llava": str(tiny.llava), "alignment": str(tiny.alignment)}
    from jmllm.joint import JointModel

    loaded = JointModel.from_pretrained(
        **sources
    )  # the call the CLI's --owl/--mllm/--alignment make
    from jmllm.joint.testing import record_prompts

    tokenizations: list[str] = []
    with record_prompts(tokenizations) as sent:
        j = captions_from_joint(small, "J", max_new_tokens=6, batch_size=2, model=loaded)
        llava = captions_from_joint(small, "LLaVA", vision="llava", max_new_tokens=6, model=loaded)
    # J and stock LLaVA both prompted as the authors' caption script, verbatim, their token ids
    assert sent == ["<image>\nUSER: What's the content of the image?\nASSISTANT:"] * 6
    assert tokenizations == ["legacy"] * 6
    assert (j.origin["preprocessing"], j.origin["dtype"]) == ("authors", "float32")
    for system in (j, llava):
        assert set(system.captions) == {im.image_id for im in small.images}
        assert all(isinstance(c, str) for c in system.captions.values())
    path = save_captions(tmp_path / "j.jsonl", j, small)
    assert load_captions(path).captions == j.captions


def test_joint_needs_local_images(coco_file: Path) -> None:
    from jmllm.judge.manifest import sample_coco

    remote = sample_coco(coco_file, 2)
    with pytest.raises(JudgeError, match="need local images"):
        captions_from_joint(remote, "J")


def test_captions_with_the_built_in_models(tmp_path: Path) -> None:
    """``captions --joint --tiny``: the toy world captions toy scenes (sample data), offline."""
    pytest.importorskip("jmllm.joint")
    from jmllm.joint.toy.sample_data import write_sample_data
    from jmllm.judge.cli import main

    data = write_sample_data(tmp_path / "data", count=4, wsol_count=1)
    manifest = tmp_path / "manifest.json"
    argv = ["sample", "--coco", str(data / "coco" / "captions.json")]
    assert (
        main([*argv, "--images", str(data / "coco" / "images"), "-n", "4", "-o", str(manifest)])
        == 0
    )
    out = tmp_path / "j.jsonl"
    argv = ["captions", "--manifest", str(manifest), "--system", "J", "--joint", "--tiny"]
    assert main([*argv, "--template", "llava-1.5", "-o", str(out)]) == 0
    truth = {
        str(a["image_id"]): a["caption"]
        for a in json.loads((data / "coco" / "captions.json").read_text())["annotations"]
    }
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4
    # the toy J names the scene's objects (as a set: the toy metric) in most captions
    from jmllm.joint.toy.scenes import caption_objects

    same = [
        caption_objects(line["caption"]) == caption_objects(truth[line["image_id"]])
        for line in lines
    ]
    assert sum(same) >= 3


def test_captions_load_the_model_on_the_device_and_dtype_asked(tmp_path: Path, monkeypatch) -> None:
    """``--device`` and ``--dtype``, as every command that loads a model has them."""
    joint_cli = pytest.importorskip("jmllm.joint.cli")
    from jmllm.joint.toy.sample_data import write_sample_data
    from jmllm.judge.cli import main

    loaded = []
    real = joint_cli.load_builtin_model

    def spy(**kwargs):  # type: ignore[no-untyped-def]
        loaded.append(real(**kwargs))
        return loaded[-1]

    monkeypatch.setattr(joint_cli, "load_builtin_model", spy)
    data = write_sample_data(tmp_path / "data", count=1, wsol_count=1)
    manifest = tmp_path / "manifest.json"
    argv = ["sample", "--coco", str(data / "coco" / "captions.json"), "-n", "1"]
    assert main([*argv, "--images", str(data / "coco" / "images"), "-o", str(manifest)]) == 0
    argv = ["captions", "--manifest", str(manifest), "--system", "J", "--joint", "--tiny"]
    argv += ["--device", "cpu", "--dtype", "bfloat16", "--max-new-tokens", "4"]
    assert main([*argv, "-o", str(tmp_path / "j.jsonl")]) == 0
    import torch

    assert loaded and loaded[0].dtype == torch.bfloat16 and loaded[0].device.type == "cpu"


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--tiny: only with --joint"),
        (["--joint", "--alignment", "w.safetensors"], "cannot be combined"),
    ],
)
def test_tiny_misuse_is_one_line(
    tmp_path: Path, manifest: Manifest, capsys, extra, message
) -> None:  # type: ignore[no-untyped-def]
    from jmllm.judge.cli import main

    path = manifest.save(tmp_path / "manifest.json")
    argv = [
        "captions",
        "--manifest",
        str(path),
        "--system",
        "J",
        "--tiny",
        "-o",
        str(tmp_path / "c.jsonl"),
    ]
    if not extra:
        argv.append("--ground-truth")
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_caption_choices_are_jmllm_joints_names() -> None:
    """``captions`` spells J's names out (jmllm-joint is an optional extra): they must match."""
    pytest.importorskip("jmllm.joint")
    import argparse

    from jmllm.align.preprocessing import PAPER_PREPROCESSING, PREPROCESSINGS
    from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION, TOKENIZATIONS
    from jmllm.judge.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {o: a for a in sub.choices["captions"]._actions for o in a.option_strings}
    tokenization, preprocessing = options["--tokenization"], options["--preprocessing"]
    assert (tuple(tokenization.choices), tokenization.default) == (
        TOKENIZATIONS,
        PAPER_TOKENIZATION,
    )
    assert set(preprocessing.choices) == set(PREPROCESSINGS)
    assert preprocessing.default == PAPER_PREPROCESSING


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_captions_from_every_mllm_family(
    manifest: Manifest, tmp_path_factory: pytest.TempPathFactory, family: str
) -> None:
    """J and the stock MLLM of any family caption the same images, prompted in the family's
    own chat format (LLaVA-1.5's is the test above)."""
    pytest.importorskip("jmllm.joint")
    from jmllm.joint.testing import record_prompts, tiny_family_joint_model

    model = tiny_family_joint_model(tmp_path_factory.getbasetemp() / "tiny-families", family)
    small = Manifest(manifest.images[:2], seed=0)
    with record_prompts() as sent:
        j = captions_from_joint(small, "J", max_new_tokens=4, batch_size=2, model=model)
        stock = captions_from_joint(small, "MLLM", vision="llava", max_new_tokens=4, model=model)
    assert len(sent) == 4 and all(CAPTION_PROMPT in text and "USER:" not in text for text in sent)
    for system in (j, stock):
        assert set(system.captions) == {im.image_id for im in small.images}
