// Runs the engine's store conformance suite on the IndexedDB store in
// headless Chromium: serves web/ over HTTP, opens tests/conformance.html and
// waits for its outcome. Exits 0 only when every check passed.
//
// Needs web/dist (web/build.sh), `npm ci` in web/ and Chromium
// (CHROMIUM, or /usr/bin/chromium: `apt-get install chromium`).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = fileURLToPath(new URL("..", import.meta.url));
const timeoutMs = Number(process.env.CONFORMANCE_TIMEOUT_MS || 120000);
const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".wasm": "application/wasm",
  ".json": "application/json",
};

/** A static server for web/, on a free port of 127.0.0.1. */
function serve() {
  const server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = join(root, path);
    if (!file.startsWith(root.endsWith(sep) ? root : root + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": types[extname(file)] || "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end(`not found: ${path}`);
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

async function main() {
  const server = await serve();
  const url = `http://127.0.0.1:${server.address().port}/tests/conformance.html`;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox"],
  });
  try {
    const page = await browser.newPage();
    page.on("console", (m) => console.log(`[page ${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => console.log(`[page error] ${e.message}`));
    await page.goto(url);
    await page.waitForFunction(() => globalThis.conformanceResult !== undefined, null, { timeout: timeoutMs });
    return await page.evaluate(() => globalThis.conformanceResult);
  } finally {
    await browser.close();
    server.close();
  }
}

try {
  const result = await main();
  if (result.ok) {
    console.log("IndexedDB store conformance: passed");
    process.exit(0);
  }
  console.error(`IndexedDB store conformance: FAILED\n${result.message}`);
  process.exit(1);
} catch (e) {
  console.error(`IndexedDB store conformance: could not run: ${e && e.stack || e}`);
  process.exit(2);
}
