// The chainstore status page: polls status.json (the ECS's status, as `ecsclient status
// --json` prints it) every second and redraws the ring, the tables and the progress in place.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#2f6fde", "#e8833a", "#3aa35b", "#c8475c", "#8a5cd0", "#1ba3b3",
                 "#b59a1b", "#d45fb0", "#6b7a8f", "#5e9c2f"];
const STEPS = ["planning", "copying", "catching up", "locking writes", "final catch-up",
               "switching", "dropping moved data"];
const BANDS = [{r: 140, w: 18}, {r: 118, w: 14}, {r: 99, w: 12}];  // head, middle, tail
const FULL = 2n ** 128n;

function el(tag, attrs, text) {
  const node = tag === "svg" || ["path", "circle", "text", "g", "title"].includes(tag)
    ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function angle(hex) {  // a ring position (32 hex digits) as radians, 0 at the top, clockwise
  return parseInt(hex.slice(0, 8), 16) / 2 ** 32 * 2 * Math.PI;
}

function point(r, a) {
  return [(r * Math.sin(a)).toFixed(2), (-r * Math.cos(a)).toFixed(2)];
}

function share(range) {
  const from = BigInt("0x" + range[0]), to = BigInt("0x" + range[1]);
  let size = ((to - from) % FULL + FULL) % FULL;
  if (size === 0n) size = FULL;
  return Number(size * 10000n / FULL) / 100;
}

function arc(range, band, colour, owner, label) {
  const a0 = angle(range[0]);
  let a1 = angle(range[1]);
  let sweep = a1 - a0;
  if (sweep <= 0) sweep += 2 * Math.PI;
  let shape;
  if (range[0] === range[1] || sweep >= 2 * Math.PI - 1e-6) {
    shape = el("circle", {cx: 0, cy: 0, r: band.r});
  } else {
    const [x0, y0] = point(band.r, a0), [x1, y1] = point(band.r, a0 + sweep);
    shape = el("path", {d: `M ${x0} ${y0} A ${band.r} ${band.r} 0 ${sweep > Math.PI ? 1 : 0} 1 ${x1} ${y1}`});
  }
  shape.setAttribute("fill", "none");
  shape.setAttribute("stroke", colour);
  shape.setAttribute("stroke-width", band.w);
  shape.setAttribute("data-owner", owner);
  shape.appendChild(el("title", {}, label));
  return shape;
}

function colours(status) {
  const map = {};
  status.members.forEach((m, i) => { map[m.name] = PALETTE[i % PALETTE.length]; });
  return map;
}

function drawRing(status, colour) {
  const svg = document.getElementById("ring");
  svg.replaceChildren();
  svg.appendChild(el("circle", {cx: 0, cy: 0, r: 119, fill: "none", stroke: "#e3e6ea",
                                "stroke-width": 62}));
  const dead = new Set(status.dead);
  for (const chain of status.chains) {
    const members = [chain.head, ...chain.middle, chain.tail].filter(Boolean);
    const roles = members.length === 1 ? [chain.head]
      : [chain.head, chain.middle.length ? chain.middle[0] : null, chain.tail];
    const g = el("g", {class: "range", "data-owner": chain.owner});
    roles.forEach((name, i) => {
      if (!name) return;
      const role = ["head", "middle", "tail"][i];
      g.appendChild(arc(chain.range, BANDS[i], colour[name] || "#999", chain.owner,
                        `${chain.owner}'s range: ${role} ${name}`));
    });
    svg.appendChild(g);
  }
  for (const m of status.members) {
    if (!m.position) continue;
    const a = angle(m.position);
    const [x, y] = point(156, a), [tx, ty] = point(163, a);
    const isDead = dead.has(m.name);
    svg.appendChild(el("circle", {cx: x, cy: y, r: 4, class: isDead ? "deadmark" : "",
                                  fill: isDead ? "#b3261e" : colour[m.name]}));
    const anchor = Math.sin(a) > 0.2 ? "start" : Math.sin(a) < -0.2 ? "end" : "middle";
    const t = el("text", {x: tx, y: Number(ty) + 3, "text-anchor": anchor,
                          class: isDead ? "deadmark" : ""}, m.name + (isDead ? " (dead)" : ""));
    svg.appendChild(t);
  }
  const centre = el("text", {x: 0, y: 4, "text-anchor": "middle"},
                    `epoch ${status.epoch}`);
  svg.appendChild(centre);
}

function cell(row, text, cls) {
  const td = el("td", cls ? {class: cls} : {}, text);
  row.appendChild(td);
  return td;
}

function drawMembers(status, colour) {
  const body = document.querySelector("#members tbody");
  body.replaceChildren();
  const dead = new Set(status.dead);
  for (const m of status.members) {
    const state = dead.has(m.name) ? "dead" : m.status;
    const row = el("tr", {"data-member": m.name,
                          class: state === "dead" || state === "failed" ? "dead" : ""});
    const sw = el("td");
    const swatch = el("span", {class: "swatch"});
    swatch.style.background = colour[m.name];  // CSSOM, not a style attribute: the CSP allows it
    sw.appendChild(swatch);
    row.appendChild(sw);
    cell(row, m.name);
    cell(row, state + (m.connected ? "" : ", disconnected"), "state " + state);
    cell(row, m.console);
    cell(row, m.range ? share(m.range).toFixed(1) + "%" : "-", "num");
    cell(row, m.last_heartbeat_s === undefined ? "-" : `${m.last_heartbeat_s.toFixed(1)}s ago`,
         "num");
    const metrics = cell(row, "");
    if (m.metrics) metrics.appendChild(el("a", {href: m.metrics}, "metrics"));
    body.appendChild(row);
  }
}

function drawChains(status) {
  const body = document.querySelector("#chains tbody");
  body.replaceChildren();
  for (const c of status.chains) {
    const row = el("tr", {"data-owner": c.owner});
    cell(row, `${c.range[0].slice(0, 8)}..${c.range[1].slice(0, 8)}`);
    cell(row, c.head || "-");
    cell(row, c.middle.join(", ") || "-");
    cell(row, c.tail || "-");
    cell(row, c.lag === null ? "-" : String(c.lag), "num lag" + (c.lag > 100 ? " lagging" : ""));
    cell(row, c.window === null ? "-" : String(c.window), "num window");
    cell(row, c.queued === null ? "-" : `${c.queued} (${c.queued_bytes} B)`, "num");
    body.appendChild(row);
  }
}

function drawOperation(op) {
  const box = document.getElementById("operation");
  if (!op) { box.hidden = true; return; }
  box.hidden = false;
  const step = Math.max(0, STEPS.indexOf(op.step));
  document.getElementById("op-text").textContent =
    `${op.description}: ${op.step}, ${op.keys_moved} keys, ${op.bytes_moved} bytes moved, ` +
    `${op.seconds.toFixed(1)}s`;
  document.getElementById("op-bar").style.width = `${(step + 1) / STEPS.length * 100}%`;
}

function draw(status) {
  const colour = colours(status);
  const summary = document.getElementById("summary");
  summary.replaceChildren();
  summary.append(`epoch ${status.epoch}, ${status.serving ? "serving" : "stopped"}, ` +
                 `replication ${status.replication}, ${status.ring.length} in the ring`);
  if (status.dead.length) {
    summary.append(", ");
    summary.appendChild(el("span", {class: "bad"}, `dead: ${status.dead.join(", ")}`));
  }
  if (status.degraded) summary.appendChild(el("span", {class: "bad"}, " DEGRADED"));
  drawRing(status, colour);
  drawMembers(status, colour);
  drawChains(status);
  drawOperation(status.operation);
}

async function poll() {
  const updated = document.getElementById("updated");
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    draw(await response.json());
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    updated.textContent = `cannot reach the ECS (${e.message}); retrying`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
