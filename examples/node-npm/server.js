// Answers with a duration formatted by the `ms` package npm installed.
const http = require("http");
const ms = require("ms");

http
  .createServer((req, res) => {
    res.setHeader("Content-Type", "text/plain");
    res.end(`node says ${ms(90000)} on port ${process.env.PORT}\n`);
  })
  .listen(Number(process.env.PORT), "0.0.0.0", () => {
    console.log(`listening on 0.0.0.0:${process.env.PORT}`);
  });
