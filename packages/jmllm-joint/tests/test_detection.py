"""Decoding O^OWL to pixel boxes, NMS, and the PNG/HTML rendering."""

from __future__ import annotations

import html

import pytest
import torch
from PIL import Image

from jmllm.joint import Conversation, Detections, decode_detections, nms
from jmllm.joint.detection import box_iou
from jmllm.joint.render.report import draw_detections, render_report_html, write_report


def test_decode_scales_x_and_y_separately_to_the_original_size():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 0.0], [-9.0, -9.0]])  # (N=3, Q=2)
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.1, 0.2], [0.5, 0.5, 1.0, 1.0]])
    dets = decode_detections(logits, boxes, (200, 100), ["cat", "dog"], threshold=0.3)
    assert dets.labels.tolist() == [0, 1] and dets.names == ["cat", "dog"]
    torch.testing.assert_close(dets.boxes[0], torch.tensor([50.0, 25.0, 150.0, 75.0]))
    torch.testing.assert_close(dets.boxes[1], torch.tensor([40.0, 65.0, 60.0, 85.0]))
    torch.testing.assert_close(dets.scores, torch.sigmoid(torch.tensor([4.0, 0.0])))
    assert dets.patches.tolist() == [0, 1]
    assert dets.to_records()[0] == {
        "label": "cat",
        "score": pytest.approx(0.982014, abs=1e-6),
        "box": [50.0, 25.0, 150.0, 75.0],
        "patch": 0,
    }


def test_boxes_are_clipped_to_the_image():
    dets = decode_detections(
        torch.tensor([[5.0]]), torch.tensor([[0.95, 0.05, 0.3, 0.3]]), (10, 20), ["x"], 0.0
    )
    x0, y0, x1, y1 = dets.boxes[0].tolist()
    assert x1 == 10 and y0 == 0 and 0 < x0 < 10 and 0 < y1 < 20


def test_nms_is_per_class_and_greedy():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == [0, 3]  # 1 and 2 overlap 0
    logits = torch.logit(scores).unsqueeze(1).repeat(1, 2)
    logits[2, 0], logits[2, 1] = -10.0, torch.logit(torch.tensor(0.7))  # box 2 is a 'dog'
    cxcywh = (
        torch.tensor([[5, 5, 10, 10], [6, 6, 10, 10], [5, 5, 10, 10], [55, 55, 10, 10.0]]) / 100
    )
    dets = decode_detections(logits, cxcywh, (100, 100), ["cat", "dog"], 0.5, nms_iou=0.5)
    assert sorted(dets.patches.tolist()) == [0, 2, 3]  # box 1 suppressed by box 0; dog box 2 kept
    assert dets.scores.tolist() == sorted(dets.scores.tolist(), reverse=True)
    assert box_iou(boxes[:1], boxes[:1]).item() == pytest.approx(1.0)


def test_draw_detections_draws_inside_the_boxes():
    image = Image.new("RGB", (64, 48), "white")
    dets = Detections(
        torch.tensor([[10.0, 20.0, 40.0, 40.0]]),
        torch.tensor([0.9]),
        torch.tensor([0]),
        ["cat"],
        torch.tensor([3]),
        (64, 48),
    )
    drawn = draw_detections(image, dets)
    # a small image is enlarged (to 512 px) before drawing: boxes scale with it
    assert drawn.size == (512, 384) and image.getpixel((10, 30)) == (255, 255, 255)
    assert drawn.getpixel((80, 240)) != (255, 255, 255)  # left edge of the box
    assert drawn.getpixel((480, 40)) == (255, 255, 255)
    with pytest.raises(ValueError, match="64x48"):
        draw_detections(Image.new("RGB", (10, 10)), dets)


def test_report_escapes_every_model_string(tmp_path):
    evil = '<script>alert("x")</script>'
    conv = Conversation().ask(f"Is this {evil}?").answered(f"Yes {evil} & <b>bold</b>")
    dets = Detections(
        torch.tensor([[1.0, 1.0, 5.0, 5.0]]),
        torch.tensor([0.5]),
        torch.tensor([0]),
        ['<img src=x onerror="alert(1)">'],
        torch.tensor([0]),
        (8, 8),
    )
    stock = Conversation().ask("q").answered("</span><script>1</script>")
    path = write_report(
        tmp_path / "r.html",
        Image.new("RGB", (8, 8)),
        conversation=conv,
        detections=dets,
        stock=stock,
        title="<t>",
        notes=["<note>"],
        sources={"owl": "<o>"},
    )
    page = path.read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert html.escape(f"Yes {evil} & <b>bold</b>") in page
    assert html.escape('<img src=x onerror="alert(1)">') in page
    assert page.count("data:image/png;base64,") == 2  # image and detections, self-contained
    assert "http://" not in page and "https://" not in page


def test_report_without_detections_or_conversation():
    page = render_report_html(Image.new("RGB", (4, 4)))
    assert page.startswith("<!DOCTYPE html>") and "Conversation" not in page
    dets = Detections(
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        ["a"],
        torch.zeros(0, dtype=torch.long),
        (4, 4),
        0.9,
    )
    assert "No detection scored at least 0.9" in render_report_html(
        Image.new("RGB", (4, 4)), detections=dets
    )
