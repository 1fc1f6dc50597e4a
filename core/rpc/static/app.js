// The headscope dashboard: pages over the service's read-only JSON-RPC methods.
// Routes live in the URL hash, so every page can be bookmarked:
//   #/runs?analysis=&model=&status=&offset=   runs, filtered, with live progress
//   #/run/ID?metric=                          one run: heatmap, metrics, params, artifacts
//   #/head/MODEL/LAYER/HEAD                   one head across every run on that model
//   #/compare?a=ID&b=ID                       two runs side by side, with their overlap
// Every value from the store is inserted as text, never as HTML.

const TOKEN_KEY = "headscope-token";
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"];
const PAGE_SIZE = 50;
const POLL_MS = 2000;

const page = document.getElementById("page");
const notice = document.getElementById("notice");
let nextId = 1;
let pollTimer = null;
let routeCount = 0; // a page drawn for an older route stops updating

// ---------------------------------------------------------------------------
// JSON-RPC
// ---------------------------------------------------------------------------
class RpcError extends Error {
  constructor(error) {
    super(`${error.message} (${error.code})`);
    this.code = error.code;
  }
}

async function rpc(method, params = {}) {
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch("/rpc", {
    method: "POST",
    headers,
    body: JSON.stringify({ jsonrpc: "2.0", method, params, id: nextId++ }),
  });
  if (response.status === 401) {
    throw new RpcError({ code: 401, message: "this server needs a bearer token: enter it above" });
  }
  const body = await response.json();
  if (body.error) throw new RpcError(body.error);
  return body.result;
}

// ---------------------------------------------------------------------------
// small DOM helpers
// ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function table(columns, rows, attrs = {}) {
  return el(
    "table",
    attrs,
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))),
  );
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) >= 1000 || (value !== 0 && Math.abs(value) < 0.001)
      ? value.toExponential(3)
      : value.toFixed(4);
  }
  return String(value);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function runLink(id) {
  return el("a", { href: `#/run/${id}` }, `#${id}`);
}

function headHash(model, layer, head) {
  return `#/head/${encodeURIComponent(model)}/${layer}/${head}`;
}

