// skiff console: live logs over server-sent events. The page works
// without it (the lines shown are those at its load); this only adds the
// new ones as they come. Text goes in with textContent, never as HTML.
(function () {
  "use strict";
  var box = document.getElementById("live-logs");
  if (!box || !window.EventSource) { return; }
  function span(cls, text) {
    var s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    return s;
  }
  // The newest lines in view, as a terminal shows them.
  box.scrollTop = box.scrollHeight;
  var source = new EventSource(box.dataset.stream);
  source.onmessage = function (event) {
    var l = JSON.parse(event.data);
    var atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    var line = document.createElement("div");
    line.className = "line" + (l.quiet ? " quiet" : "");
    line.appendChild(span("at", l.at));
    line.appendChild(document.createTextNode(" "));
    line.appendChild(span("tag", l.tag));
    line.appendChild(document.createTextNode(" "));
    line.appendChild(span("text", l.line));
    box.appendChild(line);
    if (l.finding) {
      var f = document.createElement("div");
      f.className = "line-finding";
      [["skiff: ", l.finding.what], ["why: ", l.finding.why], ["fix: ", l.finding.fix]].forEach(function (p, i) {
        if (i > 0) { f.appendChild(document.createElement("br")); }
        var b = document.createElement("strong");
        b.textContent = p[0];
        f.appendChild(b);
        f.appendChild(document.createTextNode(p[1]));
      });
      box.appendChild(f);
    }
    if (atBottom) { box.scrollTop = box.scrollHeight; }
  };
})();
