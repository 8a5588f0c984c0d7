// The listening page: one version plays at a time, and the time spent on the item is sent with the answer.
"use strict";
const started = Date.now();
const videos = Array.from(document.querySelectorAll("video[data-side]"));
for (const video of videos) {
  video.addEventListener("play", () => videos.forEach((other) => { if (other !== video) other.pause(); }));
}
const bar = document.getElementById("bar");
if (bar) bar.style.width = bar.dataset.width + "%";
const form = document.getElementById("answer");
if (form) form.addEventListener("submit", () => {
  document.getElementById("seconds").value = ((Date.now() - started) / 1000).toFixed(1);
});
