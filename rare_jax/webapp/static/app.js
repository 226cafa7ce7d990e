// The labeling page: renders /api/state, sends answers, undo and submit; polls for changes.
// Plain JavaScript, no build step. Every request carries the access token (X-Token header,
// or ?token= on image URLs, which cannot set headers).
"use strict";

(() => {
  const token = new URLSearchParams(window.location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);
  let state = null; // the last state from the server, with local answers not yet confirmed
  let inFlight = 0; // requests queued or running
  let actions = 0; // the person's actions so far: a poll that started before one is stale
  let chain = Promise.resolve();
  // What the status line says in each phase when the server sends no message of its own (its
  // message, when there is one, says it all: it is shown alone).
  const PHASE_TEXT = {
    starting: "Preparing the first batch…",
    labeling: "Answer every image of this batch, then submit it.",
    updating: "Batch saved. Updating the model…",
    done: "Done: the labeling budget is used.",
    failed: "The run stopped.",
    stopped: "The server stopped. Start the same command again to resume.",
  };
  const DEEP_TEXT = {
    idle: "Not run yet.",
    unavailable: "Not available: ",
  };

  async function api(path, body) {
    const options = { method: "GET", headers: { "X-Token": token } };
    if (body !== undefined) {
      options.method = "POST";
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    let data;
    try {
      data = await response.json();
    } catch (error) {
      data = { error: `HTTP ${response.status}` };
    }
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  window.rareJaxApi = api; // audit.js's requests go through it too

  function imageUrl(id) {
    return `image/${id}?token=${encodeURIComponent(token)}`;
  }

  function largeImageUrl(id) {
    return `image/${id}/large?token=${encodeURIComponent(token)}`;
  }

  // The enlarged image: at its full resolution (served up to the server's limit), shrunk to
  // fit the window by the style sheet, a small one scaled up (`fitViewer`). Click it or press
  // Esc (or Z) to close it.
  function openViewer(id, path) {
    $("viewer-image").src = largeImageUrl(id);
    $("viewer-image").alt = path;
    $("viewer-caption").textContent = path;
    $("viewer").dataset.id = String(id);
    $("viewer").hidden = false;
  }

  function closeViewer() {
    $("viewer").hidden = true;
    $("viewer-image").removeAttribute("src");
    $("viewer-image").style.width = "";
    $("viewer-image").style.height = "";
  }

  // A small original (a few dozen pixels) is scaled up to VIEWER_MIN pixels on its longer
  // side, within the window, so that there is something to judge; larger ones keep their size.
  const VIEWER_MIN = 512;
  function fitViewer() {
    const image = $("viewer-image");
    const width = image.naturalWidth;
    const height = image.naturalHeight;
    image.style.width = "";
    image.style.height = "";
    if (!width || !height || Math.max(width, height) >= VIEWER_MIN) return;
    const scale = Math.min(
      VIEWER_MIN / Math.max(width, height),
      (0.96 * window.innerWidth) / width,
      (0.9 * window.innerHeight) / height,
    );
    if (scale <= 1) return;
    image.style.width = `${Math.round(width * scale)}px`;
    image.style.height = `${Math.round(height * scale)}px`;
  }

  function enlargeable(image, id, path) {
    image.classList.add("enlarge");
    image.title = `${path} (click to enlarge)`;
    image.addEventListener("click", () => openViewer(id, path));
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  // Requests run one after another, in the order the person acted.
  function enqueue(task) {
    actions += 1;
    inFlight += 1;
    chain = chain
      .then(task)
      .catch((error) => {
        setStatus(error.message, true);
        return refresh(true);
      })
      .finally(() => {
        inFlight -= 1;
      });
    return chain;
  }

  function accept(data) {
    if (inFlight > 1) return; // a later request will bring a newer state
    state = data;
    render();
  }

  async function refresh(force) {
    if (inFlight > 0 && !force) return;
    const before = actions;
    try {
      const data = await api("api/state");
      if (!force && (actions !== before || inFlight > 0)) return; // overtaken by an action
      if (force || !state || data.version !== state.version || data.phase !== state.phase) {
        state = data;
        render();
      }
    } catch (error) {
      setStatus(`Lost the server: ${error.message}`, true);
    }
  }

  function items() {
    const out = [];
    if (!state) return out;
    for (const category of state.categories) {
      for (const item of category.query) out.push({ category: category.index, item });
    }
    return out;
  }

  function focused() {
    return items().find(({ item }) => item.answer === null) || null;
  }

  function complete() {
    const all = items();
    return all.length > 0 && all.every(({ item }) => item.answer !== null);
  }

  function labeling() {
    return state && state.phase === "labeling" && state.serial !== null;
  }

  function answer(category, item, value) {
    if (!labeling()) return;
    if (item.answer !== null) {
      setStatus("This image is answered already: undo the last answer to change it.", true);
      return;
    }
    item.answer = value; // shown at once; the server's reply confirms it
    state.answered += 1;
    render();
    const serial = state.serial;
    enqueue(() => api("api/answer", { serial, category, id: item.id, answer: value }).then(accept));
  }

  function undo() {
    if (!labeling()) return;
    const serial = state.serial;
    enqueue(() => api("api/undo", { serial }).then(accept));
  }

  function submit() {
    if (!labeling()) return;
    if (!complete()) {
      setStatus("Answer every image of the batch before submitting.", true);
      return;
    }
    const serial = state.serial;
    enqueue(() => api("api/submit", { serial }).then(accept));
  }

  function renderCard(category, item, isFocus) {
    const card = element("div", "card");
    card.dataset.id = String(item.id);
    card.dataset.category = String(category);
    if (item.answer === true) card.classList.add("yes");
    if (item.answer === false) card.classList.add("no");
    if (isFocus) card.classList.add("focus");
    const image = element("img");
    image.src = imageUrl(item.id);
    image.alt = item.path;
    enlargeable(image, item.id, item.path);
    card.append(image, element("div", "path", item.path));
    const buttons = element("div", "buttons");
    const yes = element("button", "yes-button", "Yes");
    const no = element("button", "no-button", "No");
    yes.type = "button";
    no.type = "button";
    yes.addEventListener("click", () => answer(category, item, true));
    no.addEventListener("click", () => answer(category, item, false));
    buttons.append(yes, no);
    card.append(buttons);
    return card;
  }

  function renderCategory(category, focus) {
    const section = element("section", "category");
    section.id = `category-${category.index}`;
    const heading = element("h2", "", "Is it ");
    heading.append(element("span", "name", category.name), document.createTextNode("?"));
    const pending = category.query.filter((item) => item.answer === true).length;
    const counters = element("div", "counters");
    const number = (className, value) => element("b", className, String(value));
    counters.append(
      "Labels used ",
      number("labels-used", category.labels_used),
      " / ",
      number("budget", state.budget),
      " · positives found ",
      number("positives-found", category.positives_found),
      pending ? ` (+${pending} in this batch)` : "",
      ` · ${category.seeds} seeds`,
    );
    section.append(heading, counters);
    const grid = element("div", "grid query");
    if (category.query.length === 0) {
      grid.append(element("div", "idle", "No batch open."));
    }
    for (const item of category.query) {
      const isFocus = focus !== null && focus.item === item && focus.category === category.index;
      grid.append(renderCard(category.index, item, isFocus));
    }
    section.append(grid);
    return section;
  }

  // Several categories: one button per category, with its answers in this batch; a click
  // scrolls to that category's questions.
  function renderTabs() {
    const tabs = $("category-tabs");
    tabs.replaceChildren();
    tabs.hidden = state.categories.length < 2;
    if (tabs.hidden) return;
    for (const category of state.categories) {
      const done = category.query.filter((item) => item.answer !== null).length;
      const text = `${category.name}: ${done}/${category.query.length} answered, ` +
        `${category.positives_found} found`;
      const button = element("button", "tab", text);
      button.type = "button";
      button.dataset.category = String(category.index);
      button.addEventListener("click", () => {
        const section = document.getElementById(`category-${category.index}`);
        if (section) section.scrollIntoView({ behavior: "smooth", block: "start" });
      });
      tabs.append(button);
    }
  }

  function renderTop() {
    const top = $("top");
    top.replaceChildren();
    for (const category of state.categories) {
      if (state.categories.length > 1) top.append(element("h3", "", category.name));
      const grid = element("div", "grid top");
      for (const entry of category.top) {
        const thumb = element("div", "thumb");
        const image = element("img");
        image.src = imageUrl(entry.id);
        image.alt = entry.path;
        enlargeable(image, entry.id, entry.path);
        const caption = element("div", "caption", `${entry.score.toFixed(3)} `);
        if (entry.label) caption.append(element("span", `badge ${entry.label}`, entry.label));
        thumb.append(image, caption);
        grid.append(thumb);
      }
      if (category.top.length === 0) grid.append(element("div", "idle", "No ranking yet."));
      top.append(grid);
    }
  }

  // The answers of submitted batches; "Change" flips one (the run is re-derived from it).
  function renderGiven() {
    const given = $("given");
    given.replaceChildren();
    const canChange = state.phase === "labeling" || state.phase === "done";
    for (const category of state.categories) {
      if (state.categories.length > 1) given.append(element("h3", "", category.name));
      const grid = element("div", "grid given");
      for (const entry of category.given) {
        const thumb = element("div", "thumb");
        thumb.dataset.id = String(entry.id);
        thumb.dataset.category = String(category.index);
        const image = element("img");
        image.src = imageUrl(entry.id);
        image.alt = entry.path;
        enlargeable(image, entry.id, entry.path);
        const word = entry.answer ? "yes" : "no";
        const caption = element("div", "caption", `batch ${entry.round} `);
        caption.append(element("span", `badge ${word}`, word));
        const change = element("button", "change", `Change to ${entry.answer ? "no" : "yes"}`);
        change.type = "button";
        change.disabled = !canChange;
        change.addEventListener("click", () => correct(category.index, entry));
        thumb.append(image, caption, change);
        grid.append(thumb);
      }
      if (category.given.length === 0) grid.append(element("div", "idle", "No batch submitted yet."));
      given.append(grid);
    }
  }

  function correct(category, entry) {
    const body = { category, id: entry.id, answer: !entry.answer };
    setStatus(`Changing the answer for ${entry.path}…`, false);
    enqueue(() => api("api/correct", body).then(accept));
  }

  function render() {
    if (!state) return;
    $("round").textContent = String(state.round);
    $("rounds").textContent = String(state.rounds);
    const text = state.message || PHASE_TEXT[state.phase] || state.phase;
    setStatus(text, state.phase === "failed");
    const focus = labeling() ? focused() : null;
    $("categories").replaceChildren(...state.categories.map((c) => renderCategory(c, focus)));
    renderTabs();
    const total = items().length;
    const answered = items().filter(({ item }) => item.answer !== null).length;
    $("answered").textContent = labeling() ? `${answered} of ${total} answered` : "";
    $("undo").disabled = !labeling() || answered === 0;
    $("submit").disabled = !labeling() || !complete();
    $("submit").classList.toggle("ready", labeling() && complete());
    renderTop();
    renderGiven();
    const model = state.model;
    $("model").textContent = `Model: ${model.kind}. Features: ${model.features}.`;
    const deep = model.deep_update;
    $("deep-section").dataset.status = deep.status;
    const said = deep.message ? deep.message[0].toUpperCase() + deep.message.slice(1) : "";
    $("deep-status").textContent = `${DEEP_TEXT[deep.status] || ""}${said}`;
    const bar = $("deep-progress");
    if (deep.progress === null) bar.removeAttribute("value"); // unknown yet: an animated bar
    else bar.value = deep.progress;
    $("deep-update").disabled = !deep.can_request;
    const canFinish = (state.phase === "labeling" || state.phase === "done") && model.has_model;
    $("finish").disabled = !canFinish;
    $("finish").title = canFinish ? "" : "Possible once a batch is submitted and the run waits for you.";
    $("finish-status").textContent = state.results ? state.results.message : "";
    $("deep-update").title = deep.can_request ? "" : deep.why_not;
  }

  function finish() {
    setStatus("Writing the ranked results…", false);
    enqueue(() => api("api/finish", {}).then(accept));
  }

  function deepUpdate() {
    enqueue(() => api("api/deep_update", {}).then(accept));
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.toLowerCase();
    let focus = labeling() ? focused() : null;
    const viewing = !$("viewer").hidden;
    if (viewing && focus && $("viewer").dataset.id !== String(focus.item.id)) focus = null;
    if (viewing && (key === "y" || key === "n") && focus) closeViewer(); // answered: back
    if (viewing && (key === "escape" || key === "z")) closeViewer();
    else if (key === "z" && focus) openViewer(focus.item.id, focus.item.path);
    else if (key === "y" && focus) answer(focus.category, focus.item, true);
    else if (key === "n" && focus) answer(focus.category, focus.item, false);
    else if (key === "u" || key === "backspace") undo();
    else if (key === "enter") submit();
    else return;
    event.preventDefault();
  });

  window.addEventListener("DOMContentLoaded", () => {
    $("undo").addEventListener("click", undo);
    $("submit").addEventListener("click", submit);
    $("deep-update").addEventListener("click", deepUpdate);
    $("viewer").addEventListener("click", closeViewer);
    $("viewer-image").addEventListener("load", fitViewer);
    $("finish").addEventListener("click", finish);
    refresh(true);
    window.setInterval(() => refresh(false), 700);
  });
})();
