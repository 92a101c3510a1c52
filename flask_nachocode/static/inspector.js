// The delivery inspector's little script: live rows on the first page of the
// list, whole rows clickable, and a Replay button that cannot be sent twice.
// Rows arrive as HTML rendered (and escaped) by the server's own row template.
(function () {
  "use strict";

  var POLL_MS = 2000;

  document.addEventListener("click", function (event) {
    var row = event.target.closest("tr[data-href]");
    if (row && !event.target.closest("a") && !window.getSelection().toString()) {
      window.location.href = row.getAttribute("data-href");
    }
  });

  document.querySelectorAll("form.replay").forEach(function (form) {
    form.addEventListener("submit", function () {
      var button = form.querySelector("button");
      // Disabled after the submit has been queued, so the POST still goes out.
      setTimeout(function () { button.disabled = true; button.textContent = "Replaying…"; }, 0);
    });
  });

  var table = document.getElementById("deliveries");
  var pollUrl = table && table.getAttribute("data-poll-url");
  if (!pollUrl) {
    return;
  }
  var tbody = table.tBodies[0];
  var status = document.getElementById("live-status");
  var empty = document.getElementById("empty");
  var latest = Number(table.getAttribute("data-latest")) || 0;
  var separator = pollUrl.indexOf("?") < 0 ? "?" : "&";

  function schedule(delay) {
    setTimeout(poll, delay);
  }

  function poll() {
    if (document.hidden) {
      schedule(POLL_MS);
      return;
    }
    fetch(pollUrl + separator + "after=" + latest, {
      credentials: "same-origin",
      headers: { "Accept": "application/json" }
    }).then(function (response) {
      if (response.status >= 400 && response.status < 500) {
        // Signed out or the page is gone: polling again will not help.
        status.textContent = "Live updates stopped (" + response.status + "); reload the page.";
        return;
      }
      if (!response.ok) {
        throw new Error(String(response.status));
      }
      return response.json().then(function (data) {
        if (data.count > 0) {
          tbody.insertAdjacentHTML("afterbegin", data.html);
          for (var i = 0; i < data.count && i < tbody.rows.length; i++) {
            tbody.rows[i].classList.add("arrived");
          }
          empty.hidden = true;
        }
        latest = Math.max(latest, data.latest);
        status.textContent = "New deliveries appear here as they arrive.";
        schedule(POLL_MS);
      });
    }).catch(function () {
      status.textContent = "Cannot reach the server; retrying…";
      schedule(POLL_MS * 3);
    });
  }

  schedule(POLL_MS);
})();
