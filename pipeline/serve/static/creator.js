// The creator page: send the upload, then follow the job until its mp4 plays here.
"use strict";
const form = document.getElementById("upload");
const errorBox = document.getElementById("error");
const jobsTable = document.getElementById("jobs");

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderJobs(jobs) {
  const body = jobsTable.tBodies[0];
  body.replaceChildren();
  for (const job of jobs) {
    const row = body.insertRow();
    cell(row, job.original_name);
    cell(row, job.model);
    cell(row, String(job.seed));
    cell(row, job.status === "failed" ? "failed: " + job.error : job.status, "status-" + job.status);
    const td = row.insertCell();
    if (job.download) {
      const a = document.createElement("a");
      a.href = job.download;
      a.textContent = "download";
      td.appendChild(a);
    }
  }
}

async function refreshJobs() {
  const response = await fetch("/api/jobs");
  if (response.ok) renderJobs(await response.json());
}

function showJob(job) {
  document.getElementById("current").hidden = false;
  document.getElementById("current-title").textContent = job.original_name;
  const step = document.getElementById("step");
  document.getElementById("bar").style.width = Math.round(100 * (job.progress || 0)) + "%";
  if (job.status === "queued") {
    step.textContent = job.ahead ? `waiting: ${job.ahead} job(s) ahead` : "waiting to start";
  } else if (job.status === "running") {
    step.textContent = `${job.step}... (${job.seconds || 0} s)`;
  } else if (job.status === "failed") {
    step.textContent = "";
    showError(job.error);
  } else if (job.status === "done") {
    step.textContent = `done in ${job.seconds} s`;
    const video = document.getElementById("result");
    video.src = job.video;
    video.hidden = false;
    const link = document.getElementById("download");
    link.href = job.download;
    link.hidden = false;
  }
}

async function follow(token) {
  for (;;) {
    const response = await fetch("/api/jobs/" + token);
    const job = await response.json();
    if (!response.ok) { showError(job.error); return; }
    showJob(job);
    if (job.status === "done" || job.status === "failed") break;
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
  refreshJobs();
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  const file = document.getElementById("video").files[0];
  if (!file) { showError("choose a video file to upload"); return; }
  if (file.size > Number(form.dataset.maxBytes)) {
    showError(`${file.name}: the file is larger than the limit of ${form.dataset.maxMb} MB`);
    return;
  }
  const button = document.getElementById("submit");
  button.disabled = true;
  document.getElementById("result").hidden = true;
  document.getElementById("download").hidden = true;
  try {
    const response = await fetch("/api/jobs", { method: "POST", body: new FormData(form) });
    let body;
    try { body = await response.json(); } catch { body = { error: `the server answered ${response.status}` }; }
    if (!response.ok) { showError(`${file.name}: ${body.error}`); return; }
    refreshJobs();
    await follow(body.token);
  } catch (err) {
    showError("the upload did not reach the server (" + err.message + ")");
  } finally {
    button.disabled = false;
  }
});

renderJobs(JSON.parse(jobsTable.dataset.jobs || "[]"));
