// Preloaded into the Agents Playground (node --require): its server calls
// listen(port) with no host, which binds every interface. Bind loopback instead,
// so the page and its mock Connector are reachable from this machine only.
"use strict";
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && typeof args[1] !== "string") {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
