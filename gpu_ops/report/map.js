// The report's interactive map (gpu_ops.report.interactive). Reads the map document (JSON) from
// the element #imap-data, draws it with plotly.js (already loaded by the page) and wires up the
// hover tooltip (thumbnail, id, groups), the member list of a clicked cluster and the colour mode.
(function () {
  "use strict";
  var root = document.getElementById("imap");
  var plot = document.getElementById("imap-plot");
  var tip = document.getElementById("imap-tip");
  var panel = document.getElementById("imap-members");
  var select = document.getElementById("imap-mode");
  var status = document.getElementById("imap-status");
  if (!root || !plot) return;
  if (typeof Plotly === "undefined") {
    status.textContent = "The interactive map needs plotly.js (figures/plotly.min.js beside this page); the static maps below show the same points.";
    return;
  }
  var doc = JSON.parse(document.getElementById("imap-data").textContent);
  var n = doc.ids.length;
  var TYPED = {f4: Float32Array, f8: Float64Array, i1: Int8Array, i2: Int16Array, i4: Int32Array,
               u1: Uint8Array, u2: Uint16Array, u4: Uint32Array};

  function decode(v) {  // a plotly.js typed-array spec ({dtype, bdata}) or a plain array
    if (!v || Array.isArray(v) || !v.bdata) return v;
    var bin = atob(v.bdata), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new TYPED[v.dtype](bytes.buffer);
  }

  function webglWorks() {
    try {
      var c = document.createElement("canvas");
      return !!(c.getContext("webgl2") || c.getContext("webgl"));
    } catch (e) { return false; }
  }
  var svgOnly = doc.webgl && !webglWorks();

  // Per mode: which trace each point is in, and (score mode) each point's score.
  var modes = {};
  doc.modes.forEach(function (m) {
    var traceOf = new Int32Array(n).fill(-1), score = null;
    m.traces.forEach(function (t, k) {
      var rows = decode(t.customdata);
      for (var i = 0; i < rows.length; i++) traceOf[rows[i]] = k;
      if (!m.grouping && t.marker && t.marker.color && typeof t.marker.color !== "string") {
        score = score || new Float64Array(n).fill(NaN);
        var c = decode(t.marker.color);
        for (var j = 0; j < rows.length; j++) score[rows[j]] = c[j];
      }
    });
    modes[m.key] = {spec: m, traceOf: traceOf, score: score};
  });
  var current = doc.modes[0].key;
  var lastGrouping = doc.modes[0].grouping ? current : null;
  var selected = null;  // {mode, trace}

  function tracesFor(key) {
    var traces = modes[key].spec.traces.map(function (t) {
      var c = Object.assign({}, t, {marker: Object.assign({}, t.marker)});
      if (svgOnly && c.type === "scattergl") c.type = "scatter";
      return c;
    });
    return traces;
  }

  function groupName(key, row) {
    var m = modes[key], k = m.traceOf[row];
    return k < 0 ? "–" : String(m.spec.traces[k].name).replace(/ \(\d+\)$/, "");
  }

  function showTip(row, ev) {
    tip.textContent = "";
    var uri = doc.thumbnails[String(row)];
    if (uri) {
      var img = document.createElement("img");
      img.src = uri;
      img.alt = doc.ids[row];
      tip.appendChild(img);
    } else {
      var none = document.createElement("div");
      none.className = "imap-nothumb";
      none.textContent = "no thumbnail";  // the page says why (a sample, or no images)
      tip.appendChild(none);
    }
    var id = document.createElement("div");
    id.className = "imap-id";
    id.textContent = doc.ids[row];
    tip.appendChild(id);
    doc.modes.forEach(function (m) {
      var line = document.createElement("div");
      line.className = "imap-group";
      line.dataset.mode = m.key;
      if (m.grouping) line.textContent = m.title + ": " + groupName(m.key, row);
      else {
        var s = modes[m.key].score[row];
        line.textContent = m.title + ": " + (isNaN(s) ? "–" : s.toPrecision(4));
      }
      tip.appendChild(line);
    });
    tip.dataset.row = String(row);
    tip.dataset.id = doc.ids[row];
    var x = ev ? ev.clientX : 0, y = ev ? ev.clientY : 0;
    tip.style.left = Math.min(x + 16, window.innerWidth - 200) + "px";
    tip.style.top = Math.min(y + 16, window.innerHeight - 180) + "px";
    tip.hidden = false;
  }

  function highlight() {
    var traces = modes[current].spec.traces;
    var opacity = traces.map(function (_, k) {
      return selected && selected.mode === current && selected.trace !== k ? 0.15 : 1;
    });
    Plotly.restyle(plot, {opacity: opacity});
  }

  function listMembers(key, k) {
    var m = modes[key], t = m.spec.traces[k], rows = decode(t.customdata);
    selected = {mode: key, trace: k};
    panel.textContent = "";
    panel.dataset.mode = key;
    panel.dataset.group = String(t.meta && t.meta.group !== undefined ? t.meta.group : k);
    var h = document.createElement("h3");
    var name = String(t.name).replace(/ \(\d+\)$/, "");
    h.textContent = m.spec.title + ": " + name + " · " + rows.length + " image" + (rows.length === 1 ? "" : "s");
    panel.appendChild(h);
    if (rows.length > doc.member_cap) {
      var note = document.createElement("p");
      note.className = "note";
      note.textContent = "The first " + doc.member_cap + " of " + rows.length + " members.";
      panel.appendChild(note);
    }
    var list = document.createElement("ol");
    list.className = "imap-list";
    var shown = Math.min(rows.length, doc.member_cap);
    for (var i = 0; i < shown; i++) {
      var row = rows[i], li = document.createElement("li"), uri = doc.thumbnails[String(row)];
      li.dataset.id = doc.ids[row];
      li.title = doc.ids[row];
      if (uri) {
        var img = document.createElement("img");
        img.loading = "lazy";
        img.src = uri;
        img.alt = doc.ids[row];
        li.appendChild(img);
      }
      var span = document.createElement("span");
      span.textContent = doc.ids[row];
      li.appendChild(span);
      list.appendChild(li);
    }
    panel.appendChild(list);
    highlight();
  }

  function setMode(key) {
    current = key;
    if (modes[key].spec.grouping) lastGrouping = key;
    selected = null;
    tip.hidden = true;
    panel.textContent = "";
    delete panel.dataset.mode;
    delete panel.dataset.group;
    Plotly.react(plot, tracesFor(key), doc.layout, config).then(function () {
      highlight();
      root.dataset.mode = key;  // drawn in this mode
    });
  }

  doc.modes.forEach(function (m) {
    var o = document.createElement("option");
    o.value = m.key;
    o.textContent = m.title;
    select.appendChild(o);
  });
  select.addEventListener("change", function () { setMode(select.value); });

  var config = {scrollZoom: true, responsive: true, displaylogo: false, doubleClick: "reset"};
  if (svgOnly) status.textContent = "WebGL is not available in this browser: drawing with SVG (slow for large maps).";
  Plotly.newPlot(plot, tracesFor(current), doc.layout, config).then(function () {
    plot.dataset.drawnMs = String(performance.now());
    root.dataset.mode = current;
    plot.on("plotly_hover", function (ev) {
      var p = ev.points && ev.points[0];
      if (p && p.customdata !== undefined) showTip(p.customdata, ev.event);
    });
    plot.on("plotly_unhover", function () { tip.hidden = true; });
    plot.on("plotly_click", function (ev) {
      var p = ev.points && ev.points[0];
      if (!p || p.customdata === undefined) return;
      var key = modes[current].spec.grouping ? current : lastGrouping;
      if (!key) return;
      var k = modes[key].traceOf[p.customdata];
      if (k >= 0) listMembers(key, k);
    });
    plot.on("plotly_legendclick", function (ev) {
      if (modes[current].spec.grouping) listMembers(current, ev.curveNumber);
      return false;  // list the cluster instead of hiding it (double-click still isolates it)
    });
  });
  root.gpuclustMap = {setMode: setMode, listMembers: listMembers, doc: doc};
})();
