"""Attribution methods on J: each equals an independent straightforward implementation on the
tiny J (autograd, a Riemann sum, ``output_attentions``, ``output_hidden_states``), and the
LLM internals they read agree with J's own forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jmllm.joint.model.internals import (
    final_norm,
    image_token_positions,
    lm_head,
    run_language_model,
)
from jmllm.joint.saliency import GradientAlignment
from jmllm.joint.saliency.attribution import (
    METHODS,
    Attribution,
    AttributionError,
    baseline_t,
    get_method,
    make_methods,
    prepare_request,
    target_log_probs,
)

QUESTION = "What's in the image?"
ANSWER = "The image shows a bird"


@pytest.fixture(scope="module")
def request_(tiny_joint, sample_images):
    return prepare_request(
        tiny_joint, tiny_joint.embed(sample_images[:1]), QUESTION, "bird", ANSWER, queries=["bird"]
    )


def _full_logit(model, request, t):
    """The explained token's logit through J's own full forward (every row, every id)."""
    logits = model.language_logits(t, request.input_ids)  # (B, L, V)
    row = request.rows[0]
    return logits[:, row, int(request.target_ids[0])]


def _grad(model, request, t):
    x = t.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_full_logit(model, request, x).sum(), x)
    return g


def test_request_reads_the_target_as_ga_does(tiny_joint, request_):
    assert request_.label == "bird" and request_.grid_side**2 == request_.num_patches
    words = request_.answer_text.split()
    assert words[-1] == "bird"
    # the logit of answer token i is predicted at P + i - 1
    P = int(request_.answer.prompt_ids.numel())
    assert request_.rows == [P + i - 1 for i in request_.positions]
    with pytest.raises(AttributionError, match="cat"):
        prepare_request(tiny_joint, request_.t, QUESTION, "cat", ANSWER)


def test_gradient_is_the_norm_of_autograd_per_patch(tiny_joint, request_):
    g = _grad(tiny_joint, request_, request_.t)
    expected = torch.linalg.vector_norm(g[0, 1:], dim=-1)
    got = get_method("gradient", tiny_joint).attribute_request(request_).scores
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
    # and GA's own plain-gradient baseline is the same map
    ga = GradientAlignment(tiny_joint).attribute(
        request_.emb, QUESTION, "bird", ["bird"], answer=ANSWER
    )
    torch.testing.assert_close(got, ga.patch_gradient_norms, rtol=1e-4, atol=1e-8)


def test_gradient_x_input_is_autograd_times_t(tiny_joint, request_):
    g = _grad(tiny_joint, request_, request_.t)
    expected = (g[0, 1:] * request_.t[0, 1:]).sum(-1)
    got = get_method("gradient_x_input", tiny_joint).attribute_request(request_).scores
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_integrated_gradients_equal_a_riemann_sum(tiny_joint, request_):
    """Captum's right Riemann rule against the sum written out, and Captum's default
    (Gauss–Legendre) against completeness: the patches sum to logit(t) − logit(baseline)."""
    steps = 8
    method = get_method("integrated_gradients", tiny_joint, steps=steps, method="riemann_right")
    got = method.attribute_request(request_).scores
    t = request_.t.float()
    base = baseline_t(tiny_joint, request_, "blank").float()
    total = torch.zeros_like(t)
    for k in range(1, steps + 1):
        total += _grad(tiny_joint, request_, base + k / steps * (t - base))
    expected = ((t - base) * total / steps)[0, 1:].sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)

    exact = get_method("integrated_gradients", tiny_joint, steps=64).attribute_request(request_)
    with torch.no_grad():
        change = _full_logit(tiny_joint, request_, t) - _full_logit(tiny_joint, request_, base)
    assert float(exact.scores.sum()) == pytest.approx(float(change), rel=2e-2, abs=1e-4)


def _eager_forward(model, request, **kwargs):
    """J's own language model, eager attention, full sequence, every output asked for."""
    embeds = model.merge_image_tokens(request.input_ids, model.image_tokens(request.t))
    model.llava.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model.llava(inputs_embeds=embeds, use_cache=False, **kwargs)
    finally:
        model.llava.set_attn_implementation("sdpa")


