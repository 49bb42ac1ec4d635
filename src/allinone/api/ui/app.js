// allinone's page: try every task and watch the server's health. Plain browser JavaScript, no
// build step; charts are uPlot (vendored, see vendor/README.md). Talks only to this server:
// /ui/config and /health/history (public), the /v1 routes (with the API key when one is needed).
"use strict";

const I18N = {
  en: {
    language: "Language", key_needed: "This server requires an API key.", api_key: "API key",
    use_key: "Use key", key_wrong: "That key was refused; check it and try again.",
    classify: "Classify", decide: "Decide", chat: "Chat", extract: "Extract", health: "Health",
    task: "Task", texts_hint: "Text (or one text per line)", one_per_line: "Each line is a text",
    decide_text: "Text to decide about", questions: "Questions", add_question: "Add a question",
    remove: "Remove", predicate: "Yes / no", choice: "Choice", question: "Question",
    options: "Options, comma-separated", message: "Message", send: "Send", stop: "Stop",
    clear: "New chat", text: "Text", memory_mb: "Memory (MB), last hour",
    load: "Queue and active sequences", rates: "Generated tokens/s and requests/s",
    latency: "latency", server_ms: "server", round_trip: "round trip", tokens: "tokens",
    stopped: "stopped", finish: "finish", yes: "yes", no: "no", loading: "loading the model…",
    ready: "ready", not_ready: "not ready", unreachable: "server unreachable",
    rss: "RSS", anon: "RssAnon + swap", queue: "queue", active: "active",
    tok_s: "tokens/s", req_s: "requests/s", status: "status", no_tasks: "(no task of this kind)",
    model_itself: "the model itself", q_complaint: "Is the text a complaint?",
    q_topic: "What is the complaint about?", q_topic_options: "delivery, payment, product, staff",
    sample_text: "The parcel came two weeks late and the box was crushed.",
  },
  zh: {
    language: "语言", key_needed: "此服务器需要 API 密钥。", api_key: "API 密钥",
    use_key: "使用密钥", key_wrong: "密钥被拒绝，请检查后重试。",
    classify: "分类", decide: "判断", chat: "对话", extract: "抽取", health: "健康状况",
    task: "任务", texts_hint: "文本（或每行一条）", one_per_line: "每行是一条文本",
    decide_text: "要判断的文本", questions: "问题", add_question: "添加问题",
    remove: "删除", predicate: "是 / 否", choice: "选择", question: "问题",
    options: "选项，用逗号分隔", message: "消息", send: "发送", stop: "停止",
    clear: "新对话", text: "文本", memory_mb: "内存（MB），最近一小时",
    load: "队列与活动序列", rates: "每秒生成词元与每秒请求",
    latency: "延迟", server_ms: "服务器", round_trip: "往返", tokens: "词元",
    stopped: "已停止", finish: "结束原因", yes: "是", no: "否", loading: "正在加载模型…",
    ready: "就绪", not_ready: "未就绪", unreachable: "无法连接服务器",
    rss: "常驻内存", anon: "匿名内存 + 交换", queue: "队列", active: "活动",
    tok_s: "词元/秒", req_s: "请求/秒", status: "状态", no_tasks: "（没有此类任务）",
    model_itself: "模型本身", q_complaint: "这段文字是投诉吗？",
    q_topic: "投诉的是什么？", q_topic_options: "物流, 付款, 商品, 员工",
    sample_text: "快递晚到了两周，箱子也压坏了。",
  },
};

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...kids) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const k of kids) node.append(k);
  return node;
};

const state = {
  lang: localStorage.getItem("allinone.lang")
    || ((navigator.language || "").toLowerCase().startsWith("zh") ? "zh" : "en"),
  key: sessionStorage.getItem("allinone.key") || "",
  authRequired: false,
  model: "",
  tasks: [],
  chat: [],
  chatAbort: null,
  charts: {},
};

function t(key) {
  return (I18N[state.lang] || {})[key] || I18N.en[key] || key;
}

function applyLang() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  $("#lang").value = state.lang;
  for (const row of document.querySelectorAll(".question")) labelQuestionRow(row);
  fillTaskSelects();
}

// -- talking to the server ------------------------------------------------------------------

class ApiError extends Error {}

async function api(path, body, { signal, raw } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const res = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (res.status === 401) {
    askKey(t("key_wrong"));
    throw new ApiError(t("key_wrong"));
  }
  if (!res.ok) {
    let message = res.statusText;
    try {
      const j = await res.json();
      const e = j.error || j;
      message = e.message || (Array.isArray(j.detail) ? j.detail.map((d) => d.msg).join("; ") : j.detail) || message;
      if (e.param) message += ` (${e.param})`;
    } catch (_) { /* not JSON: keep the status text */ }
    throw new ApiError(`${res.status}: ${message}`);
  }
  return raw ? res : res.json();
}

