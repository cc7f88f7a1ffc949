// The triage queue from the keyboard: 1–4 saves a verdict (with the causes ticked and the note) and
// shows the next explanation; c and n go to the causes and the note; j / k move along the queue.
(function () {
  "use strict";
  const section = document.getElementById("triage");
  if (!section) return;
  const token = document.querySelector('meta[name="sae-atlas-token"]').content;
  const status = document.getElementById("status");
  const verdicts = Array.from(document.querySelectorAll("button.verdict")).map((button) => button.dataset.verdict);

  function go(position) {
    const url = new URL(window.location.href);
    url.searchParams.set("position", String(Math.max(0, position)));
    window.location.assign(url.toString());
  }

  async function save(verdict) {
    const causes = Array.from(document.querySelectorAll('input[name="cause"]:checked')).map((box) => box.value);
    const body = {
      feature_id: Number(section.dataset.feature),
      explainer: section.dataset.explainer,
      verdict: verdict,
      causes: causes,
      note: document.getElementById("note").value,
      origin: "triage:" + section.dataset.order,
    };
    status.textContent = "saving…";
    const response = await fetch("/api/labels", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-SAE-Atlas-Token": token },
      body: JSON.stringify(body),
    });
    if (response.status === 201) {
      // the labelled explanation leaves the queue: the same position is the next one
      go(Number(section.dataset.position));
    } else {
      const problem = await response.json().catch(() => ({ detail: response.statusText }));
      status.textContent = "not saved: " + problem.detail;
    }
  }

  document.querySelectorAll("button.verdict").forEach((button) =>
    button.addEventListener("click", () => save(button.dataset.verdict))
  );
  document.addEventListener("keydown", (event) => {
    const typing = ["TEXTAREA", "INPUT", "SELECT"].includes(event.target.tagName) && event.target.type !== "checkbox";
    if (event.key === "Escape") { event.target.blur(); return; }
    if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
    const position = Number(section.dataset.position);
    if (/^[1-9]$/.test(event.key) && Number(event.key) <= verdicts.length) {
      event.preventDefault();
      save(verdicts[Number(event.key) - 1]);
    } else if (event.key === "c") {
      event.preventDefault();
      const first = document.querySelector('input[name="cause"]');
      if (first) first.focus();
    } else if (event.key === "n") {
      event.preventDefault();
      document.getElementById("note").focus();
    } else if (event.key === "j") {
      go(position + 1);
    } else if (event.key === "k") {
      go(position - 1);
    }
  });
})();
