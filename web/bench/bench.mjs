// The browser client's figures (docs/benchmarks.md), in headless Chromium
// against a real `deltasync serve`:
// - first sync of N changes (default 100,000) into an empty IndexedDB
//   replica: pulled, verified and applied (written as segments), and how
//   long until the page has folded the segments into per-entity rows;
// - 10,000 local writes: one `db.write` batch, batches of 100, and one
//   `db.put` at a time;
// - the size of deltasync.js, its glue and its wasm, gzipped;
// - the ceiling: plain IndexedDB puts, one row per entity, in this browser.
// Entity ids are random UUIDs and each task is ~200 bytes, as apps send.
//
// Usage: node web/bench/bench.mjs [changes]   (after web/build.sh)
// Env: DELTASYNC_BIN (default target/release/deltasync), CHROMIUM (default /usr/bin/chromium).
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { mkdtemp, readFile, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { extname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { chromium } from "playwright-core";

const web = fileURLToPath(new URL("..", import.meta.url));
const bin = process.env.DELTASYNC_BIN || join(web, "../target/release/deltasync");
const changes = Number(process.argv[2] || 100_000);
const writes = 10_000;

/** Starts `deltasync serve` on a fresh SQLite file; resolves to its URL and process. */
async function startServer(dir) {
  const child = spawn(bin, ["serve", "--database", `sqlite://${join(dir, "server.db")}`, "--listen", "127.0.0.1:0", "--cors-origin", "*"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  const url = await new Promise((resolve, reject) => {
    child.on("exit", (code) => reject(new Error(`deltasync serve exited with ${code}`)));
    child.stdout.on("data", (d) => {
      const m = /listening on (\S+)/.exec(String(d));
      if (m) resolve(m[1]);
    });
  });
  return { url, child };
}

/** A static server for web/ (the page and dist/). */
function serveWeb() {
  const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm" };
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    if (path.includes("..")) return res.writeHead(403).end();
    try {
      const body = await readFile(join(web, path));
      res.writeHead(200, { "content-type": types[extname(path)] || "application/octet-stream" }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

/** A task as apps write it: about 200 bytes of JSON. */
function task(i) {
  return {
    title: `Task number ${i} with a reasonably long title`,
    done: i % 3 === 0,
    priority: i % 5,
    tags: ["work", "home", `t${i % 17}`],
    notes: "Call the supplier about the delivery window",
    estimate: (i % 100) / 4,
  };
}

/** Pushes `n` changes to new entities with random UUID ids, 1,000 per request, as one device. */
async function seed(url, n) {
  const device = "bench-seed";
  let ms = Date.now();
  let counter = 0;
  for (let start = 0; start < n; start += 1000) {
    const batch = [];
    for (let i = start; i < Math.min(n, start + 1000); i++) {
      counter += 1;
      if (counter > 99_999) {
        ms += 1;
        counter = 0;
      }
      const hlc = `${String(ms).padStart(13, "0")}-${String(counter).padStart(5, "0")}-${device}`;
      batch.push({ change_id: `seed-${i}-${crypto.randomUUID()}`, collection: "tasks", entity_id: crypto.randomUUID(), op: "upsert", data: task(i), hlc });
    }
    const resp = await fetch(`${url}/v1/push`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ device_id: device, changes: batch }),
    });
    if (!resp.ok) throw new Error(`seeding: push answered ${resp.status}: ${await resp.text()}`);
  }
}

async function gzippedSize() {
  const dist = join(web, "dist");
  const files = (await readdir(dist, { recursive: true })).filter((f) => /\.(js|wasm)$/.test(f) && !f.endsWith(".d.ts"));
  let total = 0;
  const each = {};
  for (const f of files) {
    const size = gzipSync(await readFile(join(dist, f)), { level: 9 }).length;
    each[f] = size;
    total += size;
  }
  return { total, each };
}

async function main() {
  const dir = await mkdtemp(join(tmpdir(), "deltasync-web-bench-"));
  const { url, child } = await startServer(dir);
  const web = await serveWeb();
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
  try {
    process.stderr.write(`seeding ${changes} changes… `);
    let t = performance.now();
    await seed(url, changes);
    process.stderr.write(`${((performance.now() - t) / 1000).toFixed(1)} s\n`);
    const page = await browser.newPage();
    page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
    await page.goto(`http://127.0.0.1:${web.address().port}/bench/index.html`);
    await page.waitForFunction(() => window.ready);
    // BENCH_PROFILE=FILE: a CPU profile of the first sync (chrome://inspect, or speedscope).
    const profile = process.env.BENCH_PROFILE && (await page.context().newCDPSession(page));
    if (profile) {
      await profile.send("Profiler.enable");
      await profile.send("Profiler.setSamplingInterval", { interval: 500 });
      await profile.send("Profiler.start");
      page.exposeFunction("benchFirstSyncDone", async () => {
        const { profile: data } = await profile.send("Profiler.stop");
        const { writeFile } = await import("node:fs/promises");
        await writeFile(process.env.BENCH_PROFILE, JSON.stringify(data));
      });
    }
    const figures = await page.evaluate(
      async ({ server, writes }) => {
        const task = (i) => ({ title: `Task number ${i} with a reasonably long title`, done: false, priority: i % 5, tags: ["work"], notes: "x".repeat(100) });
        const out = {};
        const db = await deltasync.open({ name: "bench-first-sync", server, persist: false });
        let t = performance.now();
        const first = await db.sync();
        let s = (performance.now() - t) / 1000;
        if (window.benchFirstSyncDone) await window.benchFirstSyncDone();
        out.first_sync = { seconds: s, received: first.pulled + first.bootstrapped, per_sec: (first.pulled + first.bootstrapped) / s, pulled: first.pulled, bootstrapped: first.bootstrapped, verified: first.verified, cursor: first.cursor };
        // The sync wrote its pages as segments, which the page then folds
        // into per-entity rows in the background: how long until that is done.
        const segments = () =>
          new Promise((resolve, reject) => {
            const r = indexedDB.open("bench-first-sync");
            r.onsuccess = () => {
              const idb = r.result;
              const count = idb.transaction(["segments"]).objectStore("segments").count();
              count.onsuccess = () => (idb.close(), resolve(count.result));
              count.onerror = () => reject(count.error);
            };
            r.onerror = () => reject(r.error);
          });
        out.first_sync.segments_after_sync = await segments();
        while ((await segments()) > 0) await new Promise((r) => setTimeout(r, 100));
        const folded = (performance.now() - t) / 1000;
        out.first_sync.folded_after_seconds = folded;
        out.first_sync.per_sec_including_fold = (first.pulled + first.bootstrapped) / folded;
        const listed = (await db.list("tasks")).length;
        out.first_sync.listed = listed;
        await db.close();

        const local = await deltasync.open({ name: "bench-writes", persist: false });
        const ops = (from, n) => Array.from({ length: n }, (_, k) => ({ op: "put", collection: "tasks", id: crypto.randomUUID(), data: task(from + k) }));
        t = performance.now();
        await local.write(ops(0, writes));
        s = (performance.now() - t) / 1000;
        out.one_batch = { seconds: s, per_sec: writes / s };
        t = performance.now();
        for (let b = 0; b < writes; b += 100) await local.write(ops(writes + b, 100));
        s = (performance.now() - t) / 1000;
        out.batches_of_100 = { seconds: s, per_sec: writes / s };
        const single = writes / 5;
        t = performance.now();
        for (let i = 0; i < single; i++) await local.put("tasks", crypto.randomUUID(), task(i));
        s = (performance.now() - t) / 1000;
        out.one_at_a_time = { writes: single, seconds: s, per_sec: single / s };
        out.pending = (await local.status()).pending;
        await local.close();

        // The ceiling: plain IndexedDB puts of 100,000 such rows (one per
        // entity, 10,000 per relaxed transaction), no reads, no engine.
        const raw = await new Promise((resolve, reject) => {
          const r = indexedDB.open("bench-raw-idb", 1);
          r.onupgradeneeded = () => r.result.createObjectStore("e");
          r.onsuccess = () => resolve(r.result);
          r.onerror = () => reject(r.error);
        });
        const row = JSON.stringify({ state: task(0), version: 1, hash: "a".repeat(64) });
        t = performance.now();
        for (let p = 0; p < 10; p++) {
          const tx = raw.transaction(["e"], "readwrite", { durability: "relaxed" });
          const store = tx.objectStore("e");
          for (let i = 0; i < 10_000; i++) store.put(row, ["tasks", crypto.randomUUID()]);
          await new Promise((resolve) => (tx.oncomplete = resolve));
        }
        out.raw_indexeddb_puts = { per_sec: 100_000 / ((performance.now() - t) / 1000) };
        raw.close();
        return out;
      },
      { server: url, writes },
    );
    figures.size_gzipped = await gzippedSize();
    figures.changes = changes;
    console.log(JSON.stringify(figures, null, 2));
  } finally {
    await browser.close();
    web.close();
    child.kill();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