function showError(panel, err) {
  $(`#${panel}-error`).textContent = err ? String(err.message || err) : "";
}

// -- API key ----------------------------------------------------------------------------------

function askKey(message = "") {
  $("#key-form").hidden = false;
  $("#key-error").textContent = message;
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.key = $("#key-input").value.trim();
  try {
    await loadTasks();
    sessionStorage.setItem("allinone.key", state.key);
    $("#key-form").hidden = true;
    $("#key-error").textContent = "";
  } catch (err) {
    $("#key-error").textContent = String(err.message || err);
  }
});

// -- tabs (arrow keys move between them, as WAI-ARIA's tabs pattern) ---------------------------

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const on = other === tab;
    other.setAttribute("aria-selected", String(on));
    other.tabIndex = on ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !on;
  }
  if (tab.id === "tab-health") drawCharts();
}

const tabs = [...document.querySelectorAll('[role="tab"]')];
for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (ev) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
    if (!step) return;
    const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
    selectTab(next);
    next.focus();
  });
}

// Ctrl/Cmd+Enter in a text area submits its form.
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && ev.target.form) {
    ev.preventDefault();
    ev.target.form.requestSubmit();
  }
});

// -- tasks ------------------------------------------------------------------------------------

async function loadTasks() {
  const data = await api("/v1/tasks");
  state.tasks = data.data || [];
  fillTaskSelects();
}

function fillTaskSelects() {
  const fill = (select, kind, extra = []) => {
    const keep = select.value;
    const names = state.tasks.filter((x) => x.kind === kind).map((x) => x.name);
    const options = [...names.map((n) => [n, n]), ...extra];
    select.replaceChildren(...options.map(([value, label]) => el("option", { value, textContent: label })));
    if (!options.length) select.append(el("option", { value: "", textContent: t("no_tasks") }));
    if (options.some(([v]) => v === keep)) select.value = keep;
  };
  fill($("#classify-task"), "classify");
  fill($("#chat-task"), "chat", state.model ? [[state.model, `${t("model_itself")} (${state.model})`]] : []);
  fill($("#extract-task"), "extract");
}

// -- probability bars -------------------------------------------------------------------------

function bars(rows, best) {
  // rows: [[label, probability]]; the best label is marked for screen readers as well.
  return el("div", { className: "bars" }, ...rows.map(([label, p]) => {
    const pct = Math.max(0, Math.min(1, p)) * 100;
    const row = el("div", { className: `bar-row${label === best ? " best" : ""}` },
      el("span", { className: "bar-label", textContent: label }),
      el("span", { className: "bar-track" }, el("span", { className: "bar-fill", style: `width:${pct.toFixed(1)}%` })),
      el("span", { className: "bar-value", textContent: p.toFixed(3) }));
    row.setAttribute("role", "meter");
    row.setAttribute("aria-valuemin", "0");
    row.setAttribute("aria-valuemax", "1");
    row.setAttribute("aria-valuenow", p.toFixed(3));
    row.setAttribute("aria-label", label);
    return row;
  }));
}

// -- classify ---------------------------------------------------------------------------------

$("#classify-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("classify", null);
  const raw = $("#classify-input").value;
  const many = $("#classify-many").checked;
  const texts = many ? raw.split("\n").map((s) => s.trim()).filter(Boolean) : [raw];
  const t0 = performance.now();
  try {
    const res = await api("/v1/classify", { task: $("#classify-task").value, input: many ? texts : raw });
    const ms = performance.now() - t0;
    $("#classify-meta").textContent =
      `${t("latency")}: ${t("server_ms")} ${res.latency_ms.toFixed(0)} ms, ${t("round_trip")} ${ms.toFixed(0)} ms · ${res.usage.prompt_tokens} ${t("tokens")}`;
    $("#classify-results").replaceChildren(...res.results.map((r) => el("div", { className: "result" },
      el("p", { className: "result-text", textContent: texts[r.index] }),
      el("p", { className: "label", textContent: r.label }),
      bars(Object.entries(r.scores), r.label))));
  } catch (err) {
    showError("classify", err);
  }
});

// -- decide -----------------------------------------------------------------------------------

function labelQuestionRow(row) {
  row.querySelector(".q-type").setAttribute("aria-label", t("question"));
  row.querySelector(".q-type option[value=predicate]").textContent = t("predicate");
  row.querySelector(".q-type option[value=choice]").textContent = t("choice");
  row.querySelector(".q-text").placeholder = t("question");
  row.querySelector(".q-text").setAttribute("aria-label", t("question"));
  row.querySelector(".q-options").placeholder = t("options");
  row.querySelector(".q-options").setAttribute("aria-label", t("options"));
  row.querySelector(".q-remove").textContent = t("remove");
}

