/* bitplan report: selecting a plan. The page is complete without this script (plot, heatmap,
   tables and links are static HTML); the script adds the selected plan's layer table and
   highlights that plan everywhere. Its data is the JSON in #report-data. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var plans = {};
  data.plans.forEach(function (p) { plans[p.id] = p; });

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function colour(bits) { return data.colours[String(bits)] || ["#cccccc", "#1b1f24"]; }
  function num(v) { return v === null || v === undefined ? "\u2013" : Number(v).toPrecision(3); }
  function size(b) {
    return b < 1e6 ? (b / 1e3).toFixed(1) + " kB" : (b / 1e6).toFixed(2) + " MB";
  }

  function metrics(p) {
    var box = document.getElementById("plan-metrics");
    box.textContent = "";
    box.appendChild(el("strong", "", p.id + ": "));
    box.appendChild(el("span", "", size(p.total_bytes) + ", " + p.bpw.toFixed(2) + " bpw"));
    Object.keys(p.holdout).forEach(function (k) {
      box.appendChild(el("span", "", "held-out " + k + " " + num(p.holdout[k])));
    });
  }

  function layerTable(p) {
    var planned = p.layers.reduce(function (s, l) { return s + l[3]; }, 0) || 1;
    var table = el("table", "grid-table wide"), head = el("tr");
    table.id = "plan-layers";
    ["layer", "format", "bits", "bytes", "share", "sensitivity"].forEach(function (h) {
      head.appendChild(el("th", "", h));
    });
    table.appendChild(el("thead")).appendChild(head);
    var body = table.appendChild(el("tbody"));
    p.layers.forEach(function (l) {
      var tr = body.appendChild(el("tr"));
      tr.dataset.layer = l[0];
      var name = tr.appendChild(el("th", "", l[0]));
      name.title = l[0];
      var format = tr.appendChild(el("td", "", l[1])), c = colour(l[2]);
      format.style.background = c[0];
      format.style.color = c[1];
      tr.appendChild(el("td", "num", String(l[2])));
      tr.appendChild(el("td", "num", l[3].toLocaleString("en")));
      var share = tr.appendChild(el("td", "num")), bar = el("span", "bar");
      bar.style.width = Math.max(1, Math.round(60 * l[3] / planned)) + "px";
      share.appendChild(bar);
      share.appendChild(document.createTextNode((100 * l[3] / planned).toFixed(1) + "%"));
      tr.appendChild(el("td", "num", num((data.sensitivity[l[0]] || {})[l[1]])));
    });
    var box = document.getElementById("plan-detail");
    box.textContent = "";
    box.appendChild(table);
  }

  // Scroll the heatmap sideways (only it, never the page) until the plan's column shows
  // beside the sticky layer column.
  function reveal(id) {
    var wrap = document.getElementById("heatmap-wrap");
    if (!wrap) return;
    var heads = wrap.querySelectorAll("th.col"), stuck = wrap.querySelector("thead th");
    for (var i = 0; i < heads.length; i++) {
      if (heads[i].dataset.plan !== id) continue;
      var box = wrap.getBoundingClientRect(), r = heads[i].getBoundingClientRect();
      var left = box.left + (stuck ? stuck.getBoundingClientRect().width : 0);
      var right = box.left + wrap.clientLeft + wrap.clientWidth;  // inside the scrollbar
      // Whole pixels, rounded outwards: scrollLeft drops fractions, which would leave a
      // sliver of the column hidden.
      if (r.left < left) wrap.scrollLeft -= Math.ceil(left - r.left);
      else if (r.right > right) wrap.scrollLeft += Math.ceil(r.right - right);
    }
  }

  var select = document.getElementById("plan-select");
  function choose(id) {
    var p = plans[id];
    if (!p) return;
    select.value = id;
    var chosen = {};
    p.layers.forEach(function (l) { chosen[l[0]] = l[1]; });
    document.querySelectorAll("[data-plan]").forEach(function (n) {
      // A plot point or a download row is "selected"; a heatmap cell or column head is "sel".
      var whole = n.tagName === "TR" || n.tagName.toLowerCase() === "g";
      n.classList.toggle(whole ? "selected" : "sel", n.dataset.plan === id);
    });
    document.querySelectorAll("#sensitivity td[data-layer]").forEach(function (td) {
      td.classList.toggle("chosen", chosen[td.dataset.layer] === td.dataset.format);
    });
    metrics(p);
    layerTable(p);
    reveal(id);
  }
  select.addEventListener("change", function () { choose(select.value); });
  document.querySelectorAll("#frontier-plot .pt, #heatmap [data-plan]").forEach(function (n) {
    n.addEventListener("click", function () { choose(n.dataset.plan); });
  });
  if (data.selected) choose(data.selected);
})();