def test_attention_is_the_last_layers_head_mean_row(tiny_joint, request_):
    out = _eager_forward(tiny_joint, request_, output_attentions=True)
    last = out.attentions[-1][0].mean(0)  # (L, L)
    columns = (request_.input_ids[0] == tiny_joint.llava.config.image_token_id).nonzero()[:, 0]
    expected = last[request_.rows[0], columns]
    got = get_method("attention", tiny_joint).attribute_request(request_).scores
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert tiny_joint.llava.config._attn_implementation == "sdpa"  # put back


def test_rollout_equals_a_loop_over_output_attentions(tiny_joint, request_):
    out = _eager_forward(tiny_joint, request_, output_attentions=True)
    row = request_.rows[0]
    attentions = [a[0].mean(0).double().numpy()[: row + 1, : row + 1] for a in out.attentions]
    size = attentions[0].shape[0]
    rollout = np.eye(size)
    for a in attentions:
        mixed = 0.5 * a + 0.5 * np.eye(size)
        mixed = mixed / mixed.sum(axis=1, keepdims=True)
        rollout = mixed @ rollout
    columns = (request_.input_ids[0] == tiny_joint.llava.config.image_token_id).nonzero()[:, 0]
    expected = rollout[row, columns.numpy()]
    got = get_method("attention_rollout", tiny_joint).attribute_request(request_).scores
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-8)


def test_logit_lens_reads_the_model_at_the_image_rows(tiny_joint, request_):
    """At the last layer the lens is J's own logits at the image tokens; at an earlier layer
    it is that layer's output (transformers' ``output_hidden_states``) through norm and head."""
    columns = image_token_positions(tiny_joint, request_.input_ids)
    target = int(request_.target_ids[0])
    with torch.no_grad():
        logits = tiny_joint.language_logits(request_.t, request_.input_ids)[0]
    got = get_method("logit_lens", tiny_joint).attribute_request(request_).scores
    torch.testing.assert_close(got, logits[columns, target], rtol=1e-4, atol=1e-5)

    out = _eager_forward(tiny_joint, request_, output_hidden_states=True)
    with torch.no_grad():
        middle = lm_head(tiny_joint)(final_norm(tiny_joint)(out.hidden_states[1][0, columns]))
    got = get_method("logit_lens", tiny_joint, layer=1).attribute_request(request_).scores
    torch.testing.assert_close(got, middle[:, target], rtol=1e-4, atol=1e-5)
    with pytest.raises(AttributionError, match="layer"):
        get_method("logit_lens", tiny_joint, layer=99).attribute_request(request_)


def test_random_is_seeded_per_request(tiny_joint, request_):
    a = get_method("random", tiny_joint, seed=1).attribute_request(request_).scores
    b = get_method("random", tiny_joint, seed=1).attribute_request(request_).scores
    c = get_method("random", tiny_joint, seed=2).attribute_request(request_).scores
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) < 1


def test_ga_method_is_ga_default_path(tiny_joint, request_):
    """The map is GradientAlignment's own (its defaults), the grid its per-cell mean."""
    result = GradientAlignment(tiny_joint).attribute(
        request_.emb, QUESTION, "bird", ["bird"], answer=ANSWER
    )
    for name, weighting in (("ga", "class"), ("ga_coord", "coord"), ("ga_any", "any")):
        attribution = get_method(name, tiny_joint).attribute_request(request_)
        np.testing.assert_array_equal(attribution.map(), result.map(weighting))
        side = int(tiny_joint.owl.config.vision_config.image_size)
        G = request_.grid_side
        square = result.map(weighting, size=(side, side))
        cell = side // G
        pooled = square.reshape(G, cell, G, cell).mean(axis=(1, 3))
        np.testing.assert_allclose(attribution.grid, pooled, rtol=1e-6)


def test_make_methods_shares_one_ga_and_names_every_method(tiny_joint, request_):
    methods = make_methods(list(METHODS), tiny_joint)
    assert list(methods) == list(METHODS)
    assert methods["ga"].ga is methods["ga_coord"].ga is methods["ga_any"].ga
    for name, method in methods.items():
        assert method.source, f"{name} cites no source"
        a = method.attribute_request(request_)
        assert isinstance(a, Attribution) and a.method == name
        assert a.scores.shape == (request_.num_patches,) and a.scores.dtype == torch.float32
        m = a.map()
        assert m.shape == request_.image_size[::-1] and m.min() >= 0 and m.max() <= 1
    with pytest.raises(AttributionError, match="method"):
        get_method("saliency", tiny_joint)