function addQuestion(type = "predicate", text = "", options = "") {
  const kind = el("select", { className: "q-type" },
    el("option", { value: "predicate" }), el("option", { value: "choice" }));
  kind.value = type;
  const opts = el("input", { className: "q-options", value: options });
  opts.hidden = type !== "choice";
  kind.addEventListener("change", () => { opts.hidden = kind.value !== "choice"; });
  const row = el("div", { className: "question" }, kind,
    el("input", { className: "q-text", value: text, required: true }), opts,
    el("button", { type: "button", className: "q-remove" }));
  row.querySelector(".q-remove").addEventListener("click", () => row.remove());
  labelQuestionRow(row);
  $("#decide-questions").append(row);
  return row;
}

$("#decide-add").addEventListener("click", () => addQuestion().querySelector(".q-text").focus());

$("#decide-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("decide", null);
  const rows = [...document.querySelectorAll("#decide-questions .question")];
  const questions = rows.map((row, i) => {
    const q = { type: row.querySelector(".q-type").value, name: `q${i + 1}`, instructions: row.querySelector(".q-text").value };
    if (q.type === "choice") {
      q.choices = row.querySelector(".q-options").value.split(/[,，]/).map((s) => s.trim()).filter(Boolean).map((value) => ({ value }));
    }
    return q;
  });
  const t0 = performance.now();
  try {
    const res = await api("/v1/decisions", { model: state.model || "default", input: $("#decide-input").value, questions });
    $("#decide-meta").textContent =
      `${t("latency")}: ${t("round_trip")} ${(performance.now() - t0).toFixed(0)} ms · ${res.usage.input_tokens} ${t("tokens")}`;
    $("#decide-results").replaceChildren(...res.answers.map((a, i) => {
      const head = el("p", { className: "result-text", textContent: questions[i].instructions });
      if (a.type === "predicate") {
        // the answer the probability points to, with both outcomes' bars (P(no) = 1 - P(yes))
        const answer = a.probability >= 0.5 ? t("yes") : t("no");
        return el("div", { className: "result" }, head,
          el("p", { className: "label", textContent: answer }),
          bars([[t("yes"), a.probability], [t("no"), 1 - a.probability]], answer));
      }
      return el("div", { className: "result" }, head,
        el("p", { className: "label", textContent: String(a.choice) }),
        bars(a.probabilities.map((p) => [String(p.value), p.probability]), String(a.choice)));
    }));
  } catch (err) {
    showError("decide", err);
  }
});

// -- chat (streamed; Stop aborts the request, which cancels its work on the server) ------------

function chatBubble(role, text) {
  const node = el("div", { className: `msg ${role}` }, el("span", { className: "who", textContent: role }),
    el("span", { className: "text", textContent: text }));
  $("#chat-log").append(node);
  node.scrollIntoView({ block: "end" });
  return node.querySelector(".text");
}

function chatBusy(busy) {
  $("#chat-send").disabled = busy;
  $("#chat-stop").disabled = !busy;
}

async function readStream(res, onChunk) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new ApiError(chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}

$("#chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("chat", null);
  const text = $("#chat-input").value.trim();
  if (!text || state.chatAbort) return;
  $("#chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  chatBubble("user", text);
  const out = chatBubble("assistant", "");
  out.parentElement.classList.add("streaming");
  const abort = new AbortController();
  state.chatAbort = abort;
  chatBusy(true);
  let reply = "", finish = "", usage = null;
  const t0 = performance.now();
  try {
    const res = await api("/v1/chat/completions", {
      model: $("#chat-task").value, messages: state.chat, stream: true,
      stream_options: { include_usage: true },
    }, { signal: abort.signal, raw: true });
    await readStream(res, (chunk) => {
      const choice = (chunk.choices || [])[0];
      if (choice && choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        out.textContent = reply;
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.usage) usage = chunk.usage;
    });
  } catch (err) {
    if (err.name === "AbortError") finish = t("stopped");
    else showError("chat", err);
  } finally {
    state.chatAbort = null;
    chatBusy(false);
    out.parentElement.classList.remove("streaming");
  }
  if (reply) state.chat.push({ role: "assistant", content: reply });
  const secs = (performance.now() - t0) / 1000;
  $("#chat-meta").textContent = `${t("finish")}: ${finish || "?"} · ${secs.toFixed(1)} s`
    + (usage ? ` · ${usage.completion_tokens} ${t("tokens")}` : "");
  $("#chat-meta").dataset.finish = finish;
});

