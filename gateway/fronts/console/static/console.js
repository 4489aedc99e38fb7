// The console's only script: the audit search's live tail. New records are fetched from
// /console/audit/tail and added on top of the table as text (never as HTML).
(function () {
  "use strict";
  var table = document.getElementById("results");
  var box = document.getElementById("live");
  if (!table || !box || !table.dataset.tail) { return; }
  var cursor = table.dataset.tail;
  var query = table.dataset.query || "";
  var timer = null;
  var columns = ["ts", "user", "agent", "protocol", "target", "action", "effect", "status", "latency_ms", "policies"];

  function row(r) {
    var tr = document.createElement("tr");
    columns.forEach(function (c) {
      var td = document.createElement("td");
      var value = r[c] === null || r[c] === undefined ? "" : String(c === "latency_ms" && r[c] !== null ? Number(r[c]).toFixed(1) : r[c]);
      if (c === "ts") {
        var a = document.createElement("a");
        a.href = "/console/calls/" + encodeURIComponent(r.id);
        a.textContent = value;
        td.appendChild(a);
      } else if (c === "effect") {
        var span = document.createElement("span");
        span.className = value === "deny" ? "deny" : (value === "allow" || value === "transform") ? "allow" : "warn";
        span.textContent = value;
        td.appendChild(span);
      } else {
        td.textContent = value;
      }
      tr.appendChild(td);
    });
    tr.className = "new";
    return tr;
  }

  function poll() {
    var url = "/console/audit/tail?" + (query ? query + "&" : "") + "after=" + encodeURIComponent(cursor);
    fetch(url, { credentials: "same-origin", headers: { "accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        var body = table.tBodies[0];
        data.rows.forEach(function (r) {
          var empty = body.querySelector("td.muted");
          if (empty) { body.removeChild(empty.parentNode); }
          body.insertBefore(row(r), body.firstChild);
        });
        if (data.cursor) { cursor = data.cursor; }
      })
      .catch(function () { /* the next poll tries again */ });
  }

  box.addEventListener("change", function () {
    if (box.checked && !timer) { poll(); timer = setInterval(poll, 2000); }
    if (!box.checked && timer) { clearInterval(timer); timer = null; }
  });
}());