function headLink(model, layer, head) {
  return el("a", { href: headHash(model, layer, head) }, `${layer}.${head}`);
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}` }, status);
}

function progress(run) {
  if (run.status !== "running" && run.status !== "queued") return "";
  const done = run.progress_done ?? 0;
  const total = run.progress_total || 0;
  const share = total ? Math.min(1, done / total) : 0;
  return el(
    "div",
    { class: "progress", title: run.progress_message || "" },
    el("progress", { max: "1", value: String(share) }),
    el("span", {}, total ? `${Math.round(share * 100)}%` : run.status, " ", run.progress_message || ""),
  );
}

function show(...children) {
  page.replaceChildren(...children);
}

function showError(error) {
  notice.hidden = false;
  notice.textContent = error.message;
}

function clearError() {
  notice.hidden = true;
  notice.textContent = "";
}

function poll(route, again) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(() => {
    if (route === routeCount) again().catch(showError);
  }, POLL_MS);
}

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query) };
}

// ---------------------------------------------------------------------------
// heatmaps
// ---------------------------------------------------------------------------
/** layer x head grid of one metric's scores; null where a head has none. */
function grid(scores, metric) {
  const rows = scores.filter((s) => s.metric === metric);
  const layers = Math.max(0, ...scores.map((s) => s.layer + 1));
  const heads = Math.max(0, ...scores.map((s) => s.head + 1));
  const z = Array.from({ length: layers }, () => Array(heads).fill(null));
  for (const s of rows) z[s.layer][s.head] = s.value;
  return { z, layers, heads };
}

function drawHeatmap(target, scores, metric, model, marks = []) {
  const { z, layers, heads } = grid(scores, metric);
  const traces = [
    {
      type: "heatmap",
      z,
      x: [...Array(heads).keys()],
      y: [...Array(layers).keys()],
      colorscale: "Viridis",
      hoverongaps: false,
      colorbar: { title: { text: metric, side: "right" } },
      hovertemplate: `layer %{y}, head %{x}<br>${metric}: %{z:.4f}<extra></extra>`,
    },
  ];
  for (const mark of marks) {
    traces.push({
      type: "scatter",
      mode: "markers",
      name: mark.name,
      x: mark.heads.map((h) => h[1]),
      y: mark.heads.map((h) => h[0]),
      marker: { symbol: mark.symbol, size: 11, color: mark.color, line: { width: 1, color: "#000" } },
      hovertemplate: `layer %{y}, head %{x}: ${mark.name}<extra></extra>`,
    });
  }
  const layout = {
    margin: { l: 60, r: 20, t: 10, b: 50 },
    height: Math.max(260, Math.min(720, 40 + layers * 24)),
    xaxis: { title: { text: "head" }, dtick: heads > 24 ? undefined : 1, constrain: "domain" },
    yaxis: { title: { text: "layer" }, dtick: layers > 24 ? undefined : 1 },
    showlegend: marks.length > 0,
    legend: { orientation: "h", y: -0.2 },
  };
  window.Plotly.newPlot(target, traces, layout, { responsive: true, displaylogo: false });
  target.on("plotly_click", (event) => {
    const point = event.points[0];
    location.hash = headHash(model, point.y, point.x);
  });
}

// ---------------------------------------------------------------------------
// pages
// ---------------------------------------------------------------------------
async function runsPage(route, query) {
  const filters = {};
  for (const key of ["analysis", "model", "status"]) if (query.get(key)) filters[key] = query.get(key);
  const offset = Number(query.get("offset") || 0);
  const [analyses, models] = await Promise.all([rpc("analyses.list"), rpc("models.list")]);

  const select = (name, options) =>
    el(
      "select",
      { name, id: `filter-${name}` },
      el("option", { value: "" }, `any ${name}`),
      options.map((o) => el("option", { value: o, selected: filters[name] === o }, o)),
    );
  const form = el(
    "form",
    {
      class: "filters",
      onchange: (event) => {
        const params = new URLSearchParams();
        for (const field of event.currentTarget.elements) if (field.value) params.set(field.name, field.value);
        location.hash = `#/runs?${params}`;
      },
      onsubmit: (event) => event.preventDefault(),
    },
    select("analysis", analyses.map((a) => a.name)),
    select("model", [...new Set([...models.map((m) => m.name), filters.model].filter(Boolean))]),
    select("status", STATUSES),
  );
  const chosen = new Set();
  const compareButton = el("button", { type: "button", disabled: true }, "Compare the two selected");
  compareButton.addEventListener("click", () => {
    const [a, b] = [...chosen];
    location.hash = `#/compare?a=${a}&b=${b}`;
  });
  const body = el("div", { id: "runs" });
  show(el("h1", {}, "Runs"), form, body, el("p", {}, compareButton));

  const refresh = async () => {
    const result = await rpc("runs.list", { ...filters, limit: PAGE_SIZE, offset });
    if (route !== routeCount) return;
    const rows = result.runs.map((run) => [
      el("input", {
        type: "checkbox",
        "aria-label": `select run ${run.id}`,
        checked: chosen.has(run.id),
        disabled: run.status !== "succeeded",
        onchange: (event) => {
          if (event.target.checked) chosen.add(run.id);
          else chosen.delete(run.id);
          compareButton.disabled = chosen.size !== 2;
        },
      }),
      runLink(run.id),
      run.analysis,
      run.model,
      statusBadge(run.status),
      progress(run) || (run.error ? el("span", { class: "error" }, run.error) : ""),
      run.created_at ? new Date(run.created_at).toLocaleString() : "–",
      duration(run.duration_seconds),
    ]);
    const pager = el(
      "p",
      { class: "pager" },
      `${result.total} run${result.total === 1 ? "" : "s"}`,
      offset > 0 ? el("a", { href: pageHash(query, Math.max(0, offset - PAGE_SIZE)) }, "newer") : null,
      offset + PAGE_SIZE < result.total ? el("a", { href: pageHash(query, offset + PAGE_SIZE) }, "older") : null,
    );
    const runsTable = table(["", "run", "analysis", "model", "status", "progress", "created", "took"], rows, {
      id: "runs-table",
      "data-filters": location.hash,
    });
    result.runs.forEach((run, i) => runsTable.tBodies[0].rows[i].setAttribute("data-run", String(run.id)));
    body.replaceChildren(rows.length ? runsTable : el("p", { class: "muted" }, "No runs match."), pager);
    if (result.runs.some((run) => run.status === "queued" || run.status === "running")) poll(route, refresh);
  };
  await refresh();
}

function pageHash(query, offset) {
  const params = new URLSearchParams(query);
  params.set("offset", String(offset));
  return `#/runs?${params}`;
}