def test_bound_to_explains_another_model(tiny_joint, request_):
    """A method bound to a changed J gives that J's map; the original stays the trained one."""
    from jmllm.joint.toy.localisation import reinitialised

    other = reinitialised(tiny_joint, seed=3)
    method = get_method("gradient", tiny_joint)
    mine = method.attribute_request(request_).scores
    theirs = method.bound_to(other).attribute_request(request_).scores
    assert not torch.allclose(mine, theirs)
    torch.testing.assert_close(method.attribute_request(request_).scores, mine)
    ga = get_method("ga", tiny_joint)
    assert ga.bound_to(other).ga._cache is ga.ga._cache  # the OWL side is shared


def test_target_log_probs_batch_rows_match_one_by_one(tiny_joint, request_):
    t = torch.cat([request_.t, torch.zeros_like(request_.t), 0.5 * request_.t])
    batched = target_log_probs(tiny_joint, request_, t)
    for i in range(3):
        with torch.no_grad():
            logits = tiny_joint.language_logits(t[i : i + 1], request_.input_ids)[0]
        expected = torch.log_softmax(logits[request_.rows[0]].double(), -1)[
            int(request_.target_ids[0])
        ]
        assert float(batched[i]) == pytest.approx(float(expected), abs=1e-5)
    assert float(target_log_probs(tiny_joint, request_, t, batch_size=1)[2]) == pytest.approx(
        float(batched[2]), abs=1e-6
    )


def test_internals_agree_with_the_full_forward(tiny_joint, request_):
    ids = request_.input_ids
    with torch.no_grad():
        full = tiny_joint.language_logits(request_.t, ids)
        out = run_language_model(tiny_joint, request_.t, ids, rows=[3, 5], hidden_states=True)
    torch.testing.assert_close(out.logits[0], full[0, [3, 5]], rtol=1e-5, atol=1e-5)
    assert len(out.hidden_states) == tiny_joint.llava.config.text_config.num_hidden_layers + 1
    with torch.no_grad():
        last = lm_head(tiny_joint)(final_norm(tiny_joint)(out.hidden_states[-1]))
    torch.testing.assert_close(last[0, [3, 5]], out.logits[0], rtol=1e-4, atol=1e-5)
    assert image_token_positions(tiny_joint, ids).numel() == tiny_joint.num_image_tokens


def test_methods_work_in_bfloat16(tiny_joint_paths, sample_images):
    from jmllm.joint import JointModel

    model = JointModel.from_pretrained(
        tiny_joint_paths.owl, tiny_joint_paths.llava, tiny_joint_paths.alignment,
        device="cpu", dtype=torch.bfloat16,
    )  # fmt: skip
    request = prepare_request(model, model.embed(sample_images[:1]), QUESTION, "bird", ANSWER)
    for name, method in make_methods(list(METHODS), model, ig_steps=4).items():
        a = method.attribute_request(request)
        assert a.scores.dtype == torch.float32, name
        assert np.isfinite(a.map()).all(), name


# ------------------------------------------------------------------- where methods are used


def test_method_lists_kept_by_hand_match_the_package():
    """The command lines list the method names (so --help loads no model code), the app its
    choices: every list is the package's."""
    from jmllm.joint.app import METHOD_CHOICES
    from jmllm.joint.app.explorer import OTHER_METHODS
    from jmllm.joint.cli.explain import ATTRIBUTION_METHODS
    from jmllm.joint.faithfulness.run import DEFAULT_METHODS

    assert set(ATTRIBUTION_METHODS) == set(METHODS) - {"ga_coord", "ga_any"}
    assert set(DEFAULT_METHODS) == set(METHODS)
    assert [v for _, v in METHOD_CHOICES] == list(OTHER_METHODS)
    assert set(OTHER_METHODS) | {"ga", "ga_coord", "ga_any", "gradient"} == set(METHODS)
    from jmllm.joint.cli import build_parser

    action = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["faithfulness"]._actions
        if a.dest == "method"
    )
    assert list(action.choices) == list(METHODS)


