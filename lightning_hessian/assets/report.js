// Charts of the lightning_hessian HTML report: inline SVG, no libraries, no network.
// Reads the JSON in <script id="report-data">; draws every <div class="chart" data-chart="i"> from
// DATA.charts[i] (lines, an optional reference line, alert markers) and <div class="timeline"> from
// DATA.alerts. Legend entries toggle their series; hovering shows the values at the nearest step.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                  "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
  const SEVERITY = {critical: "#d62728", warning: "#ff7f0e", info: "#1f77b4", unknown: "#7f7f7f"};
  const W = 660, H = 280, M = {l: 66, r: 14, t: 12, b: 38};

  function svgEl(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }
  function label(parent, x, y, text, cls, anchor) {
    svgEl("text", {x, y, class: cls, "text-anchor": anchor || "middle"}, parent).textContent = text;
  }
  function fmt(v) {
    if (v === null || !Number.isFinite(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a >= 1e5 || a < 1e-3) ? v.toExponential(2) : String(+v.toPrecision(4));
  }
  function niceTicks(lo, hi, n) {
    const span = hi - lo || 1, mag = Math.pow(10, Math.floor(Math.log10(span / n)));
    const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => span / s <= n);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }
  function decades(lo, hi) {
    const a = Math.round(Math.log10(lo)), b = Math.round(Math.log10(hi)), every = Math.ceil((b - a) / 8);
    const ticks = [];
    for (let e = a; e <= b; e += every) ticks.push(Math.pow(10, e));
    return ticks;
  }
  function scale(lo, hi, a, b, log) {
    const f = log ? Math.log10 : (x) => x, l = f(lo), d = f(hi) - l || 1;
    return (v) => a + ((f(v) - l) / d) * (b - a);
  }
  function frame(svg, X, Y, x0, x1, y0, y1, log) {
    for (const t of log ? decades(y0, y1) : niceTicks(y0, y1, 5)) {
      svgEl("line", {x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t), class: "grid"}, svg);
      label(svg, M.l - 6, Y(t) + 4, fmt(t), "tick", "end");
    }
    for (const t of niceTicks(x0, x1, 7).filter(Number.isInteger)) {
      svgEl("line", {x1: X(t), x2: X(t), y1: H - M.b, y2: H - M.b + 4, class: "axis"}, svg);
      label(svg, X(t), H - M.b + 16, fmt(t), "tick");
    }
    svgEl("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis"}, svg);
    svgEl("line", {x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, class: "axis"}, svg);
    label(svg, (M.l + W - M.r) / 2, H - 4, "step", "axis-label");
  }
  function hover(host, svg, X, steps, rows, height) {
    height = height || H;
    const tip = host.querySelector(".tip");
    const cross = svgEl("line", {y1: M.t, y2: height - M.b, class: "cross", visibility: "hidden"}, svg);
    const overlay = svgEl("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: height - M.t - M.b,
                                   class: "overlay"}, svg);
    overlay.addEventListener("mousemove", (ev) => {
      const box = svg.getBoundingClientRect(), px = ((ev.clientX - box.left) * W) / box.width;
      const step = steps.reduce((best, s) => (Math.abs(X(s) - px) < Math.abs(X(best) - px) ? s : best));
      cross.setAttribute("x1", X(step)); cross.setAttribute("x2", X(step));
      cross.setAttribute("visibility", "visible");
      tip.innerHTML = "";
      const head = document.createElement("b"); head.textContent = "step " + step; tip.appendChild(head);
      for (const [name, color, text] of rows(step)) {
        const row = document.createElement("div");
        row.innerHTML = `<span class="swatch" style="background:${color}"></span>`;
        row.append(`${name}: ${text}`);
        tip.appendChild(row);
      }
      tip.style.left = Math.min((X(step) / W) * box.width + 12, box.width - 220) + "px";
      tip.style.display = "block";
    });
    overlay.addEventListener("mouseleave", () => {
      cross.setAttribute("visibility", "hidden"); tip.style.display = "none";
    });
  }

  function lineChart(host, spec) {
    const hidden = new Set(), svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, class: "plot"});
    let log = spec.log;
    const tools = document.createElement("div"), legend = document.createElement("div");
    tools.className = "tools"; legend.className = "legend";
    host.append(tools, svg, legend);
    host.insertAdjacentHTML("beforeend", '<div class="tip"></div>');
    const logBox = document.createElement("label");
    logBox.innerHTML = `<input type="checkbox"${log ? " checked" : ""}> log scale`;
    logBox.firstChild.addEventListener("change", (ev) => { log = ev.target.checked; draw(); });
    tools.appendChild(logBox);
    spec.series.forEach((s, i) => {
      const key = document.createElement("button");
      key.className = "key"; key.title = "show / hide " + s.name;
      key.innerHTML = `<span class="swatch" style="background:${COLORS[i % COLORS.length]}"></span>`;
      key.append(s.name);
      key.addEventListener("click", () => {
        hidden.has(i) ? hidden.delete(i) : hidden.add(i);
        key.classList.toggle("off"); draw();
      });
      legend.appendChild(key);
    });
    function draw() {
      svg.replaceChildren();
      const ok = (v) => v !== null && Number.isFinite(v) && (!log || v > 0);
      const shown = spec.series.map((s, i) => [s, i]).filter(([, i]) => !hidden.has(i));
      const xs = [], ys = spec.ref === null || (log && spec.ref <= 0) ? [] : [spec.ref];
      for (const [s] of shown) for (const [x, y] of s.points) { xs.push(x); if (ok(y)) ys.push(y); }
      if (!xs.length || ys.length < (spec.ref === null ? 1 : 2)) {
        label(svg, W / 2, H / 2, log ? "no positive values to show on a log scale" : "no data", "empty");
        return;
      }
      let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      if (x0 === x1) { x0 -= 1; x1 += 1; }
      if (log) {
        y0 = Math.pow(10, Math.floor(Math.log10(y0))); y1 = Math.pow(10, Math.ceil(Math.log10(y1)));
        if (y0 === y1) y1 *= 10;
      } else {
        const pad = (y1 - y0) * 0.06 || Math.abs(y1) * 0.1 || 1;
        [y0, y1] = [y0 - pad, y1 + pad];
      }
      const X = scale(x0, x1, M.l, W - M.r, false), Y = scale(y0, y1, H - M.b, M.t, log);
      frame(svg, X, Y, x0, x1, y0, y1, log);
      for (const m of spec.markers || []) {
        if (m.step < x0 || m.step > x1) continue;
        const line = svgEl("line", {x1: X(m.step), x2: X(m.step), y1: M.t, y2: H - M.b, class: "marker",
                                    stroke: SEVERITY[m.severity] || SEVERITY.unknown}, svg);
        svgEl("title", {}, line).textContent = `step ${m.step}: ${m.text}`;
      }
      if (spec.ref !== null && ok(spec.ref)) {
        svgEl("line", {x1: M.l, x2: W - M.r, y1: Y(spec.ref), y2: Y(spec.ref), class: "ref"}, svg);
        label(svg, W - M.r - 4, Y(spec.ref) - 4, spec.ref_label || "reference " + fmt(spec.ref), "ref-label", "end");
      }
      for (const [s, i] of shown) {
        const color = COLORS[i % COLORS.length];
        let d = "", pen = "M";
        for (const [x, y] of s.points) {
          if (!ok(y)) { pen = "M"; continue; }
          d += `${pen}${X(x).toFixed(1)},${Y(y).toFixed(1)}`; pen = "L";
          svgEl("circle", {cx: X(x), cy: Y(y), r: 2.6, fill: color, class: "point"}, svg);
        }
        svgEl("path", {d, stroke: color, class: "series", "data-series": s.name}, svg);
      }
      const steps = [...new Set(xs)].sort((a, b) => a - b);
      hover(host, svg, X, steps, (step) => shown.map(([s, i]) => {
        const hit = s.points.find(([x]) => x === step);
        return [s.name, COLORS[i % COLORS.length], hit ? fmt(hit[1]) : "–"];
      }));
    }
    draw();
  }

  function timeline(host, alerts, span) {
    const rows = ["critical", "warning", "info", "unknown"].filter((r) => alerts.some((a) => a.severity === r));
    const h = M.t + M.b + 34 * Math.max(rows.length, 1), svg = svgEl("svg", {viewBox: `0 0 ${W} ${h}`,
                                                                              class: "plot"});
    host.append(svg);
    host.insertAdjacentHTML("beforeend", '<div class="tip"></div>');
    let [x0, x1] = span;
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const X = scale(x0, x1, M.l, W - M.r, false), Y = (r) => M.t + 17 + 34 * rows.indexOf(r);
    for (const t of niceTicks(x0, x1, 7).filter(Number.isInteger)) label(svg, X(t), h - M.b + 16, fmt(t), "tick");
    svgEl("line", {x1: M.l, x2: W - M.r, y1: h - M.b, y2: h - M.b, class: "axis"}, svg);
    label(svg, (M.l + W - M.r) / 2, h - 4, "step", "axis-label");
    for (const r of rows) {
      label(svg, M.l - 6, Y(r) + 4, r, "tick", "end");
      const here = {};
      for (const a of alerts.filter((a) => a.severity === r)) (here[a.step] = here[a.step] || []).push(a);
      for (const [step, list] of Object.entries(here)) {
        const dot = svgEl("circle", {cx: X(+step), cy: Y(r), r: 4 + 2 * Math.min(list.length - 1, 4),
                                     fill: SEVERITY[r], class: "alert-dot"}, svg);
        svgEl("title", {}, dot).textContent = list.map((a) => `step ${a.step} ${a.rule}: ${a.message}`)
          .join("\n");
      }
    }
    const steps = [...new Set(alerts.map((a) => a.step))].sort((a, b) => a - b);
    if (steps.length) hover(host, svg, X, steps, (step) => alerts.filter((a) => a.step === step)
      .map((a) => [a.rule, SEVERITY[a.severity] || SEVERITY.unknown, a.message]), h);
  }

  document.querySelectorAll("div.chart").forEach((host) => lineChart(host, DATA.charts[+host.dataset.chart]));
  document.querySelectorAll("div.timeline").forEach((host) => timeline(host, DATA.alerts, DATA.span));
  document.body.dataset.rendered = "yes";
})();