async function runPage(route, runId, query) {
  const [doc, analyses] = await Promise.all([rpc("runs.get", { run_id: runId }), rpc("analyses.list")]);
  if (route !== routeCount) return;
  const run = doc.run;
  const metrics = [...new Set(doc.head_scores.map((s) => s.metric))].sort();
  const primary = analyses.find((a) => a.name === run.analysis)?.primary_metric;
  let metric = query.get("metric");
  if (!metrics.includes(metric)) metric = metrics.includes(primary) ? primary : metrics[0];

  const header = el(
    "div",
    { class: "run-header" },
    el("h1", {}, `Run #${run.id}: ${run.analysis} on ${run.model} `, statusBadge(run.status)),
    progress(run),
    run.error ? el("p", { class: "error" }, run.error) : null,
  );
  const sections = [header];
  if (metrics.length) {
    const picker = el(
      "select",
      {
        id: "metric",
        onchange: (event) => {
          location.hash = `#/run/${run.id}?metric=${encodeURIComponent(event.target.value)}`;
        },
      },
      metrics.map((m) => el("option", { value: m, selected: m === metric }, m)),
    );
    const plot = el("div", { id: "heatmap", class: "plot" });
    const top = doc.head_scores
      .filter((s) => s.metric === metric && s.value !== null)
      .sort((x, y) => y.value - x.value)
      .slice(0, 10);
    sections.push(
      el("section", {}, el("h2", {}, "Heads by ", picker), el("p", { class: "muted" }, "Hover for a score; click a head to see it across runs."), plot),
      el(
        "section",
        {},
        el("h2", {}, `Top heads by ${metric}`),
        table(["head", metric], top.map((s) => [headLink(run.model, s.layer, s.head), fmt(s.value)]), { id: "top-heads" }),
      ),
    );
    requestAnimationFrame(() => drawHeatmap(plot, doc.head_scores, metric, run.model));
  } else if (run.status === "succeeded") {
    sections.push(el("p", { class: "muted" }, "This run stored no head scores."));
  }
  const metricRows = Object.entries(doc.metrics).map(([name, value]) => [name, fmt(value)]);
  sections.push(
    el("section", {}, el("h2", {}, "Metrics"), metricRows.length ? table(["metric", "value"], metricRows, { id: "metrics" }) : el("p", { class: "muted" }, "none")),
    el("section", {}, el("h2", {}, "Params"), el("pre", { id: "params" }, JSON.stringify(run.params, null, 2))),
    el(
      "section",
      {},
      el("h2", {}, "Artifacts"),
      doc.artifacts.length
        ? table(
            ["name", "type", "size", "description", "path on the server"],
            doc.artifacts.map((a) => [a.name, a.media_type, `${a.size} B`, a.description || "", el("code", {}, a.path)]),
            { id: "artifacts" },
          )
        : el("p", { class: "muted" }, "none"),
    ),
    el(
      "section",
      {},
      el("h2", {}, "Run"),
      table(
        ["field", "value"],
        [
          ["analysis version", run.analysis_version],
          ["plugin", run.plugin ?? "–"],
          ["model revision", run.model_revision ?? "–"],
          ["seed", run.seed],
          ["created", run.created_at ?? "–"],
          ["started", run.started_at ?? "–"],
          ["finished", run.finished_at ?? "–"],
          ["took", duration(run.duration_seconds)],
        ],
      ),
    ),
  );
  show(...sections);
  if (run.status === "queued" || run.status === "running") {
    poll(route, () => runPage(route, runId, query));
  }
}

async function headPage(route, model, layer, head) {
  const found = await rpc("findings.head", { layer, head, model });
  if (route !== routeCount) return;
  const title = el("h1", {}, `Head ${layer}.${head} on ${model}`);
  if (!found.runs.length) {
    show(title, el("p", { class: "muted" }, "No succeeded run on this model has scores for this head."));
    return;
  }
  const cards = found.runs.map((entry) => {
    const rows = Object.entries(entry.scores).map(([name, value]) => [
      name === entry.primary_metric ? el("strong", {}, name) : name,
      fmt(value),
    ]);
    return el(
      "section",
      { class: "card head-run", "data-run": entry.run_id },
      el("h2", {}, runLink(entry.run_id), ` ${entry.analysis}`),
      entry.rank
        ? el("p", { class: "rank" }, `rank ${entry.rank} of ${entry.heads} by ${entry.primary_metric}`)
        : null,
      table(["metric", "value"], rows),
    );
  });
  show(
    title,
    el("p", { class: "muted" }, `${found.runs.length} succeeded run(s), newest first; each run's primary metric in bold, and the head's rank among the run's heads by it.`),
    el("div", { class: "cards", id: "head-runs" }, cards),
  );
}