$("#chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
$("#chat-clear").addEventListener("click", () => {
  if (state.chatAbort) state.chatAbort.abort();
  state.chat = [];
  $("#chat-log").replaceChildren();
  $("#chat-meta").textContent = "";
});

// -- extract ----------------------------------------------------------------------------------

$("#extract-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("extract", null);
  const t0 = performance.now();
  try {
    const res = await api("/v1/extract", { task: $("#extract-task").value, input: $("#extract-input").value });
    $("#extract-meta").textContent =
      `${t("latency")}: ${t("server_ms")} ${res.latency_ms.toFixed(0)} ms, ${t("round_trip")} ${(performance.now() - t0).toFixed(0)} ms`;
    $("#extract-output").textContent = JSON.stringify(res.output, null, 2);
  } catch (err) {
    showError("extract", err);
  }
});

// -- health (polled every 5 s; the server keeps the last hour) --------------------------------

const CHARTS = {
  memory: { el: "#chart-memory", series: [["rss", (p) => p.rss / 1e6], ["anon", (p) => p.anon_plus_swap / 1e6]] },
  load: { el: "#chart-load", series: [["queue", (p) => p.queue_depth], ["active", (p) => p.active]] },
  rates: { el: "#chart-rates", series: [["tok_s", (p) => p.tokens_per_s], ["req_s", (p) => p.requests_per_s]] },
};
const COLORS = ["#2563eb", "#dc2626"];
let healthPoints = [];

function drawCharts() {
  if ($("#panel-health").hidden) return;  // uPlot needs a visible box to size itself
  const xs = healthPoints.map((p) => p.t);
  for (const [name, spec] of Object.entries(CHARTS)) {
    const box = $(spec.el);
    const data = [xs, ...spec.series.map(([, f]) => healthPoints.map(f))];
    const width = Math.max(240, box.clientWidth);
    let chart = state.charts[name];
    if (chart && chart.lang !== state.lang) {
      chart.destroy();
      chart = null;
    }
    if (!chart) {
      chart = new uPlot({
        width, height: 180,
        series: [{}, ...spec.series.map(([key], i) => ({ label: t(key), stroke: COLORS[i], width: 2 }))],
        axes: [{}, { size: 60 }],
      }, data, box);
      chart.lang = state.lang;
      state.charts[name] = chart;
    } else {
      chart.setData(data);
      if (Math.abs(chart.width - width) > 2) chart.setSize({ width, height: 180 });
    }
    box.dataset.points = String(xs.length);
  }
}

async function pollHealth() {
  try {
    const [health, history] = await Promise.all([
      fetch("/health").then((r) => r.json()),
      fetch("/health/history").then((r) => r.json()),
    ]);
    healthPoints = history.points || [];
    const status = health.ready ? t("ready") : (health.status === "ok" ? t("loading") : t("not_ready"));
    const pill = $("#server-status");
    pill.textContent = status;
    pill.className = `pill ${health.ready ? "ok" : "warn"}`;
    const last = healthPoints[healthPoints.length - 1];
    const rows = last ? [
      ["rss", `${(last.rss / 1e6).toFixed(1)} MB`], ["anon", `${(last.anon_plus_swap / 1e6).toFixed(1)} MB`],
      ["queue", last.queue_depth], ["active", last.active],
      ["tok_s", last.tokens_per_s.toFixed(1)], ["req_s", last.requests_per_s.toFixed(2)],
    ] : [];
    $("#health-now").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { textContent: t(k) }), el("dd", { textContent: String(v) })]));
    drawCharts();
  } catch (_) {
    const pill = $("#server-status");
    pill.textContent = t("unreachable");
    pill.className = "pill bad";
  }
}

// -- start ------------------------------------------------------------------------------------

$("#lang").addEventListener("change", () => {
  state.lang = $("#lang").value;
  localStorage.setItem("allinone.lang", state.lang);
  applyLang();
  drawCharts();
});
window.addEventListener("resize", drawCharts);

async function start() {
  $("#decide-input").value = t("sample_text");
  addQuestion("predicate", t("q_complaint"));
  addQuestion("choice", t("q_topic"), t("q_topic_options"));
  applyLang();
  const config = await fetch("/ui/config").then((r) => r.json());
  state.authRequired = config.auth_required;
  state.model = config.model || "";
  $("#model-name").textContent = state.model;
  pollHealth();
  setInterval(pollHealth, 5000);
  if (state.authRequired && !state.key) {
    askKey();
    return;
  }
  try {
    await loadTasks();
  } catch (err) {
    showError("classify", err);
  }
}

start();
