// The page: one image in (drop, paste or file picker), POST /predict, LaTeX out (copy + KaTeX).
"use strict";

const $ = (id) => document.getElementById(id);

function show(el, yes) { el.hidden = !yes; }

async function recognize(file) {
  if (!file || !file.type.startsWith("image/")) {
    fail("That is not an image: drop or paste a PNG, JPEG, GIF, WebP, ...");
    return;
  }
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  show(preview, true);
  show($("drop-text"), false);
  show($("error"), false);
  $("status").textContent = "Recognizing…";
  document.body.dataset.state = "busy";
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  try {
    const response = await fetch("/predict", { method: "POST", body: form });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : response.statusText;
      fail(`Error ${response.status}: ${detail}`);
      return;
    }
    showResult(body.latex, body.seconds, body.confidence, body.verified);
  } catch (err) {
    fail(`The service did not answer: ${err}`);
  }
}

// The answer's sequence log-probability: 0 is certain; exp() of it is the model's probability of
// the whole answer.
function confidenceText(logprob) {
  if (logprob === null || logprob === undefined) return "";
  const p = Math.exp(logprob) * 100;
  return ` Confidence: log p = ${logprob.toFixed(2)} (p \u2248 ${p < 1 ? "<1" : p.toFixed(0)} %).`;
}

// With the service's --verify: whether the answer, drawn by the renderer, matches the image.
function verifiedText(verified) {
  if (verified === true) return " \u2714 Verified: its rendering matches the image.";
  if (verified === false) return " Not verified: no candidate's rendering matched the image.";
  return "";
}

function showResult(latex, seconds, logprob, verified) {
  $("latex").value = latex;
  const rendered = $("rendered");
  if (latex) {
    katex.render(latex, rendered, { displayMode: true, throwOnError: false });
  } else {
    rendered.textContent = "(no formula found in this image)";
  }
  $("status").textContent = `Done in ${seconds.toFixed(2)} s.` + confidenceText(logprob) +
    verifiedText(verified);
  show($("result"), true);
  document.body.dataset.state = "done";
}

function fail(message) {
  $("error").textContent = message;
  show($("error"), true);
  $("status").textContent = "";
  document.body.dataset.state = "error";
}

function firstImage(items) {
  for (const item of items || []) {
    const file = item.kind === "file" ? item.getAsFile() : item;
    if (file && file.type && file.type.startsWith("image/")) return file;
  }
  return null;
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => recognize(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const files = e.dataTransfer.files;
    recognize(firstImage(e.dataTransfer.items) || (files && files[0]));
  });
  // Page-wide: drops outside the box should not navigate away to the image.
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.items);
    if (file) { e.preventDefault(); recognize(file); }
  });
  $("copy").addEventListener("click", async () => {
    const text = $("latex").value;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      $("latex").select();
      document.execCommand("copy");  // older browsers and non-secure origins
    }
    $("copy").textContent = "Copied";
    setTimeout(() => { $("copy").textContent = "Copy"; }, 1500);
  });
});