async function comparePage(route, query) {
  const a = query.get("a") || "";
  const b = query.get("b") || "";
  const topK = query.get("top_k") || "";
  const form = el(
    "form",
    {
      class: "filters",
      onsubmit: (event) => {
        event.preventDefault();
        const params = new URLSearchParams();
        for (const field of event.currentTarget.elements) if (field.name && field.value) params.set(field.name, field.value);
        location.hash = `#/compare?${params}`;
      },
    },
    el("label", {}, "run A ", el("input", { name: "a", type: "number", min: "1", value: a, required: true })),
    el("label", {}, "run B ", el("input", { name: "b", type: "number", min: "1", value: b, required: true })),
    el("label", {}, "top k ", el("input", { name: "top_k", type: "number", min: "1", value: topK, placeholder: "each analysis's rule" })),
    el("button", { type: "submit" }, "Compare"),
  );
  if (!a || !b) {
    show(el("h1", {}, "Compare two runs"), form, el("p", { class: "muted" }, "Pick two succeeded runs (or tick two on the runs page)."));
    return;
  }
  const params = { run_a: Number(a), run_b: Number(b) };
  if (topK) params.top_k = Number(topK);
  const [comparison, docA, docB] = await Promise.all([
    rpc("runs.compare", params),
    rpc("runs.get", { run_id: Number(a) }),
    rpc("runs.get", { run_id: Number(b) }),
  ]);
  if (route !== routeCount) return;
  const shared = new Set(comparison.shared_heads.map((h) => h.join(".")));
  const side = (info, doc, id) => {
    const plot = el("div", { class: "plot", id });
    const own = info.heads.filter((h) => !shared.has(h.join(".")));
    requestAnimationFrame(() =>
      drawHeatmap(plot, doc.head_scores, info.metric, info.model, [
        { name: "in this run's set", heads: own, symbol: "circle-open", color: "#e45756" },
        { name: "shared", heads: comparison.shared_heads, symbol: "star", color: "#f58518" },
      ]),
    );
    return el(
      "section",
      { class: "side" },
      el("h2", {}, runLink(info.run_id), ` ${info.analysis} on ${info.model}`),
      el("p", { class: "muted" }, `${info.metric}; head set: ${info.rule} ${fmt(info.value)} (${info.heads.length} heads)`),
      plot,
    );
  };
  const summary = table(
    ["heads in A", "heads in B", "shared", "union", "Jaccard", "overlap coefficient"],
    [[comparison.size_a, comparison.size_b, comparison.intersection, comparison.union, fmt(comparison.jaccard), fmt(comparison.overlap_coefficient)]],
    { id: "overlap" },
  );
  const bands = table(
    ["band", "layers", "A", "B", "shared", "Jaccard", "overlap coefficient"],
    comparison.bands.map((band) => [band.band, band.layers.join("–"), band.size_a, band.size_b, band.intersection, fmt(band.jaccard), fmt(band.overlap_coefficient)]),
  );
  const sharedList = comparison.shared_heads.length
    ? el("p", {}, "Shared heads: ", comparison.shared_heads.map((h, i) => [i ? ", " : "", headLink(comparison.a.model, h[0], h[1])]))
    : el("p", { class: "muted" }, "No shared heads.");
  show(
    el("h1", {}, `Run #${a} and run #${b}`),
    form,
    el("section", {}, el("h2", {}, "Overlap"), summary, sharedList, el("h3", {}, "By layer band"), bands),
    el("div", { class: "sides" }, side(comparison.a, docA, "heatmap-a"), side(comparison.b, docB, "heatmap-b")),
  );
}

// ---------------------------------------------------------------------------
// routing
// ---------------------------------------------------------------------------
async function route() {
  const current = ++routeCount;
  clearTimeout(pollTimer);
  clearError();
  const { parts, query } = parseHash();
  const [name, ...rest] = parts;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === `#/${name || "runs"}`);
  }
  try {
    if (name === "run" && /^\d+$/.test(rest[0] || "")) await runPage(current, Number(rest[0]), query);
    else if (name === "head" && rest.length === 3 && /^\d+$/.test(rest[1]) && /^\d+$/.test(rest[2]))
      await headPage(current, rest[0], Number(rest[1]), Number(rest[2]));
    else if (name === "compare") await comparePage(current, query);
    else await runsPage(current, query);
  } catch (error) {
    if (current !== routeCount) return;
    showError(error);
    if (page.querySelector("p.muted")?.textContent === "Loading…") show(el("p", { class: "muted" }, "Nothing to show."));
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("token").value = "";
  route();
});
window.addEventListener("hashchange", route);
window.addEventListener("load", route);
