// Updates every <span class="countdown" data-expires-at="ISO"> once a second. The server-rendered text is the
// fallback; this only keeps it moving. Served as a file because the CSP allows no inline script.
"use strict";
(function () {
  function format(seconds) {
    if (seconds <= 0) return "expired";
    var h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    var two = function (n) { return (n < 10 ? "0" : "") + n; };
    return (h > 0 ? h + "h " + two(m) + "m " : m + "m ") + two(s) + "s left";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll(".countdown[data-expires-at]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("data-expires-at"));
      if (!isNaN(at)) el.textContent = format(Math.floor((at - now) / 1000));
    });
  }
  tick();
  setInterval(tick, 1000);
})();
