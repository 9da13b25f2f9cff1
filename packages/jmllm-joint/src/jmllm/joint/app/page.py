"""``jmllm-joint app``: the interactive explorer, a local Gradio page over one loaded J.

Upload an image (or pick an example), chat with J (and stock LLaVA beside it; *New chat* starts
over on the same image), see the detections O^OWL makes from the same embedding for the objects
you type (or the object words of the answer), click any word of the answer for its GA map, box
view and top patches (or for its map by another attribution method of
:mod:`jmllm.joint.saliency.attribution`), check the answer for hallucinations, and download the
reports the command line writes.

The page is a thin layer: every step is a method of :class:`~jmllm.joint.app.explorer.Explorer`,
tested without a browser. :func:`build_app` lays the page out and wires its events; each browser
tab keeps its own :class:`~jmllm.joint.app.session.ExplorerState` in a ``gr.State``; every event
that touches the model shares one queue of concurrency 1 (and the explorer's lock), so two tabs
never run the model at once, and its failures are shown as a message in the page
(:func:`guarded`). :func:`~jmllm.joint.app.serving.launch` serves it offline (no analytics or
version check, no share link, system fonts, 127.0.0.1 unless another host is given, an upload
size limit); uploads and result files are deleted once they are
:data:`~jmllm.joint.app.serving.DELETE_CACHE` old, and a session keeps its image at the page's
size, never the upload (:data:`jmllm.joint.app.session.KEPT_SIDE`). What the widgets show
(choices, chat text, examples) is :mod:`jmllm.joint.app.widgets`'. Every name of those modules
the page used to define is importable from here, and from :mod:`jmllm.joint.app`.

Needs the ``app`` extra: ``pip install "jmllm-joint[app]"``.

Example:
    >>> from jmllm.joint.app.page import build_app, launch
    >>> app = build_app(model)  # doctest: +SKIP
    >>> launch(app, host="127.0.0.1", port=7860)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import html
import logging
import os
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
from jmllm.joint.app.explorer import (
    MAX_IMAGE_PIXELS,
    MAX_UPLOAD_BYTES,
    Explorer,
    ExplorerError,
    ExplorerState,
)
from jmllm.joint.app.serving import APP_CSS as APP_CSS
from jmllm.joint.app.serving import (
    APP_EXTRA_HINT,
    DELETE_CACHE,
    AppUnavailableError,
    _prune,
    launch,
    offline_theme,
    require_gradio,
)
from jmllm.joint.app.serving import MONO_FONTS as MONO_FONTS
from jmllm.joint.app.serving import QUEUE_SIZE as QUEUE_SIZE
from jmllm.joint.app.serving import SESSION_CAPACITY as SESSION_CAPACITY
from jmllm.joint.app.serving import SYSTEM_FONTS as SYSTEM_FONTS
from jmllm.joint.app.widgets import (
    HALLUCINATION_COLOURS,
    METHOD_CHOICES,
    SCROLL_TO_LATEST_JS,
    WEIGHTING_CHOICES,
    _md,
    builtin_examples,
    channel_choices,
    chat_messages,
    parse_channel,
)
from jmllm.joint.app.widgets import TOY_EXAMPLE_SCENES as TOY_EXAMPLE_SCENES
from jmllm.joint.chat.templates import CONVERSATION_TEMPLATES, INTERACTIVE_TEMPLATE
from jmllm.joint.chat.templates import Conversation as Conversation
from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION
from jmllm.joint.saliency.gradients import has_objectness

logger = logging.getLogger(__name__)

MODEL_QUEUE = "model"  # the one concurrency group of every event that runs the model


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def guarded(fn: Callable[..., Any], outputs: int) -> Callable[..., Any]:
    """An event handler whose failure becomes a message in the page, never a dead page.

    The user's mistakes show their one-line message, anything else its type and message (with
    the traceback in the server's log), as a notice; the event's ``outputs`` components are left
    as they were (``gr.skip()``). Raising ``gr.Error`` instead would put every output component
    of the event in an error state that covers it and blocks clicks on it (the question box,
    for one) until dismissed one by one.
    """
    from jmllm.joint.chat.templates import PromptError
    from jmllm.joint.model.joint import JointModelError
    from jmllm.joint.saliency import GAError

    gr = require_gradio()
    expected = (ExplorerError, PromptError, JointModelError, GAError)

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except expected as exc:
            message = _one_line(exc)
        except Exception as exc:  # a model failure must not kill the page
            logger.exception("explorer: %s failed", fn.__name__)
            message = f"{type(exc).__name__}: {_one_line(exc)}"
        gr.Warning(html.escape(message), duration=15, title="Not done")
        return gr.skip() if outputs == 1 else tuple(gr.skip() for _ in range(outputs))

    return handler


def build_app(
    model: Any,
    *,
    examples: Sequence[str | os.PathLike[str]] | None = None,
    notes: Sequence[str] = (),
    objects: Sequence[str] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_UPLOAD_BYTES,
    title: str = "jmllm explorer",
    tokenization: str = INTERACTIVE_TOKENIZATION,
    preprocessing: str = INTERACTIVE_PREPROCESSING,
    delete_cache: tuple[int, int] = DELETE_CACHE,
) -> Any:
    """The explorer page over one loaded J, as a ``gr.Blocks``.

    Args:
        model: a :class:`~jmllm.joint.JointModel` (or an :class:`~jmllm.joint.app.explorer.Explorer`
            built on one).
        examples: example image files (default
            :func:`~jmllm.joint.app.widgets.builtin_examples`).
        notes: short notices shown at the top (e.g. that the weights are random).
        objects: vocabulary of the answer's object words (default: COCO's 80 names).
        max_pixels: largest accepted image, in pixels (checked from the file's header).
        max_bytes: largest accepted upload, in bytes.
        title: page title.
        tokenization, preprocessing: how questions are tokenised and images embedded (see
            :class:`~jmllm.joint.app.explorer.Explorer`).
        delete_cache: Gradio's ``(frequency, age)`` in seconds: uploads and result files older
            than ``age`` are deleted every ``frequency`` seconds (and all of them when the
            server stops).

    Returns:
        The ``gr.Blocks``; serve it with :func:`~jmllm.joint.app.serving.launch`.

    Example:
        >>> app = build_app(model, notes=["toy-world models"])  # doctest: +SKIP
    """
    gr = require_gradio()
    explorer = (
        model
        if isinstance(model, Explorer)
        else Explorer(
            model,
            objects=objects,
            max_pixels=max_pixels,
            max_bytes=max_bytes,
            tokenization=tokenization,
            preprocessing=preprocessing,
        )
    )
    work = tempfile.TemporaryDirectory(prefix="jmllm-app-")
    if examples is None:
        examples = builtin_examples(Path(work.name) / "examples")
    model_event = {"concurrency_limit": 1, "concurrency_id": MODEL_QUEUE}

    def listen(
        triggers: Sequence[Any], fn: Callable[..., Any], inputs: Any, outputs: Any
    ) -> list[Any]:
        """``fn`` on every trigger, guarded, in the model's queue of one; the events."""
        handler = guarded(fn, len(outputs))
        return [trigger(handler, inputs, outputs, **model_event) for trigger in triggers]

    token_limit = explorer.max_new_tokens
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=delete_cache) as app:
        weakref.finalize(app, work.cleanup)
        app.explorer = explorer  # for tests and benchmarks: the page's own explorer
        state = gr.State(ExplorerState())
        gr.Markdown(
            f"# {html.escape(title)}\n"
            "Chat with **J** (OWL-ViT → W → LLaVA) about an image, see what OWL-ViT detects in "
            "the same embedding, and click any word of the answer for its Gradient Alignment "
            "(GA) map."
        )
        for note in notes:
            gr.Markdown(_md(note), elem_classes=["jm-note"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image", file_types=["image"], type="filepath", elem_id="jm-upload"
                )
                gr.Examples(
                    examples=[[str(p)] for p in examples],
                    inputs=[upload],
                    label="Example images",
                    examples_per_page=12,
                )
                image_notice = gr.Markdown(
                    visible=False, elem_classes=["jm-note"], elem_id="jm-image-notice"
                )
                picture = gr.Image(
                    label="Detections",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="jm-picture",
                )
                with gr.Row():
                    queries_box = gr.Textbox(
                        label="Objects to detect",
                        placeholder="comma-separated, e.g. circle, triangle (empty: the object "
                        "words of the answer)",
                        scale=3,
                        elem_id="jm-queries",
                    )
                    detect_button = gr.Button("Detect", scale=1, elem_id="jm-detect")
                threshold = gr.Slider(
                    0.01,
                    0.99,
                    value=0.1,
                    step=0.01,
                    label="Score threshold",
                    elem_id="jm-threshold",
                )
                detections_md = gr.Markdown(elem_id="jm-detections")
            with gr.Column(scale=1):
                with gr.Row():
                    # the answer's top stays in view: scrolled by SCROLL_TO_LATEST_JS
                    chat = gr.Chatbot(label="J", height=360, autoscroll=False, elem_id="jm-chat")
                    stock_chat = gr.Chatbot(
                        label="Stock LLaVA",
                        height=360,
                        autoscroll=False,
                        visible=False,
                        elem_id="jm-stock",
                    )
                with gr.Row():
                    question = gr.Textbox(
                        label="Question",
                        placeholder="What's in the image?",
                        scale=4,
                        elem_id="jm-question",
                    )
                    ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="jm-ask")
                    reset_button = gr.Button("New chat", scale=1, elem_id="jm-reset")
                with gr.Accordion("Chat options", open=False):
                    compare = gr.Checkbox(
                        label="Also answer with stock LLaVA (its own vision tower)",
                        value=False,
                        elem_id="jm-compare",
                    )
                    template = gr.Dropdown(
                        choices=list(CONVERSATION_TEMPLATES),
                        value=INTERACTIVE_TEMPLATE,
                        label="Conversation template",
                        elem_id="jm-template",
                    )
                    # bounded by what the language model's positions leave for an answer
                    max_new_tokens = gr.Slider(
                        1,
                        token_limit,
                        value=min(64, token_limit),
                        step=1,
                        label=f"Max new tokens (at most {token_limit}: the model's positions)",
                        elem_id="jm-max-tokens",
                    )
                words = gr.Radio(
                    choices=[],
                    label="Click a word of J's last answer to explain it",
                    elem_id="jm-words",
                )
        with gr.Group():
            with gr.Row():
                weighting = gr.Radio(
                    choices=[*WEIGHTING_CHOICES, *METHOD_CHOICES],
                    value="class",
                    label="Map: GA (class, coord, any), or another attribution method",
                    scale=2,
                    elem_id="jm-weighting",
                )
                channel = gr.Dropdown(
                    choices=channel_choices(()),
                    value="matching",
                    label="Class channel (class map, box thickness)",
                    scale=1,
                    elem_id="jm-channel",
                )
            ga_md = gr.Markdown(elem_id="jm-ga-status")
            with gr.Row(equal_height=False):
                map_image = gr.Image(
                    label="GA map", type="pil", format="png", interactive=False, elem_id="jm-map"
                )
                box_image = gr.Image(
                    label="Box view (thickness: class weight, colour: box-coordinate weight)",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="jm-boxes",
                )
            top_table = gr.Dataframe(label="Top patches", interactive=False, elem_id="jm-top")
        with gr.Accordion("Hallucination view", open=True, elem_id="jm-hallucination-view"):
            hallucination_button = gr.Button(
                "Check the last answer: mentioned vs detected", elem_id="jm-hallucination-button"
            )
            hallucination_text = gr.HighlightedText(
                label="Answer (green: detected, red: mentioned but not detected)",
                color_map=HALLUCINATION_COLOURS,
                show_legend=True,
                elem_id="jm-hallucination",
            )
            hallucination_table = gr.Dataframe(
                headers=["object", "mentioned", "score", "detected"],
                interactive=False,
                elem_id="jm-hallucination-table",
            )
        with gr.Row():
            report_button = gr.Button("Download report", elem_id="jm-report")
            report_files = gr.File(
                label="Reports: click a file to download it",
                file_count="multiple",
                interactive=False,
                elem_id="jm-files",
            )

        # ------------------------------------------------------------- helpers
        def detection_outputs(s: ExplorerState) -> tuple[Any, str]:
            detections = explorer.detect(s)
            queries = explorer.queries(s)
            if not queries:
                return explorer.detections_picture(s, None), (
                    "No objects to detect: type some above, or ask a question whose answer "
                    "names objects."
                )
            source = "typed" if s.typed_queries else "object words of the answer"
            found = detections.to_records() if detections is not None else []
            shown = ", ".join(f"{_md(r['label'])} {r['score']:.2f}" for r in found[:8])
            summary = (
                f"Queries ({source}): {', '.join('`' + q.replace('`', '') + '`' for q in queries)}"
                f" — {len(found)} boxes with score ≥ {s.threshold:g}"
                + (f": {shown}" if shown else "")
            )
            return explorer.detections_picture(s, detections), summary

        def word_choices(s: ExplorerState) -> Any:
            from jmllm.joint.render.explanation import word_choice_labels

            found = explorer.words(s)
            # a repeated word carries its place in the answer, so every entry can be told apart
            labels = word_choice_labels([w.text for w in found], range(1, len(found) + 1))
            choices = [(label, i) for i, label in enumerate(labels)]
            return gr.Radio(choices=choices, value=None)

        def cleared_ga(s: ExplorerState, current: str | None) -> tuple[Any, ...]:
            """Empty GA outputs, and the class channels of the queries now in effect."""
            choices = channel_choices(
                explorer.queries(s) if s.emb is not None else (),
                objectness=has_objectness(explorer.model.owl),
            )
            value = current if current in {v for _, v in choices} else "matching"
            return None, None, None, "", gr.Dropdown(choices=choices, value=value)

        ga_outputs = [map_image, box_image, top_table, ga_md, channel]

        # ------------------------------------------------------------- events
        def notice_output(s: ExplorerState) -> Any:
            """The model's warning about the image, on the page (not only in the server log)."""
            if not s.notice:
                return gr.Markdown(value="", visible=False)
            return gr.Markdown(value=f"**{_md(s.image_name)}**: {_md(s.notice)}", visible=True)

        def on_image(path: str | None, text: str, level: float, chosen: str) -> tuple[Any, ...]:
            s = ExplorerState()
            if path:
                # Gradio keeps the upload's own file name: messages name the file by it
                s = explorer.open_image(path, name=Path(path).name)
                s = explorer.set_threshold(explorer.set_queries(s, text), level)
            drawn, summary = detection_outputs(s) if s.emb is not None else (None, "")
            return (
                s,
                notice_output(s),
                drawn,
                summary,
                [],
                [],
                word_choices(s),
                *cleared_ga(s, chosen),
            )

        listen(
            [upload.change],
            on_image,
            [upload, queries_box, threshold, channel],
            [state, image_notice, picture, detections_md, chat, stock_chat, words, *ga_outputs],
        )

        def on_ask(
            s: ExplorerState, text: str, with_stock: bool, form: str, limit: float, chosen: str
        ) -> tuple[Any, ...]:
            s = explorer.ask(s, text, compare=with_stock, template=form, max_new_tokens=int(limit))
            drawn, summary = detection_outputs(s)
            return (
                s,
                "",
                chat_messages(s.conversation),
                chat_messages(s.stock),
                word_choices(s),
                drawn,
                summary,
                *cleared_ga(s, chosen),
            )

        ask_inputs = [state, question, compare, template, max_new_tokens, channel]
        ask_outputs = [state, question, chat, stock_chat, words, picture, detections_md]
        asked = listen(
            [ask_button.click, question.submit], on_ask, ask_inputs, [*ask_outputs, *ga_outputs]
        )
        for event in asked:
            event.then(None, None, None, js=SCROLL_TO_LATEST_JS, queue=False)

        def on_reset(s: ExplorerState, chosen: str) -> tuple[Any, ...]:
            s = explorer.reset_chat(s)
            drawn, summary = detection_outputs(s) if s.emb is not None else (None, "")
            return (s, [], [], word_choices(s), drawn, summary, None, [], *cleared_ga(s, chosen))

        listen(
            [reset_button.click],
            on_reset,
            [state, channel],
            [
                state,
                chat,
                stock_chat,
                words,
                picture,
                detections_md,
                hallucination_text,
                hallucination_table,
                *ga_outputs,
            ],
        )

        def on_queries(s: ExplorerState, text: str, level: float, chosen: str) -> tuple[Any, ...]:
            s = explorer.set_threshold(explorer.set_queries(s, text), level)
            drawn, summary = detection_outputs(s) if s.emb is not None else (None, "")
            return (s, drawn, summary, gr.Radio(value=None), *cleared_ga(s, chosen))

        listen(
            [queries_box.submit, detect_button.click],
            on_queries,
            [state, queries_box, threshold, channel],
            [state, picture, detections_md, words, *ga_outputs],
        )

        def on_threshold(s: ExplorerState, level: float) -> tuple[Any, ...]:
            s = explorer.set_threshold(s, level)
            drawn, summary = detection_outputs(s) if s.emb is not None else (None, "")
            return s, drawn, summary

        listen(
            [threshold.release], on_threshold, [state, threshold], [state, picture, detections_md]
        )

        def on_word(
            s: ExplorerState,
            index: int | None,
            how: str,
            chosen: str,
            progress: Any = gr.Progress(),  # noqa: B008 (Gradio's way to ask for a bar)
        ) -> tuple[Any, ...]:
            if index is None:
                return (s, None, None, None, "")
            progress(0.0, desc="GA")

            def tell(message: str) -> None:
                progress(0.1, desc=message)

            if how in {value for _, value in METHOD_CHOICES}:
                s, attribution, seconds = explorer.explain_word_with(
                    s, int(index), how, progress=tell
                )
                progress(0.8, desc="drawing the map")
                headers, rows = explorer.method_top_patches(attribution)
                cost = f"{seconds:.2f} s" if seconds else "already explained"
                status = f"**{_md(attribution.label)}** — {how}, {cost}"
                picture = explorer.method_picture(s, attribution)
                return s, picture, None, {"headers": headers, "data": rows}, status
            s, view = explorer.explain_word(s, int(index), progress=tell)
            progress(0.8, desc="drawing the map")
            picked = parse_channel(chosen)
            if isinstance(picked, int) and picked >= view.result.num_queries:
                picked = "matching"  # a channel of other queries: back to the default
            overlay, boxes = explorer.word_pictures(s, view.result, how, picked)
            headers, rows = explorer.top_patches(view.result, how, channel=picked)
            queries = ", ".join("`" + q.replace("`", "") + "`" for q in view.queries)
            if view.reused:
                cost = "already explained"
            elif view.norms_cached:
                cost = f"norms cached: one backward + one JVP, {view.seconds:.2f} s"
            else:
                cost = f"norms computed for this image and these queries, {view.seconds:.2f} s"
            status = f"**{_md(view.word.text)}** against {queries} — {cost}"
            return s, overlay, boxes, {"headers": headers, "data": rows}, status

        listen(
            [words.input, weighting.input, channel.input],
            on_word,
            [state, words, weighting, channel],
            [state, map_image, box_image, top_table, ga_md],
        )

        def on_hallucinations(s: ExplorerState) -> tuple[Any, ...]:
            s = explorer.hallucinations(s)
            report = s.hallucination
            rows = [
                [
                    o.name,
                    "yes" if o.mentioned else "no",
                    round(o.score, 3),
                    "yes" if o.detected else "no",
                ]
                for o in sorted(report.objects.values(), key=lambda o: -o.score)
            ]
            if not report.objects:
                gr.Info("The answer mentions no object of the vocabulary, and no object is typed.")
            return s, explorer.hallucination_segments(report), rows

        listen(
            [hallucination_button.click],
            on_hallucinations,
            [state],
            [state, hallucination_text, hallucination_table],
        )

        def on_report(s: ExplorerState, how: str, chosen: str | None = None) -> list[str]:
            from jmllm.joint.render.report import atomic_write_text

            pages = {
                "report.html": explorer.report_html(s),
                # the view on screen: the same weighting and class channel (GA's page shows a
                # GA map: with another method chosen, its class map)
                "explanation.html": explorer.explanation_html(
                    s,
                    how if how in {v for _, v in WEIGHTING_CHOICES} else "class",
                    parse_channel(chosen),
                ),
                "hallucinations.html": explorer.hallucination_html(s),
            }
            _prune(Path(work.name), "report-*", delete_cache[1])  # Gradio serves its own copies
            folder = Path(tempfile.mkdtemp(prefix="report-", dir=work.name))
            return [
                str(atomic_write_text(folder / name, page))
                for name, page in pages.items()
                if page is not None
            ]

        listen([report_button.click], on_report, [state, weighting, channel], [report_files])

        compare.change(
            lambda on: gr.Chatbot(visible=bool(on)), [compare], [stock_chat], queue=False
        )
    return app


__all__ = [
    "APP_EXTRA_HINT",
    "AppUnavailableError",
    "build_app",
    "builtin_examples",
    "channel_choices",
    "chat_messages",
    "guarded",
    "launch",
    "offline_theme",
    "parse_channel",
    "require_gradio",
]