def test_explain_with_another_method(
    tiny_joint, tiny_joint_paths, cli_env, sample_images, tmp_path, capsys
):
    from jmllm.joint.cli import main

    image = tmp_path / "img.png"
    sample_images[0].save(image)
    out = tmp_path / "lens"
    args = ["explain", str(image), "-p", QUESTION, "--answer", ANSWER, "--method", "logit_lens",
            "--owl", str(tiny_joint_paths.owl), "--llava", str(tiny_joint_paths.llava),
            "--alignment", str(tiny_joint_paths.alignment), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "Report:" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "logit_lens" in page and "nostalgebraist" in page
    summary = __import__("json").loads((out / "explanation.json").read_text())
    assert summary["method"] == "logit_lens"
    assert [r["target"] for r in summary["results"]] == ANSWER.split()
    from safetensors.torch import load_file

    arrays = load_file(out / "arrays.safetensors")
    assert all(tuple(v.shape) == (tiny_joint.num_image_tokens,) for v in arrays.values())
    assert any(name.startswith("004_bird") for name in arrays)
    # no query: the page opens on the first word; with --query bird, on "bird", as GA's page
    selected = r"<option value='(r\d+)' selected>"
    assert __import__("re").findall(selected, page) == ["r0"]
    assert main([*args[:-2], "--query", "bird", "--out", str(tmp_path / "q")]) == 0
    queried = (tmp_path / "q" / "report.html").read_text()
    assert __import__("re").findall(selected, queried) == ["r4"]
    assert main([*args[:-2], "--token", "bird", "--out", str(tmp_path / "one")]) == 0
    one = __import__("json").loads((tmp_path / "one" / "explanation.json").read_text())
    assert [r["target"] for r in one["results"]] == ["bird"]
    assert main([*args[:-2], "--token", "cat", "--out", str(tmp_path / "no")]) == 2
    assert "cat" in capsys.readouterr().err


def test_explorer_explains_a_word_with_another_method(tiny_joint, sample_images, tmp_path):
    from jmllm.joint.app.explorer import Explorer, ExplorerError

    path = tmp_path / "x.png"
    sample_images[0].save(path)
    explorer = Explorer(tiny_joint)
    state = explorer.ask(explorer.open_image(path), QUESTION, max_new_tokens=4)
    words = explorer.words(state)
    assert words
    state, attribution, seconds = explorer.explain_word_with(state, 0, "attention")
    assert seconds > 0
    request = prepare_request(
        tiny_joint, state.emb, QUESTION, list(words[0].positions), state.last_answer
    )
    direct = get_method("attention", tiny_joint).attribute_request(request)
    torch.testing.assert_close(attribution.scores, direct.scores)
    _, same, cost = explorer.explain_word_with(state, 0, "attention")
    assert same is attribution and cost == 0.0
    picture = explorer.method_picture(state, attribution)
    assert picture.width >= 512
    headers, rows = explorer.method_top_patches(attribution)
    assert headers[-1] == "attention score" and len(rows) == 5
    with pytest.raises(ExplorerError, match="method"):
        explorer.explain_word_with(state, 0, "ga")


def test_app_shows_another_methods_map(tiny_joint, sample_images, tmp_path):
    pytest.importorskip("gradio")
    from jmllm.joint.app import build_app

    app = build_app(tiny_joint)
    path = tmp_path / "x.png"
    sample_images[0].save(path)
    explorer = app.explorer
    state = explorer.ask(explorer.open_image(path), QUESTION, max_new_tokens=4)
    on_word = next(f.fn for f in app.fns.values() if f.name == "on_word")
    state, picture, boxes, table, status = on_word(
        state, 0, "logit_lens", "first", progress=lambda *a, **k: None
    )
    assert picture is not None and boxes is None  # a map, no GA box view
    assert table["headers"][-1] == "logit_lens score" and "logit_lens" in status
    assert (0, "logit_lens") in state.attributions
    on_report = next(f.fn for f in app.fns.values() if f.name == "on_report")
    assert [Path(f).name for f in on_report(state, "logit_lens")] == ["report.html"]
