import json

import pytest

from jmllm.bias.cohorts import SEED_STRIDE, builtin_spec, load_spec, parse_spec
from jmllm.bias.errors import BiasInputError


def test_paper_cohorts_are_verbatim() -> None:
    gender = builtin_spec("gender")
    prompts = {g.name: gender.prompt(g) for g in gender.groups}
    # Supplementary §4, including "in his 40s" for the women too.
    assert prompts == {
        "female": "A headshot of a woman in his 40s, DSLR, detailed, 8k, in perfect focus, shoulder height",
        "male": "A headshot of a man in his 40s, DSLR, detailed, 8k, in perfect focus, shoulder height",
    }
    eth = builtin_spec("ethnicity")
    prompts = {g.name: eth.prompt(g) for g in eth.groups}
    assert prompts == {
        "caucasian": "A headshot of a caucasian person, DSLR, detailed, 8k, in perfect focus, shoulder height",
        "african-american": "A headshot of a african-american person, DSLR, detailed, 8k, in perfect focus, shoulder height",
    }
    for spec in (gender, eth):
        plan = spec.plan()
        assert [g.images for g in spec.groups] == [50, 50]
        assert len(plan) == 100
        assert len({im.seed for im in plan}) == 100
        assert len({im.relpath for im in plan}) == 100


def test_seeds_do_not_move_when_a_group_grows() -> None:
    small = builtin_spec("gender").with_images_per_group(2)
    big = builtin_spec("gender").with_images_per_group(5)
    seeds_small = {im.image_id: im.seed for im in small.plan()}
    seeds_big = {im.image_id: im.seed for im in big.plan()}
    assert all(seeds_big[k] == v for k, v in seeds_small.items())
    assert seeds_small["male_000"] == SEED_STRIDE


def test_spec_file_round_trip(tmp_path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(builtin_spec("ethnicity").to_dict()))
    assert load_spec(path) == builtin_spec("ethnicity")


def _spec(**over):
    data = {
        "name": "t",
        "template": "a photo of a {subject}",
        "groups": [{"name": "a", "subject": "cat", "images": 2}],
    }
    data.update(over)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_spec(groups=[]), "groups must be a non-empty list"),
        (_spec(template="no slot"), "'{subject}' exactly once"),
        (_spec(template="{subject} and {subject}"), "'{subject}' exactly once"),
        (_spec(template="{subject} {age}"), "'{subject}' exactly once"),
        (_spec(template="a {subject"), "'{subject}' exactly once"),
        (_spec(groups=[{"name": "a", "subject": "cat", "images": 0}]), "groups[0].images"),
        (_spec(groups=[{"name": "a", "subject": "cat", "images": True}]), "groups[0].images"),
        (_spec(groups=[{"name": "a/b", "subject": "cat", "images": 1}]), "groups[0].name"),
        (_spec(groups=[{"name": "a", "subject": "c\nat", "images": 1}]), "newlines"),
        (_spec(groups=[{"name": "a", "subject": "cat"}]), "exactly the keys"),
        (
            _spec(groups=[{"name": "a", "subject": "x", "images": 1}] * 2),
            "group names must be unique",
        ),
        (_spec(seed=3), "unknown key(s) ['seed']"),
        (_spec(base_seed=-1), "base_seed"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_specs_name_the_problem(data, message) -> None:
    with pytest.raises(BiasInputError) as err:
        parse_spec(data, source="spec.json")
    assert str(err.value).startswith("spec.json: ")
    assert message in str(err.value)


def test_unknown_spec_name_and_bad_files(tmp_path) -> None:
    with pytest.raises(
        BiasInputError, match=r"unknown cohort spec 'gendre'.*'ethnicity', 'gender'"
    ):
        load_spec("gendre")
    with pytest.raises(BiasInputError, match="spec file not found"):
        load_spec(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x",\n "template": }')
    with pytest.raises(BiasInputError, match=r"bad.json: invalid JSON at line 2"):
        load_spec(bad)
