// The hub's live status page: polls /status.json once a second and redraws
// in place. No framework, no build step; every value from the hub is set as
// text (never as HTML), since node ids and errors come from the outside.
"use strict";

(function () {
  const REFRESH_MS = 1000;
  const TIMEOUT_MS = 5000;
  const WORST = 100;
  // A live node whose newest acked watermark is older than this is lagging.
  const LAGGING_MS = 1000;

  const $ = (id) => document.getElementById(id);
  let filter = "";
  let timer = null;
  let inFlight = false;
  let again = false;
  let updates = 0;
  let failures = 0;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function setText(id, text) {
    const e = $(id);
    if (e.textContent !== text) e.textContent = text;
  }

  const int = (n) => Math.round(n).toLocaleString("en-US");

  function percent(r) {
    if (r === null || r === undefined) return "—";
    if (r === 1) return "100 %";
    return (Math.floor(r * 100000) / 1000).toFixed(3) + " %";
  }

  function sliClass(r) {
    if (r === null || r === undefined) return "big";
    return "big " + (r >= 0.999 ? "ok" : r >= 0.99 ? "warn" : "bad");
  }

  function duration(ms) {
    if (ms < 1000) return ms + " ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h " + String(m % 60).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  // The node's state: the hub's `state` field when it sends one, else what
  // `parked` says.
  function nodeState(n) {
    if (typeof n.state === "string" && n.state !== "") return n.state;
    return n.parked ? "parked" : "live";
  }

  function renderHeader(s) {
    setText("region", s.region);
    setText("hub-id", s.hub_id);
    setText("epoch", s.epoch);
    setText("uptime", duration(Math.round(s.uptime_s * 1000)));
    setText("shard-count", String(s.shard_count));
    setText("head-events", int(s.head_events));
    setText("retained", int(s.retained_events) + " (" + bytes(s.retained_bytes) + ")");
    setText("log-kind", s.durable ? "on disk" : "in memory");
    const err = $("log-error");
    err.hidden = !s.log_error;
    setText("log-error", s.log_error ? "The log cannot be written: " + s.log_error : "");
    document.title = "Freshness hub " + s.region;
  }

  function renderCards(s) {
    const m = s.sli.last_minute, st = s.sli.since_start;
    setText("sli-100ms-minute", percent(m.ratio_100ms));
    $("sli-100ms-minute").className = sliClass(m.ratio_100ms);
    setText("sli-100ms-start", percent(st.ratio_100ms));
    setText("sli-1s-minute", percent(m.ratio_1s));
    $("sli-1s-minute").className = sliClass(m.ratio_1s);
    setText("sli-1s-start", percent(st.ratio_1s));
    setText("acked-minute", int(m.acked));
    setText("publish-rate", int(s.rates.publish_per_s));
    setText("delivery-rate", int(s.rates.delivery_per_s));
    setText("ack-rate", int(s.rates.ack_per_s));
    setText("nodes-total", int(s.nodes_total));
    setText("nodes-not-live", int(s.nodes_not_live));
  }

  function renderPeers(s) {
    const body = $("peers").tBodies[0];
    const rows = s.peers.map((p) => {
      // With hub replicas, one replica runs the region's links; the others
      // say which.
      const elsewhere = p.linked_by && p.linked_by !== s.hub_id;
      const link = elsewhere
        ? el("span", { class: "badge" }, "via " + p.linked_by)
        : p.connected
          ? el("span", { class: "badge ok" }, "connected")
          : el("span", { class: "badge bad" }, "disconnected");
      const late = p.lag_ms >= LAGGING_MS;
      return el("tr", {
        "data-peer": p.region,
        "data-connected": String(p.connected),
        class: elsewhere ? "" : p.connected ? (late ? "lagging" : "") : "bad",
      },
        el("td", {}, el("b", {}, p.region)),
        el("td", {}, p.address),
        el("td", {}, link),
        el("td", { class: "num" }, int(p.lag_events)),
        el("td", { class: "num" }, duration(p.lag_ms)),
        el("td", { class: "wrap" }, p.last_error || ""));
    });
    if (rows.length === 0) {
      rows.push(el("tr", {}, el("td", { class: "empty", colspan: "6" }, "no peer regions configured")));
    }
    body.replaceChildren(...rows);
  }

  function renderResets(s) {
    const items = Object.entries(s.resets).map(([reason, n]) =>
      el("span", { class: n > 0 ? "reset some" : "reset", "data-reason": reason },
        reason, el("b", {}, int(n))));
    $("resets").replaceChildren(...items);
  }

  function renderNodes(s) {
    const body = $("nodes").tBodies[0];
    const rows = s.nodes.map((n) => {
      const state = nodeState(n);
      const live = state === "live";
      const lagging = live && n.staleness_ms >= LAGGING_MS;
      const badge = live
        ? (lagging ? el("span", { class: "badge warn" }, "lagging") : el("span", { class: "badge ok" }, "live"))
        : el("span", { class: "badge bad" }, state);
      const who = el("td", {}, el("b", {}, n.node_id));
      if (n.replication) who.append(" ", el("span", { class: "badge info" }, "replication"));
      return el("tr", {
        "data-node": n.node_id,
        "data-state": state,
        "data-lagging": String(lagging),
        class: live ? (lagging ? "lagging" : "") : "bad",
      },
        who,
        el("td", {}, badge),
        el("td", { class: "wrap" }, n.namespaces.length ? n.namespaces.join(", ") : "*"),
        el("td", { class: "num", "data-field": "lag" }, int(n.lag_events)),
        el("td", { class: "num", "data-field": "staleness" }, duration(n.staleness_ms)),
        el("td", { class: "num" }, int(n.in_flight) + " / " + int(n.max_in_flight)),
        el("td", {}, duration(Math.max(0, Math.round((s.now_us - n.connected_at_us) / 1000))) + " ago"),
        el("td", {}, n.peer));
    });
    if (rows.length === 0) {
      const why = s.nodes_total === 0 ? "no nodes connected" : "no node matches the filter";
      rows.push(el("tr", {}, el("td", { class: "empty", colspan: "8" }, why)));
    }
    body.replaceChildren(...rows);
    let shown = "showing " + int(s.nodes.length) + " of " + int(s.nodes_matched);
    if (filter) shown += " matching (" + int(s.nodes_total) + " connected)";
    else if (s.nodes_matched > s.nodes.length) shown += " (the " + int(s.nodes.length) + " worst)";
    setText("nodes-shown", shown);
  }

  function render(s) {
    renderHeader(s);
    renderCards(s);
    renderPeers(s);
    renderResets(s);
    renderNodes(s);
  }

  async function refresh() {
    if (inFlight) { again = true; return; }
    inFlight = true;
    clearTimeout(timer);
    const params = new URLSearchParams({ worst: String(WORST) });
    if (filter) params.set("filter", filter);
    const ctl = new AbortController();
    const abort = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const r = await fetch("status.json?" + params, { cache: "no-store", signal: ctl.signal });
      if (!r.ok) throw new Error("HTTP " + r.status + ": " + (await r.text()).trim());
      const s = await r.json();
      render(s);
      updates += 1;
      failures = 0;
      document.body.dataset.updates = String(updates);
      document.body.classList.remove("stale");
      const conn = $("conn");
      conn.className = "conn ok";
      conn.textContent = "live · updated " + new Date().toLocaleTimeString("en-GB");
    } catch (e) {
      failures += 1;
      document.body.classList.add("stale");
      const conn = $("conn");
      conn.className = "conn down";
      conn.textContent = "hub unreachable (" + (e.name === "AbortError" ? "timed out" : e.message) + "), retrying";
    } finally {
      clearTimeout(abort);
      inFlight = false;
      if (again) { again = false; refresh(); }
      else timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  $("filter").addEventListener("input", (ev) => {
    filter = ev.target.value.trim();
    refresh();
  });
  refresh();
})();
