// The imlnet serve page: drop drone photos, watch the job, see the estimates on the map.
// Talks to the JSON API of imlnet/serve/app.py only (no other network access).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const RANKS = ["#2f6fd6", "#e37400", "#9334e6", "#188038", "#c5221f"];
  const IMAGE = /\.(jpe?g|png|tiff?|webp|bmp)$/i;
  const map = L.map("map", { zoomSnap: 0.25, attributionControl: false });
  const layers = {
    footprints: L.layerGroup().addTo(map),
    estimates: L.layerGroup().addTo(map),
    cameras: L.layerGroup().addTo(map),
    tracks: L.layerGroup().addTo(map),
  };
  let queries = [];

  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const fmt = (x, n = 6) => Number(x).toFixed(n);

  function message(text, error = false) {
    const el = $("message");
    el.textContent = text || "";
    el.className = error ? "error" : "";
  }

  function progress(done, total, phase) {
    $("progress").hidden = false;
    const share = phase === "done" ? 1 : total ? (phase === "retrieval" ? 0.8 * done / total : 0.9) : 0;
    $("progress-bar").style.width = `${Math.round(100 * share)}%`;
    message(phase === "retrieval" ? `retrieval: ${done} of ${total} photos` : `${phase}...`);
  }

  async function request(url, options) {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  async function init() {
    const info = await request("/api/info");
    const model = info.model;
    $("gallery-info").textContent =
      `${info.tiles} tiles, model ${model.backbone || "?"} at ${model.image_size} px ` +
      `(${model.runtime}), imlnet ${info.version}`;
    for (const base of info.basemaps) L.imageOverlay(base.url, base.bounds).addTo(map);
    if (info.bounds) map.fitBounds(info.bounds, { padding: [30, 30] });
    else map.setView([0, 0], 2);
    L.control.scale({ imperial: false }).addTo(map);
    const legend = L.control({ position: "topright" });
    legend.onAdd = () => {
      const div = L.DomUtil.create("div", "legend");
      div.innerHTML =
        '<i style="background:#d93025;border-radius:50%"></i>estimate<br>' +
        '<i style="background:#1a73e8"></i>camera (verified)<br>' +
        RANKS.map((c, i) => `<i style="border:2px solid ${c}"></i>tile rank ${i + 1}`).join("<br>");
      return div;
    };
    legend.addTo(map);
  }

  // -- collecting files: inputs, dropped files, dropped folders ---------------------------------
  async function entryFiles(entry) {
    if (entry.isFile) return [await new Promise((ok, bad) => entry.file(ok, bad))];
    const reader = entry.createReader();
    const out = [];
    for (;;) {
      const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
      if (!batch.length) break;
      for (const child of batch) out.push(...(await entryFiles(child)));
    }
    return out;
  }

  async function dropped(transfer) {
    const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
    if (entries.length && entries.every(Boolean)) {
      const folder = entries.some((e) => e.isDirectory);
      const files = [];
      for (const e of entries) files.push(...(await entryFiles(e)));
      return { files, folder };
    }
    return { files: [...transfer.files], folder: false };
  }

  // -- one job -----------------------------------------------------------------------------------
  async function submit(files, folder) {
    const images = files.filter((f) => IMAGE.test(f.name));
    images.sort((a, b) => (a.webkitRelativePath || a.name).localeCompare(b.webkitRelativePath || b.name));
    const csv = files.find((f) => /\.csv$/i.test(f.name)) || $("attitude-input").files[0];
    if (!images.length) return message("none of these files is an image (JPEG, PNG, TIFF)", true);
    if (folder && images.length > 1) $("sequence").checked = true;
    const form = new FormData();
    for (const f of images) form.append("files", f, f.name);
    if (csv) form.append("attitude", csv, csv.name);
    const query = new URLSearchParams({
      k: $("k").value, verify: $("verify").value, sequence: $("sequence").checked,
    });
    progress(0, images.length, "uploading");
    try {
      const job = await request(`/api/jobs?${query}`, { method: "POST", body: form });
      await follow(job.id);
    } catch (err) {
      $("progress").hidden = true;
      message(err.message, true);
    }
  }

  async function follow(id) {
    for (;;) {
      const job = await request(`/api/jobs/${id}`);
      progress(job.done, job.total, job.phase);
      if (job.state === "done") return show(job);
      if (job.state === "failed") throw new Error(job.error);
      await sleep(250);
    }
  }

  function card(q) {
    const li = document.createElement("li");
    const v = q.verification;
    const status = v
      ? v.verified
        ? `<span class="verified">verified: ${v.inliers} inliers, confidence ${v.confidence}</span>`
        : `<span class="unverified">not verified (${v.note || "no geometric match"})</span>`
      : '<span class="unverified">retrieval only</span>';
    const rows = q.hits
      .map((h) => `<tr><td style="color:${RANKS[(h.rank - 1) % RANKS.length]}">#${h.rank}</td>` +
        `<td>${h.tile_id}</td><td>${h.score.toFixed(3)}</td></tr>`)
      .join("");
    li.innerHTML =
      `<img class="thumb" src="${q.thumb}" alt="">` +
      `<div><div class="name"></div>` +
      `<div class="estimate">${fmt(q.estimate.lat)}, ${fmt(q.estimate.lon)}</div>` +
      `<div class="kind">${q.estimate.kind}</div><div>${status}</div>` +
      `<table>${rows}</table>` +
      (v && v.match ? '<button type="button">show the match</button>' : "") +
      `</div>`;
    li.querySelector(".name").textContent = q.name;
    li.addEventListener("click", () => select(q.index, true));
    return li;
  }

  function show(job) {
    queries = job.queries;
    Object.values(layers).forEach((layer) => layer.clearLayers());
    const list = $("results");
    list.innerHTML = "";
    const points = [];
    for (const q of queries) {
      list.appendChild(card(q));
      const e = q.estimate;
      const icon = L.divIcon({
        className: "estimate-icon",
        iconSize: [18, 18],
        html: `<div class="estimate-marker" data-index="${q.index}" data-lat="${e.lat}" data-lon="${e.lon}"></div>`,
      });
      L.marker([e.lat, e.lon], { icon, title: q.name })
        .bindTooltip(`${q.name}<br>${fmt(e.lat)}, ${fmt(e.lon)}<br>${e.kind}`)
        .on("click", () => select(q.index, true))
        .addTo(layers.estimates);
      points.push([e.lat, e.lon]);
      const cam = q.verification && q.verification.camera;
      if (cam) {
        const camIcon = L.divIcon({ className: "camera-icon", iconSize: [14, 14], html: '<div class="camera-marker"></div>' });
        L.marker(cam, { icon: camIcon, title: `camera of ${q.name}` }).addTo(layers.cameras);
        L.polyline([cam, [e.lat, e.lon]], { color: "#1a73e8", weight: 2, dashArray: "4 4" }).addTo(layers.cameras);
      }
    }
    for (const [flight, track] of Object.entries(job.tracks || {})) {
      L.polyline(track, { color: "#d93025", weight: 3, opacity: 0.85 })
        .bindTooltip(`flight ${flight || "(upload)"}: ${track.length} frames`)
        .addTo(layers.tracks);
    }
    $("downloads").innerHTML = Object.entries(job.downloads)
      .filter(([name]) => /geojson|results\.csv|fixes\.csv/.test(name))
      .map(([name, url]) => `<a href="${url}" download>${name}</a>`)
      .join("");
    $("progress-bar").style.width = "100%";
    const verified = queries.filter((q) => q.verification && q.verification.verified).length;
    message(`${queries.length} photo(s) located in ${job.seconds} s; ${verified} verified`);
    if (points.length) map.fitBounds(L.latLngBounds(points).pad(0.6), { maxZoom: 18 });
    select(0);
  }

  function select(index, zoom = false) {
    const q = queries[index];
    if (!q) return;
    [...$("results").children].forEach((li, i) => li.classList.toggle("active", i === index));
    layers.footprints.clearLayers();
    for (const h of [...q.hits].reverse()) {
      if (!h.footprint) continue;
      const colour = RANKS[(h.rank - 1) % RANKS.length];
      L.polygon(h.footprint, { color: colour, weight: h.rank === 1 ? 3 : 1.5, fillOpacity: h.rank === 1 ? 0.12 : 0.04 })
        .bindTooltip(`rank ${h.rank}: ${h.tile_id} (score ${h.score.toFixed(3)})`)
        .addTo(layers.footprints);
    }
    document.querySelectorAll(".estimate-marker").forEach((el) => {
      el.style.outline = Number(el.dataset.index) === index ? "3px solid #ffd600" : "";
    });
    const v = q.verification;
    if (zoom) {  // the photo's estimate, its camera and the tile it matched (else the top one)
      const tile = q.hits.find((h) => v && v.verified && h.tile_id === v.tile_id) || q.hits[0];
      const near = [[q.estimate.lat, q.estimate.lon], ...(tile.footprint || [])];
      if (v && v.camera) near.push(v.camera);
      map.fitBounds(L.latLngBounds(near).pad(0.4), { maxZoom: 18 });
    }
    $("match-view").hidden = !(v && v.match);
    if (v && v.match) {
      $("match-img").src = v.match;
      $("match-caption").textContent =
        `${q.name}: the photo (left) and the map window of ${v.tile_id} (right), ` +
        `${v.inliers} inlier matches`;
    }
  }

  // -- wiring ------------------------------------------------------------------------------------
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const { files, folder } = await dropped(e.dataTransfer);
    submit(files, folder);
  });
  $("match-close").addEventListener("click", () => { $("match-view").hidden = true; });
  $("file-input").addEventListener("change", (e) => submit([...e.target.files], false));
  $("folder-input").addEventListener("change", (e) => submit([...e.target.files], true));
  init().catch((err) => message(`cannot reach the server: ${err.message}`, true));
})();
