// The audit panel: label a small random sample of images the loop never asked, one at a time,
// and see the estimate of the classifier's precision, recall and positives still unfound.
// Talks to /api/audit (rare_jax/webapp/audit_routes.py). Its answers never train the model.
// Plain JavaScript, no build step; every request carries the access token.
"use strict";

(() => {
  const token = new URLSearchParams(window.location.search).get("token") || "";
  let data = null; // the last GET /api/audit
  let selected = 0; // the category shown
  let busy = false;
  let message = "";

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // app.js (loaded first: both scripts are deferred) shares its request helper.
  const api = window.rareJaxApi;

  async function act(path, body) {
    if (busy) return;
    busy = true;
    message = "";
    render();
    try {
      data = await api(path, body);
    } catch (error) {
      message = error.message;
    } finally {
      busy = false;
      render();
    }
  }

  async function load() {
    let fresh;
    try {
      fresh = await api("api/audit");
    } catch (error) {
      message = error.message;
      render();
      return;
    }
    if (busy) return; // an answer is on its way: its reply is newer
    // Render only on a change (the size field and the image stay as they are otherwise).
    if (JSON.stringify(fresh) === JSON.stringify(data) && !message) return;
    data = fresh;
    message = "";
    render();
  }

  function section() {
    let node = document.getElementById("audit-section");
    if (!node) {
      node = element("section");
      node.id = "audit-section";
      node.style.padding = "0 1.2em 1em"; // as the page's other sections (CSSOM: CSP allows it)
      const footer = document.querySelector("footer");
      document.body.insertBefore(node, footer);
    }
    return node;
  }

  function percent(interval) {
    const p = (v) => `${Math.round(100 * v)}%`;
    return `${p(interval.value)} (95% interval ${p(interval.low)} to ${p(interval.high)})`;
  }

  function count(interval) {
    const r = (v) => Math.round(v);
    return `${r(interval.value)} (95% interval ${r(interval.low)} to ${r(interval.high)})`;
  }

  function estimateTable(result) {
    const table = element("table", "audit-estimate");
    const rows = [
      [
        "Precision",
        result.precision ? percent(result.precision) : "none scored 0.5 or more",
        `of the ${result.predicted_positive} unlabeled images the classifier calls positive`,
      ],
      [
        "Recall",
        result.recall ? percent(result.recall) : "-",
        "of all positives in the pool, counting those you labeled",
      ],
      [
        "Still unfound",
        result.unfound ? count(result.unfound) : "-",
        "positives among the unlabeled images scored below 0.5",
      ],
    ];
    for (const [name, value, note] of rows) {
      const tr = element("tr");
      tr.append(element("th", "", name), element("td", "", value), element("td", "help", note));
      table.append(tr);
    }
    return table;
  }

  function render() {
    const root = section();
    root.replaceChildren();
    root.append(element("h2", "", "Audit: how good is the classifier?"));
    root.append(
      element(
        "p",
        "help",
        "Answer a few images drawn at random from those you have not labeled, from every " +
          "score range. From them the page estimates the classifier's precision and recall " +
          "at probability 0.5 and how many positives are still unfound, with 95% intervals " +
          "(they hold at least 95% of the time; for a rare category the recall interval " +
          "stays wide unless the audit is large). These answers never train the model.",
      ),
    );
    if (message) {
      const error = element("p", "help", message);
      error.id = "audit-message";
      error.setAttribute("role", "alert");
      root.append(error);
    }
    if (!data) return;
    const categories = data.categories;
    if (selected >= categories.length) selected = 0;
    if (categories.length > 1) {
      const bar = element("div", "toolbar");
      categories.forEach((c, i) => {
        const tab = element("button", i === selected ? "ready" : "", c.name);
        tab.type = "button";
        tab.addEventListener("click", () => {
          selected = i;
          render();
        });
        bar.append(tab);
      });
      root.append(bar);
    }
    const entry = categories[selected];
    if (!entry.has_model) {
      root.append(element("p", "", "The audit opens once a first batch has trained a classifier."));
      return;
    }
    const audit = entry.audit;
    if (!audit) {
      const bar = element("div", "toolbar");
      const size = element("input");
      size.type = "number";
      size.id = "audit-size";
      size.min = "1";
      size.max = String(data.max_size);
      size.value = String(data.default_size);
      const start = element("button", "", "Start an audit");
      start.type = "button";
      start.id = "audit-start";
      start.disabled = busy;
      start.addEventListener("click", () => {
        const n = Number.parseInt(size.value, 10);
        if (!(n >= 1 && n <= data.max_size)) {
          message = `Audit size: a number from 1 to ${data.max_size}.`;
          render();
          return;
        }
        act("api/audit/start", { category: entry.index, size: n, replace: false });
      });
      bar.append(element("label", "", "Images to answer: "), size, start);
      root.append(bar);
      return;
    }
    const progress = element("p", "", `${audit.labeled} of ${audit.planned} audit images answered.`);
    progress.id = "audit-progress";
    root.append(progress);
    if (entry.next) {
      const card = element("div", "card audit-card");
      card.id = "audit-card";
      const img = element("img");
      img.src = `image/${entry.next.id}?token=${encodeURIComponent(token)}`;
      img.alt = entry.next.path;
      card.style.width = "280px";
      const path = element("div", "path", entry.next.path);
      path.title = entry.next.path;
      const buttons = element("div", "buttons");
      for (const [text, answer, cls] of [
        ["Yes", true, "yes-button"],
        ["No", false, "no-button"],
      ]) {
        const button = element("button", cls, text);
        button.type = "button";
        button.id = answer ? "audit-yes" : "audit-no";
        button.disabled = busy;
        button.addEventListener("click", () =>
          act("api/audit/answer", { category: entry.index, id: entry.next.id, answer }),
        );
        buttons.append(button);
      }
      card.append(img, path, buttons);
      root.append(element("p", "", `Does this image show ${entry.name}?`), card);
    }
    if (audit.recall) {
      const table = estimateTable(audit);
      table.id = "audit-estimate";
      root.append(table);
      if (audit.uncovered) {
        root.append(
          element(
            "p",
            "help",
            `${audit.uncovered} unlabeled images had a label when this audit was drawn and ` +
              "are not covered by it: draw a new audit to include them.",
          ),
        );
      }
    } else {
      const waiting = element("p", "help", audit.summary);
      waiting.id = "audit-summary";
      root.append(waiting);
    }
    const again = element("button", "", "Draw a new audit");
    again.type = "button";
    again.id = "audit-new";
    again.disabled = busy;
    again.addEventListener("click", () => {
      if (!window.confirm("Draw a new audit? The answers of this one are kept but no longer counted.")) return;
      act("api/audit/start", { category: entry.index, size: audit.planned, replace: true });
    });
    const bar = element("div", "toolbar");
    bar.append(again);
    root.append(bar);
  }

  window.addEventListener("DOMContentLoaded", () => {
    load();
    // The model changes after each submitted batch: refresh the estimate now and then.
    window.setInterval(() => {
      if (!busy) load();
    }, 5000);
  });
})();
