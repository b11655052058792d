// Preloaded into the Agents Playground (node --require). It keeps the Playground to this
// machine and to its own page:
// - its server calls listen(port) with no host, which binds every interface: it binds
//   127.0.0.1 instead;
// - a web page elsewhere could still reach it through the browser (a rebound DNS name, or
//   a WebSocket, which no same-origin rule covers) and make the bot post to any port of
//   this machine, or read the chat: a request or upgrade is answered 403 unless its Host
//   names loopback and its Origin, when it has one, is that same host;
// - when the process that started it dies, even by SIGKILL, its end of stdin closes:
//   the Playground exits with it instead of keeping its port.
"use strict";
const http = require("http");
const net = require("net");

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && typeof args[1] !== "string") {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};

const LOOPBACK_HOST = /^(127\.0\.0\.1|localhost|\[::1\])(:\d{1,5})?$/i;

function allowed(headers) {
  const host = headers.host;
  if (typeof host !== "string" || !LOOPBACK_HOST.test(host)) {
    return false;
  }
  // Browsers say where a request comes from, also for those they send without an Origin
  // (an <img> or a link to here on another site): not this page's own, refused.
  const site = headers["sec-fetch-site"];
  if (site === "cross-site" || site === "same-site") {
    return false;
  }
  const origin = headers.origin;
  if (origin === undefined) {
    return true; // not sent by a page: the bot's own calls, curl
  }
  try {
    const url = new URL(origin);
    return url.protocol === "http:" && url.host.toLowerCase() === host.toLowerCase();
  } catch {
    return false; // "null" (a sandboxed frame, a file) or not a URL
  }
}

const emit = http.Server.prototype.emit;
http.Server.prototype.emit = function (event, ...args) {
  if ((event === "request" || event === "upgrade") && !allowed(args[0].headers)) {
    if (event === "request") {
      const response = args[1];
      response.writeHead(403, { "content-type": "text/plain; charset=utf-8" });
      response.end("refused: the Playground answers its own page on this machine only\n");
    } else {
      const socket = args[1];
      socket.end("HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    }
    return true;
  }
  return emit.call(this, event, ...args);
};

if (process.env.PLAYGROUND_EXIT_WITH_PARENT === "1") {
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("error", () => process.exit(0));
  process.stdin.resume();
}
