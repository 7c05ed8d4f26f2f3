// softprompt web page: compare the plain model with a tuned prompt, list stored prompts.
// Plain JS, no build step. URL parameters prompt, input, max_tokens, chat=0|1, run=1 fill and run the form.
// A chat model (its tokenizer has a chat template) is asked through /v1/chat/completions, the
// input as one user message; the "chat" box switches to plain text completion.
"use strict";
const $ = (id) => document.getElementById(id);
let baseId = null;
let prompts = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value;
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const opts = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const t0 = performance.now();
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  const ms = performance.now() - t0;
  if (!r.ok) throw new Error((data.error && data.error.message) || r.status + " " + r.statusText);
  return { data, ms };
}

function cell(text) { const td = document.createElement("td"); td.textContent = text == null ? "—" : text; return td; }
function fmt(x, d = 3) { return typeof x === "number" ? x.toFixed(d) : null; }

async function loadPrompts() {
  const { data } = await api("/v1/prompts");
  baseId = data.model;
  prompts = data.data;
  $("chat-label").hidden = !data.chat;
  if (data.chat && $("chat").dataset.set !== "1") $("chat").checked = true;
  $("model-id").textContent = "model: " + baseId;
  const sel = $("prompt");
  sel.innerHTML = "";
  sel.append(new Option("(plain model only)", ""));
  for (const p of prompts) if (p.status === "ok") sel.append(new Option(p.name + (p.task ? " · " + p.task : ""), p.name));
  const body = $("prompts").querySelector("tbody");
  body.innerHTML = "";
  for (const p of prompts) {
    const tr = document.createElement("tr");
    const m = p.metrics || {};
    tr.append(cell(p.name), cell(p.kind), cell(p.task), cell(p.num_virtual_tokens), cell(p.verbalizer ? Object.values(p.verbalizer).join(", ") : null),
      cell(fmt(p.accuracy)), cell(fmt(m.final_train_loss)), cell(p.base_model), cell(p.created), cell(p.status === "ok" ? "ok" : p.error));
    body.append(tr);
  }
}

function showClassification(el, res) {
  const d = res.data.data[0];
  const probs = Object.entries(d.probabilities).map(([k, v]) => k + " " + v.toFixed(3)).join(" · ");
  el.innerHTML = "";
  const b = document.createElement("b");
  b.textContent = d.label;
  el.append("label: ", b, " (" + probs + ")");
}

async function side(which, model, text, maxTokens, info) {
  const out = $("out-" + which), time = $("time-" + which), cls = $("cls-" + which);
  out.textContent = "…"; time.textContent = ""; cls.textContent = "";
  try {
    const chat = !$("chat-label").hidden && $("chat").checked;
    const res = chat
      ? await api("/v1/chat/completions", { model, messages: [{ role: "user", content: text }], max_tokens: maxTokens, temperature: 0 })
      : await api("/v1/completions", { model, prompt: text, max_tokens: maxTokens, temperature: 0 });
    out.textContent = chat ? res.data.choices[0].message.content : res.data.choices[0].text;
    time.textContent = res.ms.toFixed(0) + " ms";
    if (info && info.verbalizer) {  // a classification prompt: also the label, with the prompt's template
      const body = { prompt: model, inputs: [text] };
      if (which === "base") Object.assign(body, { template: info.template, verbalizer: info.verbalizer });
      showClassification(cls, await api("/v1/classify", body));
    }
  } catch (e) {
    out.textContent = "error: " + e.message;
    out.classList.add("error");
  }
}

async function run(ev) {
  if (ev) ev.preventDefault();
  const name = $("prompt").value, text = $("input").value, maxTokens = parseInt($("max-tokens").value || "32", 10);
  const info = prompts.find((p) => p.name === name);
  $("tuned-name").textContent = name || "—";
  document.body.dataset.state = "running";
  $("status").textContent = "running…";
  const jobs = [side("base", baseId, text, maxTokens, info)];
  if (name) jobs.push(side("tuned", name, text, maxTokens, info));
  else { $("out-tuned").textContent = "(pick a prompt)"; $("time-tuned").textContent = ""; }
  await Promise.all(jobs);
  $("status").textContent = "";
  document.body.dataset.state = "done";
}

async function health() {
  try {
    const r = await fetch("/healthz");
    $("health").textContent = r.ok ? "healthy" : "unavailable";
    $("health").className = "badge " + (r.ok ? "ok" : "bad");
  } catch (e) { $("health").textContent = "down"; $("health").className = "badge bad"; }
}

async function refresh() {
  try {
    await loadPrompts();
    $("status").textContent = "";
    return true;
  } catch (e) {
    $("status").textContent = "could not list prompts: " + e.message + " (API key?)";
    document.body.dataset.state = "error";
    return false;
  }
}

async function main() {
  $("form").addEventListener("submit", run);
  $("api-key").value = localStorage.getItem("softprompt-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("softprompt-key", $("api-key").value);
    refresh();
  });
  health();
  if (!(await refresh())) return;
  const q = new URLSearchParams(location.search);
  if (q.get("prompt")) $("prompt").value = q.get("prompt");
  if (q.get("input")) $("input").value = q.get("input");
  if (q.get("max_tokens")) $("max-tokens").value = q.get("max_tokens");
  if (q.get("chat")) { $("chat").checked = q.get("chat") === "1"; $("chat").dataset.set = "1"; }
  $("chat").addEventListener("change", () => { $("chat").dataset.set = "1"; });
  if (q.get("run") === "1") await run();
  else document.body.dataset.state = "ready";
}
main();
