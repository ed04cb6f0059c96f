"use strict";
// adaptd's status page. Every POLL_MS it reads /v1/state, /v1/history and /v1/events from the
// service that served it (relative URLs only: the page's Content-Security-Policy lets it reach no
// other origin) and redraws. Each chart writes what it drew on its <figure>: data-points (the
// points of its line) and data-marks (the events marked on it), so a test can read them.
(() => {
  const POLL_MS = 2000;
  const EVENTS_SHOWN = 20;
  const WIDTH = 640;
  const HEIGHT = 200;
  const PAD = { left: 60, right: 14, top: 12, bottom: 26 };
  const CHARTS = [
    { id: "chart-error", key: "rolling_error", fromZero: true },
    { id: "chart-coverage", key: "coverage", target: true },
    { id: "chart-size", key: "size", fromZero: true },
    { id: "chart-learning-rate", key: "learning_rate", fromZero: true },
  ];

  const byId = (id) => document.getElementById(id);

  function isNumber(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  function formatted(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value !== "number") return String(value);
    if (!Number.isFinite(value)) return String(value);
    if (value !== 0 && (Math.abs(value) >= 1e5 || Math.abs(value) < 1e-3)) {
      return value.toExponential(2);
    }
    return String(Number(value.toPrecision(4)));
  }

  function clock(seconds) {
    const when = new Date(seconds * 1000);
    return [when.getHours(), when.getMinutes(), when.getSeconds()]
      .map((part) => String(part).padStart(2, "0")).join(":");
  }

  function element(tag, text, className) {
    const made = document.createElement(tag);
    if (text !== undefined) made.textContent = text;
    if (className) made.className = className;
    return made;
  }

  // a <dl> of [name, value] rows, values formatted
  function fillTerms(list, rows) {
    list.replaceChildren();
    for (const [name, value] of rows) {
      const shown = element("dd", formatted(value));
      shown.dataset.term = name;
      list.append(element("dt", name), shown);
    }
  }

  // what a learning part's settings say in one line: its scalar settings, name=value
  function summary(settings) {
    if (settings === true) return "on";
    if (settings === null || typeof settings !== "object") return formatted(settings);
    return Object.entries(settings)
      .filter(([, value]) => value === null || typeof value !== "object")
      .map(([name, value]) => `${name}=${formatted(value)}`).join(", ");
  }

  function showState(state) {
    const model = state.model;
    byId("model").textContent = `${model.name} · ${model.task} · ${model.version}`;
    const adapter = state.adapter;
    byId("adapter-name").textContent = adapter.name;
    fillTerms(byId("adapter"), [
      ["learning rate", adapter.learning_rate], ["steps", adapter.steps],
      ["samples stepped on", adapter.backward_samples], ["version", adapter.version],
      ["norm", adapter.norm], ["buffered", adapter.buffered_samples],
      ["guard", adapter.guard !== null && adapter.guard !== undefined],
    ]);
    const learning = byId("learning");
    learning.replaceChildren();
    // River's learners (`learners`, by candidate name) one line each, as the other parts
    const parts = Object.entries(state.learning || {}).flatMap(([part, settings]) =>
      part === "learners" && settings ? Object.entries(settings) : [[part, settings]]);
    for (const [part, settings] of parts) {
      if (settings === false || settings === null) continue;  // parts that are off
      const item = element("li");
      item.dataset.part = part;
      item.append(element("strong", part));
      const said = summary(settings);
      if (said && said !== "on") item.append(`: ${said}`);
      learning.append(item);
    }
    const quality = state.quality;
    fillTerms(byId("quality"), [
      ["rolling error", quality.rolling_error], ["labels in window", quality.labels],
      ["window", quality.window],
    ]);
    const calibrator = state.calibrator;
    if (calibrator) {
      const sizeName = Object.keys(calibrator).find((k) => k.startsWith("mean_"));
      fillTerms(byId("calibrator"), [
        ["method", calibrator.method], ["target", calibrator.target],
        ["threshold", calibrator.threshold], ["coverage (100)", calibrator.coverage["100"]],
        ["coverage (1000)", calibrator.coverage["1000"]],
        [sizeName ? sizeName.replaceAll("_", " ") : "size", sizeName ? calibrator[sizeName] : null],
      ]);
    } else {
      fillTerms(byId("calibrator"), [["method", "off"]]);
    }
    const policy = state.drift_policy;
    fillTerms(byId("drift"), policy ? [
      ["detectors", (state.detectors || []).length],
      ["label-free alarms do", (policy.label_free_actions || []).join(", ") || "nothing"],
      ["labelled alarms do", (policy.labelled_actions || []).join(", ") || "nothing"],
      ["learning-rate factor", policy.learning_rate_factor], ["sample clock", policy.samples],
    ] : [["detection", "off"]]);
    const warnings = state.warnings || [];
    byId("warnings").replaceChildren(...warnings.map((warning) => element("li", warning)));
    byId("warnings-section").hidden = warnings.length === 0;
    if (!state.store.up) byId("status").textContent += " · the store does not answer";
  }

  // the time span every chart shows: the history's, reaching on to the newest event
  function timeSpan(points, events) {
    if (points.length === 0) return null;
    let first = points[0].time;
    let last = points[points.length - 1].time;
    for (const event of events) {
      if (event.time > last) last = event.time;
    }
    if (last - first < 1) {
      first -= 30;
      last += 30;
    }
    return { first, last };
  }

  function svgChild(svg, tag, attributes, text) {
    const child = document.createElementNS(svg.namespaceURI, tag);
    for (const [name, value] of Object.entries(attributes)) child.setAttribute(name, value);
    if (text !== undefined) child.textContent = text;
    svg.append(child);
    return child;
  }

  function draw(chart, history, events, span) {
    const figure = byId(chart.id);
    const svg = figure.querySelector("svg");
    svg.replaceChildren();
    const target = chart.target ? history.coverage_target : null;
    const series = history.points
      .filter((point) => isNumber(point[chart.key]))
      .map((point) => [point.time, point[chart.key]]);
    figure.dataset.points = String(series.length);
    figure.dataset.marks = "0";
    const last = series.length ? series[series.length - 1][1] : null;
    figure.querySelector(".now").textContent = formatted(last) +
      (isNumber(target) ? ` (target ${formatted(target)})` : "");
    if (series.length === 0 || span === null) {
      svgChild(svg, "text", { x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle",
                              class: "empty" }, "no labels joined yet");
      return;
    }
    const values = series.map(([, value]) => value);
    if (isNumber(target)) values.push(target);
    let low = chart.fromZero ? Math.min(0, ...values) : Math.min(...values);
    let high = Math.max(...values);
    if (chart.target) {  // coverage: a share, shown up to 1
      low = Math.max(0, Math.min(low, high - 0.05) - 0.02);
      high = 1;
    }
    if (high - low <= 0) high = low + (Math.abs(low) || 1);
    const right = WIDTH - PAD.right;
    const bottom = HEIGHT - PAD.bottom;
    const x = (time) => PAD.left + (time - span.first) / (span.last - span.first) *
      (right - PAD.left);
    const y = (value) => bottom - (value - low) / (high - low) * (bottom - PAD.top);
    for (const tick of [low, (low + high) / 2, high]) {
      svgChild(svg, "line", { x1: PAD.left, x2: right, y1: y(tick), y2: y(tick), class: "axis" });
      svgChild(svg, "text", { x: PAD.left - 6, y: y(tick) + 4, "text-anchor": "end" },
               formatted(tick));
    }
    svgChild(svg, "text", { x: PAD.left, y: HEIGHT - 8 }, clock(span.first));
    svgChild(svg, "text", { x: right, y: HEIGHT - 8, "text-anchor": "end" }, clock(span.last));
    if (isNumber(target)) {
      svgChild(svg, "line", { x1: PAD.left, x2: right, y1: y(target), y2: y(target),
                              class: "target" });
    }
    let marks = 0;
    for (const event of events) {
      if (event.time < span.first || event.time > span.last) continue;
      // a judged alarm is an outcome about an alarm some 2,000 samples before, not a moment
      if (event.kind === "drift_judged") continue;
      const mark = svgChild(svg, "line", { x1: x(event.time), x2: x(event.time), y1: PAD.top,
                                           y2: bottom, class: `mark ${event.kind}` });
      const what = [event.kind, event.action, event.source].filter(Boolean).join(" · ");
      svgChild(mark, "title", {}, `${clock(event.time)} ${what}`);
      marks += 1;
    }
    figure.dataset.marks = String(marks);
    const path = series.map(([time, value], i) =>
      `${i ? "L" : "M"}${x(time).toFixed(1)},${y(value).toFixed(1)}`).join(" ");
    svgChild(svg, "path", { d: path, class: "series" });
    if (series.length === 1) {
      svgChild(svg, "circle", { cx: x(series[0][0]), cy: y(series[0][1]), r: 3, class: "dot" });
    }
  }

  function showHistory(history, events) {
    const span = timeSpan(history.points, events);
    const sizeTitle = history.size_name.replaceAll("_", " ");
    byId("chart-size").querySelector(".title").textContent = sizeTitle;
    byId("chart-coverage").querySelector(".title").textContent =
      `coverage (last ${history.coverage_window} labels)`;
    byId("chart-error").querySelector(".title").textContent =
      `rolling error (last ${history.error_window} labels)`;
    for (const chart of CHARTS) draw(chart, history, events, span);
    byId("history-note").textContent =
      `${history.points.length} points, at least ${formatted(history.spacing_s)} s apart ` +
      `(at most ${history.capacity}; kept by this replica since it started)`;
  }

  function showEvents(events) {
    const list = byId("events");
    list.replaceChildren();
    for (const event of events.slice(0, EVENTS_SHOWN)) {
      const item = element("li");
      item.dataset.kind = event.kind;
      item.append(element("span", clock(event.time), "when"), " ",
                  element("span", event.kind, `kind ${event.kind}`), " ");
      const said = [event.action, `by ${event.source}`].filter(Boolean).join(", ");
      item.append(said);
      const detail = summary(event.detail || {});
      if (detail) item.append(` (${detail})`);
      list.append(item);
    }
    if (events.length === 0) list.append(element("li", "no events yet", "empty"));
    list.dataset.count = String(Math.min(events.length, EVENTS_SHOWN));
  }

  async function read(path) {
    const answer = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
    if (!answer.ok) throw new Error(`${path} answered ${answer.status}`);
    return answer.json();
  }

  async function refresh() {
    try {
      const [state, history, listed] = await Promise.all([
        read("/v1/state"), read("/v1/history"), read("/v1/events?limit=100"),
      ]);
      byId("status").textContent = `updated ${clock(Date.now() / 1000)}, every ` +
        `${POLL_MS / 1000} s`;
      document.body.classList.remove("stale");
      showState(state);
      showHistory(history, listed.events);
      showEvents(listed.events);
      document.body.dataset.loaded = "true";
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
    } catch (error) {
      document.body.classList.add("stale");
      byId("status").textContent = `cannot read the service (${error.message}); trying again`;
    } finally {
      setTimeout(refresh, POLL_MS);
    }
  }

  refresh();
})();
