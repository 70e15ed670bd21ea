// Refreshes the page's <main> every data-refresh seconds (set on <body>), without a reload:
// skipped while the operator is typing in a form, so a refresh never eats their input.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!seconds) { return; }
  function busy() {
    var el = document.activeElement;
    return el && (el.tagName === "INPUT" || el.tagName === "SELECT" || el.tagName === "TEXTAREA");
  }
  function tick() {
    if (busy() || document.hidden) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Refresh": "1" } })
      .then(function (resp) {
        if (resp.redirected || !resp.ok) { window.location.reload(); return null; }
        return resp.text();
      })
      .then(function (html) {
        if (html === null || busy()) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.querySelector("main");
        var current = document.querySelector("main");
        if (fresh && current) { current.replaceWith(fresh); }
      })
      .catch(function () { /* a missed refresh is retried on the next tick */ });
  }
  window.setInterval(tick, seconds * 1000);
})();
