// Questionnaire logic. Reads the study from <script id="study-data" type="application/json">,
// builds every participant-provided or spec-provided text with textContent (never innerHTML),
// and must stay in step with randomisation.py (same FNV-1a + Mulberry32 + Fisher-Yates) and
// participants.py (same participant-id normal form).
"use strict";
(function () {
  var study = JSON.parse(document.getElementById("study-data").textContent);
  var n = study.questions.length;

  function fnv1a32(text) {
    var bytes = new TextEncoder().encode(text);
    var h = 0x811c9dc5;
    for (var i = 0; i < bytes.length; i++) {
      h = Math.imul(h ^ bytes[i], 0x01000193) >>> 0;
    }
    return h >>> 0;
  }

  function mulberry32(seed) {
    var a = seed | 0;
    return function () {
      a = (a + 0x6d2b79f5) | 0;
      var t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return (t ^ (t >>> 14)) >>> 0;
    };
  }

  // participants.normalise_participant_id: NFKC, format characters (Cf) removed, whitespace
  // trimmed and collapsed, case folded (JavaScript has no casefold: upper then lower case, with
  // the final sigma and the sharp s folded as Python does), NFKC again.
  function normaliseParticipantId(raw) {
    var text = String(raw).normalize("NFKC").replace(/\p{Cf}/gu, "");
    text = text.split(/\s+/).filter(function (part) { return part !== ""; }).join(" ");
    var folded = text.toUpperCase().toLowerCase();
    return folded.replace(/\u03c2/g, "\u03c3").replace(/\u00df/g, "ss").normalize("NFKC");
  }

  function participantSeed(studySeed, participantId) {
    return fnv1a32(String(studySeed) + "\n" + participantId);
  }

  // Same contract as randomisation.participant_order: [{position, question_id, swapped}, ...]
  function participantOrder(questionIds, studySeed, participantId) {
    var next = mulberry32(participantSeed(studySeed, participantId));
    var order = [];
    for (var k = 0; k < questionIds.length; k++) order.push(k);
    for (var i = order.length - 1; i > 0; i--) {
      var j = next() % (i + 1);
      var tmp = order[i];
      order[i] = order[j];
      order[j] = tmp;
    }
    return order.map(function (idx, pos) {
      return { position: pos + 1, question_id: questionIds[idx], swapped: next() >>> 31 === 1 };
    });
  }
  // Exposed so tests can compare it with the Python implementation.
  window.jmllmUserstudy = {
    participantSeed: participantSeed,
    participantOrder: participantOrder,
    normaliseParticipantId: normaliseParticipantId,
  };

  var el = function (id) { return document.getElementById(id); };
  var byId = {};
  study.questions.forEach(function (q) { byId[q.id] = q; });

  var state = null; // {participantId, seed, order, choices[], current, startedAt}

  function show(section) {
    ["start", "question", "finish"].forEach(function (name) {
      el(name).hidden = name !== section;
    });
  }

  function startStudy(event) {
    event.preventDefault();
    var pid = normaliseParticipantId(el("participant-id").value);
    if (!pid) {
      el("start-error").textContent = "Please enter your participant ID.";
      el("participant-id").setAttribute("aria-invalid", "true");
      el("participant-id").focus();
      return;
    }
    el("participant-id").removeAttribute("aria-invalid");
    el("start-error").textContent = "";
    var ids = study.questions.map(function (q) { return q.id; });
    state = {
      participantId: pid,
      seed: participantSeed(study.seed, pid),
      order: participantOrder(ids, study.seed, pid),
      choices: ids.map(function () { return null; }),
      current: 0,
      startedAt: new Date().toISOString(),
    };
    el("participant-label").textContent = pid;
    renderQuestion();
  }

  function renderQuestion() {
    var shown = state.order[state.current];
    var q = byId[shown.question_id];
    var first = shown.swapped ? 1 : 0;
    el("progress").textContent = "Question " + (state.current + 1) + " of " + n;
    el("question-text").textContent = q.text;
    el("img-image").src = q.image;
    el("img-expl-1").src = q.explanations[first];
    el("img-expl-2").src = q.explanations[1 - first];
    ["A1", "A2"].forEach(function (a) {
      el("answer-" + a + "-text").textContent = q.answers[a];
      el("answer-" + a).checked = state.choices[state.current] === a;
    });
    el("question-error").textContent = "";
    el("prev").hidden = state.current === 0;
    el("next").textContent = state.current === n - 1 ? "Finish" : "Next";
    show("question");
    el("progress").focus();
  }

  function selectedChoice() {
    if (el("answer-A1").checked) return "A1";
    if (el("answer-A2").checked) return "A2";
    return null;
  }

  function nextQuestion(event) {
    event.preventDefault();
    var choice = selectedChoice();
    if (!choice) {
      el("question-error").textContent = "Please choose A1 or A2 to continue.";
      el("answer-A1").focus();
      return;
    }
    state.choices[state.current] = choice;
    if (state.current < n - 1) {
      state.current += 1;
      renderQuestion();
    } else {
      finish();
    }
  }

  function previousQuestion() {
    state.choices[state.current] = selectedChoice() || state.choices[state.current];
    state.current -= 1;
    renderQuestion();
  }

  var served = /^https?:$/.test(window.location.protocol);
  var sent = false;

  function finish() {
    state.finishedAt = new Date().toISOString();
    var answered = state.choices.filter(function (c) { return c !== null; }).length;
    el("summary").textContent = "You answered " + answered + " of " + n + " questions.";
    // Served: one way back, the Send button; from a file: download and send the file by hand.
    el("finish-help").textContent = served
      ? "Press \u201cSend answers\u201d to send your answers to the researcher."
      : "Download your answers and send the file to the researcher.";
    el("send").hidden = !served || sent;
    el("download").hidden = served && !sent;
    show("finish");
    el("finish-heading").focus();
  }

  function answersDocument() {
    return {
      format: "jmllm-userstudy-answers/2",
      study_title: study.title,
      spec_fingerprint: study.fingerprint,
      study_seed: study.seed,
      participant_id: state.participantId,
      participant_seed: state.seed,
      started_at: state.startedAt,
      finished_at: state.finishedAt,
      answers: state.order.map(function (shown, k) {
        return {
          position: shown.position,
          question_id: shown.question_id,
          swapped: shown.swapped,
          choice: state.choices[k],
        };
      }),
    };
  }

  function fileName() {
    var safe = state.participantId.replace(/[^A-Za-z0-9_-]/g, "_").slice(0, 40);
    return "answers-" + safe + "-" + study.fingerprint.slice(0, 8) + ".json";
  }

  function download() {
    var blob = new Blob([JSON.stringify(answersDocument(), null, 2) + "\n"], {
      type: "application/json",
    });
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = fileName();
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
    el("send-status").textContent = "Your answers were saved as " + fileName() + ".";
  }

  function sendFailed(why) {
    el("send").disabled = false; // a failed send may be tried again
    el("download").hidden = false;
    el("send-status").textContent =
      "Sending failed" + why + "; try again, or download the file and send it to the researcher.";
  }

  function send() {
    if (sent || el("send").disabled) return; // pressed once: no second submission
    el("send").disabled = true;
    el("send-status").textContent = "Sending\u2026";
    fetch("submit", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(answersDocument()),
    })
      .then(function (response) {
        if (!response.ok) return sendFailed(" (" + response.status + ")");
        sent = true;
        el("send").hidden = true;
        el("review").hidden = true; // the answers are in: nothing left to change
        el("finish-help").textContent = "";
        el("send-status").textContent = "Your answers were sent. Thank you!";
      })
      .catch(function () { sendFailed(""); });
  }

  function review() {
    state.current = n - 1;
    renderQuestion();
  }

  el("start-form").addEventListener("submit", startStudy);
  el("question-form").addEventListener("submit", nextQuestion);
  el("prev").addEventListener("click", previousQuestion);
  el("download").addEventListener("click", download);
  el("send").addEventListener("click", send);
  el("review").addEventListener("click", review);
  show("start");
  document.documentElement.setAttribute("data-ready", "true");
})();
