// End-to-end scenarios of the browser client against real processes: real
// `deltasync serve` servers (SQLite files in a temporary directory), real
// `deltasync client` devices, and headless Chromium running web/dist.
//
// Runs every scenario, prints each one's name with PASS or FAIL (and why),
// and exits 0 only when all passed (1 when one failed, 2 when it could not
// run at all). The whole run is bounded (E2E_TIMEOUT_MS, default 5 minutes);
// the servers it starts are killed when it exits, however it exits.
//
//   DELTASYNC_BIN   the deltasync binary (required; cargo build -p deltasync-cli)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//   E2E_ONLY        run only the scenarios whose name contains one of these comma-separated words
//   E2E_KEEP        keep the temporary directory (its path is printed)
//
// Needs web/dist (web/build.sh) and `npm ci` in web/.
//
// Test pages and web/dist are served by a node server on a port of their own,
// so the page's origin differs from the API's and CORS (`--cors-origin`) is
// exercised; the example-app scenario uses `deltasync serve --static` instead.
import { spawn, execFile } from "node:child_process";
import { createServer } from "node:http";
import { createServer as createTcpServer } from "node:net";
import { cp, mkdir, mkdtemp, readFile, rm, writeFile, access } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, extname, join, normalize, sep } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const webRoot = fileURLToPath(new URL("..", import.meta.url));
const repoRoot = fileURLToPath(new URL("../..", import.meta.url));
const BIN = process.env.DELTASYNC_BIN;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TOTAL_MS = Number(process.env.E2E_TIMEOUT_MS || 300_000);
const SCENARIO_MS = Number(process.env.E2E_SCENARIO_MS || 90_000);
const ONLY = (process.env.E2E_ONLY || "").split(",").map((s) => s.trim()).filter(Boolean);

// ---------------------------------------------------------------------------
// Child processes: every one is killed when this script exits.

const children = new Set();

function killChildren() {
  for (const child of children) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
}

process.on("exit", killChildren);
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    console.error(`e2e: ${signal}: stopping`);
    process.exit(130);
  });
}

// ---------------------------------------------------------------------------
// Small helpers.

class Failure extends Error {}

function assert(condition, message) {
  if (!condition) throw new Failure(typeof message === "function" ? message() : message);
}

/** JSON with object keys sorted, to compare values whatever their key order. */
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value && typeof value === "object") {
    return `{${Object.keys(value)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value);
}

function assertEqual(actual, expected, what) {
  assert(canonical(actual) === canonical(expected), () => `${what}:\n  got      ${canonical(actual)}\n  expected ${canonical(expected)}`);
}

/**
 * Polls `check` until it returns without throwing and with something other
 * than false/undefined, or the deadline passes: then fails with `what` and the
 * last reason `check` gave (an assertion it threw).
 */
async function until(what, check, { timeout = 15_000, every = 200 } = {}) {
  const deadline = Date.now() + timeout;
  let last = "";
  for (;;) {
    try {
      const value = await check();
      if (value !== false && value !== undefined) return value;
    } catch (e) {
      last = e && e.message ? e.message : String(e);
    }
    if (Date.now() > deadline) throw new Failure(`timed out after ${timeout} ms waiting for ${what}${last ? `; last: ${last}` : ""}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Failure(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A TCP port free right now on 127.0.0.1 (for a server that must keep its URL across restarts). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createTcpServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** The members every sync report has (as `deltasync client sync` prints it), with sane values. */
function checkReport(report, who) {
  assert(report && typeof report === "object", `${who}: the sync report is not an object: ${canonical(report)}`);
  for (const key of ["pushed", "applied", "duplicate", "restored", "pulled", "conflicts", "failed", "restamped", "pending", "cursor"]) {
    assert(Number.isInteger(report[key]) && report[key] >= 0, `${who}: report member ${key} is not a count: ${canonical(report)}`);
  }
  for (const key of ["state_hash", "state_digest"]) {
    assert(/^[0-9a-f]{64}$/.test(report[key]), `${who}: report member ${key} is not a hash: ${canonical(report)}`);
  }
  for (const key of ["verified", "healed"]) {
    assert(typeof report[key] === "boolean", `${who}: report member ${key} is not a boolean: ${canonical(report)}`);
  }
  assert(Array.isArray(report.lost), `${who}: report member lost is not an array: ${canonical(report)}`);
  assert(report.pushed === report.applied + report.duplicate, `${who}: pushed is not applied + duplicate: ${canonical(report)}`);
  return report;
}

const ids = (list) => list.map((e) => e.id);

// ---------------------------------------------------------------------------
// deltasync processes.

/**
 * Starts `deltasync serve` on 127.0.0.1 (port 0 unless given) on the SQLite
 * file `dbFile`, and resolves once it printed its URL.
 */
async function startServer({ dbFile, port = 0, cors, secretFile, staticDir }) {
  const args = ["serve", "--listen", `127.0.0.1:${port}`, "--database", `sqlite://${dbFile}`];
  if (cors) args.push("--cors-origin", cors);
  if (secretFile) args.push("--auth", "jwt", "--jwt-secret-file", secretFile);
  if (staticDir) args.push("--static", staticDir);
  const child = spawn(BIN, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "warn" } });
  children.add(child);
  let log = "";
  child.stderr.on("data", (d) => {
    log = (log + d).slice(-8000);
  });
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  exited.then(() => children.delete(child));
  const url = await new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout });
    const timer = setTimeout(() => reject(new Error(`deltasync serve printed no URL in 20 s; stderr: ${log}`)), 20_000);
    lines.once("line", (line) => {
      clearTimeout(timer);
      const m = /^deltasync listening on (\S+)/.exec(line);
      if (m) resolve(m[1]);
      else reject(new Error(`deltasync serve: unexpected first line ${JSON.stringify(line)}`));
    });
    child.once("error", (e) => reject(new Error(`cannot start ${BIN}: ${e.message}`)));
    exited.then(({ code, signal }) => reject(new Error(`deltasync serve ${args.join(" ")} exited (${code ?? signal}): ${log}`)));
  });
  return {
    url,
    args,
    log: () => log,
    /** SIGTERM, then waits for the exit (a clean stop commits everything). */
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      const { code, signal } = await withTimeout(exited, 40_000, "the server's shutdown");
      assert(code === 0, `the server did not stop cleanly (${code ?? signal}): ${log}`);
    },
    kill() {
      child.kill("SIGKILL");
    },
  };
}

/** Runs the deltasync binary; resolves to { code, stdout, stderr } whatever the exit code. */
function runBin(args, { timeout = 60_000 } = {}) {
  return new Promise((resolve) => {
    const env = { ...process.env, RUST_LOG: "warn" };
    delete env.DELTASYNC_SERVER;
    delete env.DELTASYNC_TOKEN;
    const child = execFile(BIN, args, { env, timeout, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      children.delete(child);
      resolve({ code: error ? (typeof error.code === "number" ? error.code : -1) : 0, stdout, stderr });
    });
    children.add(child);
  });
}

/** A command-line device: one SQLite file driven by `deltasync client`, one process per command. */
class CliDevice {
  constructor(dir, name, { token } = {}) {
    this.name = name;
    this.db = join(dir, `${name}.db`);
    this.token = token;
  }

  /** `deltasync client --db DB [--server URL] [--token T] ARGS…`. */
  run(args, { server } = {}) {
    const full = ["client", "--db", this.db];
    if (server) full.push("--server", server);
    if (this.token) full.push("--token", this.token);
    return runBin([...full, ...args]);
  }

  /** A command that must succeed: its stdout as JSON. */
  async ok(args, options) {
    const out = await this.run(args, options);
    assert(out.code === 0, `${this.name}: deltasync client ${args.join(" ")} failed (${out.code}): ${out.stderr.trim()}`);
    return JSON.parse(out.stdout);
  }

  put(collection, id, data) {
    return this.ok(["put", collection, id, JSON.stringify(data)]);
  }

  patch(collection, id, data) {
    return this.ok(["patch", collection, id, JSON.stringify(data)]);
  }

  delete(collection, id) {
    return this.ok(["delete", collection, id]);
  }

  list(collection) {
    return this.ok(["list", collection]);
  }

  async get(collection, id) {
    const out = await this.run(["get", collection, id]);
    if (out.code === 0) return JSON.parse(out.stdout);
    assert(/"not_found"/.test(out.stderr), `${this.name}: get ${collection} ${id} failed: ${out.stderr.trim()}`);
    return null;
  }

  async sync(server) {
    return checkReport(await this.ok(["sync"], { server }), `${this.name} sync`);
  }
}

/** `deltasync token`: a JWT for `user`, signed with the secret in `secretFile`. */
async function mintToken(user, secretFile) {
  const out = await runBin(["token", "--user", user, "--secret-file", secretFile]);
  assert(out.code === 0, `deltasync token failed: ${out.stderr}`);
  const text = out.stdout.trim();
  // Printed bare, or as JSON {"token": …}.
  if (text.startsWith("{")) return JSON.parse(text).token;
  if (text.startsWith('"')) return JSON.parse(text);
  return text;
}

/** Every change in the server's log, pulled from 0 by an observer device (one page). */
async function serverLog(url, token) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const res = await fetch(`${url}/v1/pull?device_id=e2e-observer&cursor=0&limit=10000`, { headers });
  const body = await res.json();
  assert(res.status === 200, `pull from 0 answered ${res.status}: ${canonical(body)}`);
  assert(body.has_more === false, "the log does not fit one page");
  return body.changes;
}

async function serverStatus(url, token) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const res = await fetch(`${url}/v1/status`, { headers });
  const body = await res.json();
  assert(res.status === 200, `status answered ${res.status}: ${canonical(body)}`);
  return body;
}

// ---------------------------------------------------------------------------
// The pages' side.

const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".wasm": "application/wasm",
  ".json": "application/json",
};

/** A static server for web/ (tests/harness.html, dist/…) on a free port of 127.0.0.1. */
function serveWeb() {
  const server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = join(webRoot, path);
    if (!file.startsWith(webRoot.endsWith(sep) ? webRoot : webRoot + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": types[extname(file)] || "application/octet-stream", "cache-control": "no-store" });
      res.end(body);
    } catch {
      res.writeHead(404).end(`not found: ${path}`);
    }
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve({ server, origin: `http://127.0.0.1:${server.address().port}` })),
  );
}

/** One page of tests/harness.html: a remote control for one database (`window.harness`). */
class Tab {
  constructor(page, name, logs) {
    this.page = page;
    this.name = name;
    this.logs = logs;
    this.options = null;
    /** Errors thrown in the page since it was made (loading the harness included). */
    this.errors = [];
    page.on("pageerror", (e) => this.errors.push(e.message));
  }

  /** Waits for the harness to load (it imports /dist/deltasync.js). */
  async ready() {
    // Loaded, or an error thrown while loading (a missing export): whichever comes first.
    const deadline = Date.now() + 20_000;
    while (this.errors.length === 0 && Date.now() < deadline) {
      if (await this.page.evaluate(() => window.harnessReady === true).catch(() => false)) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Failure(`${this.name}: the harness page did not load: ${this.logs.slice(-10).join(" | ") || "no console output"}`);
  }

  /** Opens the database in this page (`open(options)`); resolves to the device id. */
  async open(options) {
    this.options = options;
    const r = await this.page.evaluate(async (o) => {
      try {
        return { ok: await window.harness.open(o) };
      } catch (e) {
        return { error: { code: e && e.code, message: String((e && e.message) || e) } };
      }
    }, options);
    const shown = { ...options };
    if (shown.token) shown.token = "…";
    assert(!r.error, () => `${this.name}: open(${canonical(shown)}) rejected: ${r.error.code}: ${r.error.message}`);
    return r.ok;
  }

  /** Reloads the page and opens the same database again. */
  async reload() {
    this.errors.length = 0;
    await this.page.reload();
    await this.ready();
    return this.open(this.options);
  }

  /** Calls `db[method](...args)`; resolves to `{ ok: value }` or `{ error: { code, message } }`. */
  attempt(method, ...args) {
    return this.page.evaluate(([m, a]) => window.harness.call(m, ...a), [method, args]);
  }

  /** Calls `db[method](...args)`, which must resolve; its value. */
  async call(method, ...args) {
    const r = await this.attempt(method, ...args);
    assert(!r.error, () => `${this.name}: db.${method}(${args.map((a) => canonical(a)).join(", ")}) rejected: ${r.error.code}: ${r.error.message}`);
    return r.ok;
  }

  put(collection, id, data) {
    return this.call("put", collection, id, data);
  }

  patch(collection, id, data) {
    return this.call("patch", collection, id, data);
  }

  list(collection) {
    return this.call("list", collection);
  }

  status() {
    return this.call("status");
  }

  async sync() {
    return checkReport(await this.call("sync"), `${this.name} sync`);
  }

  /** Every event the open database delivered to this page so far. */
  events() {
    return this.page.evaluate(() => window.harness.events);
  }

  deviceId() {
    return this.page.evaluate(() => window.harness.db.deviceId);
  }

  close() {
    return this.page.evaluate(() => window.harness.close());
  }
}

/** Resources of one scenario, released in reverse order when it ends. */
class Scope {
  constructor(env, name) {
    this.env = env;
    this.name = name;
    this.cleanups = [];
    this.logs = [];
    this.dir = join(env.tmp, name.replace(/[^a-z0-9]+/gi, "-"));
  }

  defer(fn) {
    this.cleanups.push(fn);
  }

  async release() {
    for (const fn of this.cleanups.reverse()) {
      try {
        await fn();
      } catch {
        // best effort
      }
    }
  }

  /** A server on a fresh SQLite file in this scenario's directory (or `dbFile`), allowing the test pages' origin. */
  async server(options = {}) {
    await mkdir(this.dir, { recursive: true });
    const server = await startServer({ dbFile: join(this.dir, "server.db"), cors: this.env.web.origin, ...options });
    this.defer(() => server.kill());
    return server;
  }

  cli(name, options) {
    return new CliDevice(this.dir, name, options);
  }

  /** A fresh browser profile (its own IndexedDB: another device). */
  async context() {
    const context = await this.env.browser.newContext();
    this.defer(() => context.close());
    return context;
  }

  /** Pipes a page's console and errors into this scenario's log (printed when it fails). */
  watch(page, name) {
    page.on("console", (m) => this.logs.push(`[${name} ${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => this.logs.push(`[${name} error] ${e.message}`));
  }

  /** A harness page in `context`, with the database `options` opened when given. */
  async tab(context, options, name = options ? options.name : "tab") {
    const page = await context.newPage();
    this.watch(page, name);
    const tab = new Tab(page, name, this.logs);
    await page.goto(`${this.env.web.origin}/tests/harness.html`);
    await tab.ready();
    tab.errors.length = 0;
    if (options) await tab.open(options);
    return tab;
  }
}

// ---------------------------------------------------------------------------
// Scenarios.

const TASKS = "tasks";

/** a. Two browsers and a CLI device edit the same tasks, sync a couple of rounds, and converge. */
async function twoBrowsersAndACliConverge(s) {
  const server = await s.server();
  const a = await s.tab(await s.context(), { name: "converge", server: server.url, live: false }, "browser A");
  const b = await s.tab(await s.context(), { name: "converge", server: server.url, live: false }, "browser B");
  const cli = s.cli("cli");
  assert((await a.deviceId()) !== (await b.deviceId()), "two browser profiles got the same device id");
  assert((await a.status()).device_id === (await a.deviceId()), "db.deviceId is not status().device_id");

  await a.put(TASKS, "t1", { title: "one", done: false });
  await a.put(TASKS, "t2", { title: "two", done: false });
  await a.put(TASKS, "t3", { title: "three", done: false });
  assert((await a.sync()).applied === 3, "A's first sync did not apply its 3 tasks");
  await b.sync();
  await cli.sync(server.url);
  assertEqual(await b.list(TASKS), await a.list(TASKS), "B after pulling A's tasks");
  const pulled = (await b.events()).filter((e) => e.type === "change" && e.origin === "server").flatMap((e) => e.entities);
  for (const id of ["t1", "t2", "t3"]) {
    assert(pulled.some((x) => x.collection === TASKS && x.id === id), `B got no change event (origin server) for ${id}: ${canonical(pulled)}`);
  }
  assertEqual(await cli.list(TASKS), await a.list(TASKS), "the CLI after pulling A's tasks");

  // Concurrent edits, each side unaware of the others.
  await a.patch(TASKS, "t1", { title: "one (A)" }); // different fields of t1
  await b.patch(TASKS, "t1", { done: true });
  // The same field of t2, three ways: A first, B last (HLCs follow the one wall clock here).
  const aT2 = await a.patch(TASKS, "t2", { title: "two (A)" });
  await cli.patch(TASKS, "t2", { title: "two (cli)" });
  await b.patch(TASKS, "t2", { title: "two (B)" });
  await b.call("delete", TASKS, "t3"); // a delete racing an update
  await cli.patch(TASKS, "t3", { done: true });
  await a.put(TASKS, "t4", { title: "four (A)", done: false });
  await b.put(TASKS, "t5", { title: "five (B)", done: false });
  await cli.put(TASKS, "t6", { title: "six (cli)", done: false });

  // A syncs last in each round, so its t2 title, the oldest write, reaches the
  // server after newer ones and loses: its report must list it in `lost`.
  const rounds = [];
  for (let round = 1; round <= 2; round++) {
    const cliReport = await cli.sync(server.url);
    const bReport = await b.sync();
    rounds.push({ cli: cliReport, b: bReport, a: await a.sync() });
  }
  const last = rounds[1];
  const aLost = rounds[0].a.lost;
  assert(
    aLost.some((l) => l.change_id === aT2 && l.collection === TASKS && l.entity_id === "t2"),
    () => `A's title of t2 lost to newer writes, but A's sync report does not list it in lost: ${canonical(rounds[0].a)}`,
  );
  for (const [who, report] of Object.entries(last)) {
    assert(report.verified === true, `${who}'s last sync is not verified: ${canonical(report)}`);
    assert(report.pending === 0, `${who} still has pending changes: ${canonical(report)}`);
  }
  const st = await serverStatus(server.url);
  for (const [who, report] of Object.entries(last)) {
    assert(report.state_digest === st.state_digest, `${who}'s state_digest ${report.state_digest} is not the server's ${st.state_digest}`);
  }
  assert(last.a.state_digest === last.b.state_digest && last.b.state_digest === last.cli.state_digest, "the three state_digests differ");

  const list = await a.list(TASKS);
  assertEqual(await b.list(TASKS), list, "B's list vs A's");
  assertEqual(await cli.list(TASKS), list, "the CLI's list vs A's");
  const t1 = list.find((e) => e.id === "t1");
  assertEqual(t1 && t1.data, { title: "one (A)", done: true }, "t1: edits of different fields both kept");
  const t2 = list.find((e) => e.id === "t2");
  assertEqual(t2 && t2.data, { title: "two (B)", done: false }, "t2: the newest title wins");
  for (const id of ["t4", "t5", "t6"]) assert(ids(list).includes(id), `${id} is missing: ${canonical(list)}`);
  for (const tab of [a, b]) {
    const status = await tab.status();
    assert(status.pending === 0 && status.failed === 0, `${tab.name}: ${canonical(status)}`);
    assert(status.state_digest === st.state_digest, `${tab.name}: status digest ${status.state_digest} vs server ${st.state_digest}`);
  }
}

/** b. Offline edits survive a reload and reach the server once online. */
async function offlineEditsSurviveAReload(s) {
  const server = await s.server();
  const context = await s.context();
  const tab = await s.tab(context, { name: "offline", server: server.url, live: false });
  const cli = s.cli("cli");

  await tab.put(TASKS, "o1", { title: "before", done: false });
  assert((await tab.sync()).applied === 1, "the online put was not applied");

  await context.setOffline(true);
  await tab.put(TASKS, "o2", { title: "written offline", done: false });
  await tab.patch(TASKS, "o1", { done: true });
  const offline = await tab.attempt("sync");
  assert(offline.error, `sync() resolved while offline: ${canonical(offline.ok)}`);
  assert(offline.error.code === "unreachable", `sync() offline rejected with code ${offline.error.code} (${offline.error.message}), not unreachable`);
  const failing = await tab.status();
  assert(
    failing.last_error && failing.last_error.code === "unreachable" && failing.failed_syncs >= 1 && failing.failing_since !== null,
    `status() after the failed sync does not show it (last_error, failed_syncs, failing_since): ${canonical(failing)}`,
  );
  const errorEvents = (await tab.events()).filter((e) => e.type === "sync-error");
  assert(
    errorEvents.some((e) => e.error && e.error.code === "unreachable"),
    `no sync-error event with code unreachable: ${canonical(errorEvents)}`,
  );

  // Reload: the page itself must come over the network, so go online for the
  // pages but keep the deltasync server unreachable from the browser.
  const api = `${server.url}/**`;
  await context.route(api, (route) => route.abort("internetdisconnected"));
  await context.setOffline(false);
  await tab.reload();
  const list = await tab.list(TASKS);
  assertEqual(list, [
    { id: "o1", data: { title: "before", done: true } },
    { id: "o2", data: { title: "written offline", done: false } },
  ], "the list after a reload");
  const status = await tab.status();
  assert(status.pending === 2, `status().pending after the reload is ${status.pending}, not 2: ${canonical(status)}`);
  const blocked = await tab.attempt("sync");
  assert(blocked.error && blocked.error.code === "unreachable", `sync() with the server unreachable: ${canonical(blocked)}`);
  assert((await serverLog(server.url)).length === 1, "the server got offline changes before the page was online");

  await context.unroute(api);
  const report = await tab.sync();
  assert(report.applied === 2 && report.verified && report.pending === 0, `the sync back online: ${canonical(report)}`);
  const healthy = await tab.status();
  assert(healthy.last_error === null && healthy.failed_syncs === 0, `status() after a good sync still shows the failure: ${canonical(healthy)}`);
  await cli.sync(server.url);
  assertEqual(await cli.get(TASKS, "o2"), { title: "written offline", done: false }, "the CLI's o2");
  assertEqual(await cli.get(TASKS, "o1"), { title: "before", done: true }, "the CLI's o1");
}

/** c. Two tabs of one database: one syncs at a time, each change reaches the server once, events reach both. */
async function twoTabsShareOneReplica(s) {
  const server = await s.server();
  const context = await s.context();
  const options = { name: "tabs", server: server.url, live: true, debounce: 200, interval: 5000 };
  const one = await s.tab(context, options, "tab 1");
  const two = await s.tab(context, options, "tab 2");
  assert((await one.deviceId()) === (await two.deviceId()), "two tabs of one database have different device ids");
  await one.call("start");
  await two.call("start");

  const written = [];
  for (let i = 0; i < 5; i++) {
    const [c1, c2] = await Promise.all([
      one.put(TASKS, `c-1-${i}`, { title: `tab 1 task ${i}`, done: false }),
      two.put(TASKS, `c-2-${i}`, { title: `tab 2 task ${i}`, done: false }),
    ]);
    written.push(c1, c2);
  }
  assert(written.every((id) => typeof id === "string"), `put resolved to something other than change ids: ${canonical(written)}`);
  assert(new Set(written).size === 10, `the two tabs made clashing change ids: ${canonical(written)}`);
  const expected = [0, 1, 2, 3, 4].flatMap((i) => [`c-1-${i}`, `c-2-${i}`]).sort();

  await until("both tabs to list all 10 tasks with nothing pending", async () => {
    for (const tab of [one, two]) {
      assertEqual(ids(await tab.list(TASKS)), expected, `${tab.name}'s task ids`);
      const st = await tab.status();
      assert(st.pending === 0, `${tab.name}: pending ${st.pending}`);
    }
    return true;
  }, { timeout: 30_000 });

  const log = await serverLog(server.url);
  const counts = new Map();
  for (const c of log) counts.set(c.change_id, (counts.get(c.change_id) || 0) + 1);
  for (const id of written) assert(counts.get(id) === 1, `change ${id} is in the server's log ${counts.get(id) || 0} times`);
  assert(log.length === 10, `the server's log holds ${log.length} changes, not 10`);

  // Tab 1 heard of tab 2's writes, and of every sync (whichever tab ran it):
  // together they pushed each change once, none twice.
  await until("tab 1 to see a change event for a task written in tab 2", async () => {
    const events = await one.events();
    return events.some((e) => e.type === "change" && e.entities.some((x) => x.collection === TASKS && x.id === "c-2-0"));
  }, { timeout: 10_000 });
  await until("tab 1 to hear of syncs applying all 10 changes", async () => {
    const syncs = (await one.events()).filter((e) => e.type === "sync").map((e) => e.report);
    const applied = syncs.reduce((n, r) => n + r.applied, 0);
    const duplicate = syncs.reduce((n, r) => n + r.duplicate, 0);
    assert(duplicate === 0, `the tabs' syncs pushed ${duplicate} changes twice (duplicate): ${canonical(syncs)}`);
    assert(applied === 10, `sync events in tab 1 count ${applied} applied changes, not 10: ${canonical(syncs)}`);
    return true;
  }, { timeout: 10_000 });

  // Manual syncs in both tabs at once, while the runner may be syncing too: they take turns.
  const more = [await one.put(TASKS, "c-1-9", { title: "tab 1, last", done: false }), await two.put(TASKS, "c-2-9", { title: "tab 2, last", done: false })];
  const [r1, r2] = await Promise.all([one.sync(), two.sync()]);
  for (const r of [r1, r2]) assert(r.verified && r.duplicate === 0, `a manual sync in both tabs at once: ${canonical(r)}`);
  const log2 = await serverLog(server.url);
  assert(log2.length === 12, `the server's log holds ${log2.length} changes, not 12`);
  for (const id of more) assert(log2.filter((c) => c.change_id === id).length === 1, `change ${id} is not in the log exactly once`);

  const cli = s.cli("cli");
  await cli.sync(server.url);
  assertEqual(await cli.list(TASKS), await one.list(TASKS), "the CLI's list vs tab 1's");
  await one.call("stop");
  await two.call("stop");
}

/** d. A bad token: the sync is refused, the change waits; with a good token it goes. */
async function aBadTokenKeepsTheChange(s) {
  await mkdir(s.dir, { recursive: true });
  const secretFile = join(s.dir, "secret.txt");
  const otherSecret = join(s.dir, "other-secret.txt");
  await writeFile(secretFile, "e2e-secret-of-the-server\n");
  await writeFile(otherSecret, "some-other-secret\n");
  const server = await s.server({ secretFile });
  const good = await mintToken("alice", secretFile);
  const bad = await mintToken("alice", otherSecret);

  const tab = await s.tab(await s.context(), { name: "jwt", server: server.url, token: bad, live: false });
  const changeId = await tab.put(TASKS, "j1", { title: "needs a token", done: false });
  const refused = await tab.attempt("sync");
  assert(refused.error, `sync() with a bad token resolved: ${canonical(refused.ok)}`);
  assert(refused.error.code === "unauthorized", `sync() with a bad token rejected with ${refused.error.code} (${refused.error.message}), not unauthorized`);
  const st = await tab.status();
  assert(st.last_error && st.last_error.code === "unauthorized", `status().last_error after the refusal: ${canonical(st.last_error)}`);
  const pending = await tab.call("exportPending");
  assert(
    pending.some((e) => e.change_id === changeId && e.entity_id === "j1" && e.state === "pending"),
    `exportPending() after the refusal lacks the change: ${canonical(pending)}`,
  );

  await tab.close();
  await tab.open({ name: "jwt", server: server.url, token: good, live: false });
  const report = await tab.sync();
  assert(report.applied === 1 && report.verified && report.pending === 0, `the sync with a good token: ${canonical(report)}`);
  assertEqual(await tab.call("exportPending"), [], "exportPending() after the sync");
  const log = await serverLog(server.url, good);
  assert(log.some((c) => c.change_id === changeId), `the server's log lacks change ${changeId}`);
  const cli = s.cli("cli", { token: good });
  await cli.sync(server.url);
  assertEqual(await cli.get(TASKS, "j1"), { title: "needs a token", done: false }, "the CLI's j1");
}

/** e. The server comes back from an older copy: the page heals and gives back what the copy lacks. */
async function aRestoredServerHeals(s) {
  const backups = await restorableServer(s);
  let server = backups.server;
  const tab = await s.tab(await s.context(), { name: "restore", server: server.url, live: false });

  await tab.put(TASKS, "r1", { title: "in the backup", done: false });
  await tab.put(TASKS, "r2", { title: "in the backup too", done: false });
  assert((await tab.sync()).applied === 2, "the first sync did not apply 2 changes");

  // The backup: the files of the cleanly stopped server.
  server = await backups.backUp();

  await tab.put(TASKS, "r3", { title: "after the backup", done: false });
  await tab.patch(TASKS, "r1", { done: true });
  const after = await tab.sync();
  assert(after.applied === 2 && after.verified, `the sync after the backup: ${canonical(after)}`);

  // The restore, on the same URL.
  server = await backups.restore();
  assert((await serverLog(server.url)).length === 2, "the restored server does not hold just the backup's 2 changes");

  await tab.put(TASKS, "r4", { title: "written before the heal", done: false });
  assert((await tab.status()).pending >= 1, "the new write is not pending");
  const report = await tab.sync();
  assert(report.healed === true, `the sync after the restore did not heal: ${canonical(report)}`);
  assert(report.verified === true, `the sync after the restore is not verified: ${canonical(report)}`);
  assert(report.restored === 2, `the sync after the restore gave back ${report.restored} changes, not the 2 the backup lacked: ${canonical(report)}`);
  assert(report.pending === 0, `changes still pending after the heal: ${canonical(report)}`);

  const fresh = s.cli("fresh");
  const cliReport = await fresh.sync(server.url);
  assert(cliReport.verified, `the fresh CLI's sync: ${canonical(cliReport)}`);
  const expected = [
    { id: "r1", data: { title: "in the backup", done: true } },
    { id: "r2", data: { title: "in the backup too", done: false } },
    { id: "r3", data: { title: "after the backup", done: false } },
    { id: "r4", data: { title: "written before the heal", done: false } },
  ];
  assertEqual(await fresh.list(TASKS), expected, "a fresh CLI device's list after the heal");
  assertEqual(await tab.list(TASKS), expected, "the page's list after the heal");
}

/**
 * A server on a port of its own whose SQLite files can be copied aside
 * (`backUp`) and put back (`restore`), each time stopping it cleanly and
 * starting it again on the same URL; both resolve to the new server.
 */
async function restorableServer(s) {
  await mkdir(s.dir, { recursive: true });
  const port = await freePort();
  const dbFile = join(s.dir, "server.db");
  const files = [dbFile, `${dbFile}-wal`, `${dbFile}-shm`];
  const backup = join(s.dir, "backup");
  const saved = [];
  const it = {
    server: await s.server({ port, dbFile }),
    async backUp() {
      await it.server.stop();
      await mkdir(backup);
      for (const f of files) {
        if (await exists(f)) {
          await cp(f, join(backup, basename(f)));
          saved.push(f);
        }
      }
      it.server = await s.server({ port, dbFile });
      return it.server;
    },
    async restore() {
      await it.server.stop();
      for (const f of files) await rm(f, { force: true });
      for (const f of saved) await cp(join(backup, basename(f)), f);
      it.server = await s.server({ port, dbFile });
      return it.server;
    },
  };
  return it;
}

async function exists(path) {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/** f. The example app served by `deltasync serve --static`: a task added in one browser shows in another. */
async function theExampleAppSyncsTwoBrowsers(s) {
  // The page imports ./dist/deltasync.js: serve a copy of the example with web/dist beside it.
  const site = join(s.dir, "site");
  await mkdir(site, { recursive: true });
  const example = join(repoRoot, "examples/web-tasks");
  for (const f of ["index.html", "app.js", "style.css"]) await cp(join(example, f), join(site, f));
  await cp(join(webRoot, "dist"), join(site, "dist"), { recursive: true });
  const server = await s.server({ staticDir: site, cors: undefined });

  const pages = [];
  const contexts = [];
  for (const name of ["app 1", "app 2"]) {
    const context = await s.context();
    contexts.push(context);
    const page = await context.newPage();
    s.watch(page, name);
    await page.goto(`${server.url}/`);
    // Ready, or an error shown: whichever comes first.
    await page.waitForSelector("body[data-ready=true], #error:not(:empty)", { timeout: 20_000 }).catch(() => {});
    if ((await page.getAttribute("body", "data-ready")) !== "true") {
      throw new Failure(`${name}: the app did not start: ${await page.textContent("#error")} ${s.logs.slice(-5).join(" | ")}`);
    }
    pages.push(page);
  }
  const [p1, p2] = pages;
  const seen = (page, title, what) =>
    page
      .waitForFunction(([t]) => [...document.querySelectorAll("li[data-id] .title")].some((i) => i.value === t), [title], { timeout: 15_000 })
      .catch(() => {
        throw new Failure(`${what}: no task titled ${JSON.stringify(title)} within 15 s`);
      });

  const title = `buy oat milk ${Date.now()}`;
  await p1.fill("#new-title", title);
  await p1.click("#add");
  await seen(p1, title, "app 1 after adding through the UI");
  await seen(p2, title, "app 2 (the other browser)");
  const id = await p2.$eval("li[data-id]", (li) => li.dataset.id);

  // Complete it in app 2: app 1 shows it done.
  await p2.check(`li[data-id="${id}"] .done`);
  await p1
    .waitForFunction((i) => document.querySelector(`li[data-id="${i}"] .done`)?.checked === true, id, { timeout: 15_000 })
    .catch(() => {
      throw new Failure("app 1 did not show the task completed in app 2 within 15 s");
    });

  // Rename it in app 1 (edit in place, Enter): app 2 shows the new title.
  const renamed = `${title} (renamed)`;
  await p1.fill(`li[data-id="${id}"] .title`, renamed);
  await p1.press(`li[data-id="${id}"] .title`, "Enter");
  await seen(p2, renamed, "app 2 after the rename in app 1");

  // A rename made offline in app 1 loses to a later one in app 2: once back
  // online, app 1 lists its change among the lost ones.
  await contexts[0].setOffline(true);
  await p1.fill(`li[data-id="${id}"] .title`, `${title} (offline, loses)`);
  await p1.press(`li[data-id="${id}"] .title`, "Enter");
  const winner = `${title} (wins)`;
  await p2.fill(`li[data-id="${id}"] .title`, winner);
  await p2.press(`li[data-id="${id}"] .title`, "Enter");
  // (Not app 2's status line: right after the rename it may still show the
  // "pending 0" of before it.)
  await until("app 2's rename to reach the server", async () =>
    (await serverLog(server.url)).some((c) => c.entity_id === id && c.data && c.data.title === winner),
  );
  await contexts[0].setOffline(false);
  await seen(p1, winner, "app 1 back online");
  await p1
    .waitForFunction((entity) => [...document.querySelectorAll("#lost li")].some((li) => li.textContent.includes(entity)), id, { timeout: 15_000 })
    .catch(async () => {
      throw new Failure(`app 1 does not list its lost rename of ${id}: #lost holds ${JSON.stringify(await p1.textContent("#lost"))}`);
    });

  // Delete it in app 2: it leaves app 1.
  await p2.click(`li[data-id="${id}"] .delete`);
  await p1
    .waitForFunction((i) => !document.querySelector(`li[data-id="${i}"]`), id, { timeout: 15_000 })
    .catch(() => {
      throw new Failure("app 1 still shows the task deleted in app 2 after 15 s");
    });

  // The status line settles: nothing pending, the last sync verified.
  await p1
    .waitForFunction(() => {
      const st = document.querySelector("#status");
      return st.dataset.pending === "0" && st.dataset.verified === "true";
    }, null, { timeout: 15_000 })
    .catch(async () => {
      throw new Failure(`app 1's status line did not settle: ${await p1.textContent("#status")}`);
    });
  const cli = s.cli("cli");
  await cli.sync(server.url);
  assertEqual(await cli.list(TASKS), [], "the CLI's tasks after the delete");
}

/**
 * g. The runner's debounce as deltasync.d.ts documents it: "Syncs caused by
 * local writes are at least this many milliseconds apart (default 5000, the
 * native runner's)". A write right after a sync waits for the rest of the 5 s
 * (and not much longer); with `debounce: 300`, a write made when the last sync
 * is older than that goes at once.
 */
async function theRunnerSpacesWriteSyncsByTheDebounce(s) {
  const server = await s.server();
  const context = await s.context();
  const firstSync = async (tab) => {
    await until("the runner's first sync", async () => (await tab.events()).some((e) => e.type === "sync"), { timeout: 10_000, every: 50 });
    return Date.now();
  };
  const pushed = async (count) => {
    await until(`the runner to push write ${count}`, async () => (await serverLog(server.url)).length === count, { timeout: 20_000, every: 50 });
    return Date.now();
  };

  const defaults = await s.tab(context, { name: "debounce-default", server: server.url, live: false });
  await defaults.call("start");
  const synced = await firstSync(defaults);
  await defaults.put(TASKS, "d1", { title: "right after a sync", done: false });
  const gap = (await pushed(1)) - synced;
  await defaults.call("stop");
  assert(gap >= 4000 && gap <= 6500, `with the default debounce (5000 ms), a write right after the runner's sync reached the server ${gap} ms after that sync`);

  const short = await s.tab(context, { name: "debounce-300", server: server.url, live: false, debounce: 300 });
  await short.call("start");
  await firstSync(short);
  await new Promise((r) => setTimeout(r, 600)); // the last sync is now older than the debounce
  const wrote = Date.now();
  await short.put(TASKS, "d2", { title: "long after a sync", done: false });
  const elapsed = (await pushed(2)) - wrote;
  await short.call("stop");
  assert(elapsed <= 1500, `with debounce 300, a write made 600 ms after the last sync reached the server ${elapsed} ms later, not at once`);
}

/**
 * Without the live channel (here: a page without WebSocket), the long poll
 * runs while the page is visible, and only then: a hidden page sends no new
 * poll, and becoming visible again syncs at once and polls again.
 * (Visibility is set from the page: headless Chromium has no window to hide.)
 */
async function theLongPollRunsWhileVisible(s) {
  const server = await s.server();
  const context = await s.context();
  await context.addInitScript(() => {
    delete globalThis.WebSocket;
  });
  const tab = await s.tab(context, { name: "visible", server: server.url, live: true, wait: 1000, interval: 600_000 });
  const polls = [];
  tab.page.on("request", (r) => {
    if (r.url().includes("/v1/pull") && r.url().includes("wait=1")) polls.push(Date.now());
  });
  await tab.call("start");
  await until("long polls while visible", async () => polls.length >= 3, { timeout: 10_000, every: 100 });

  await tab.page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await new Promise((r) => setTimeout(r, 1500)); // the poll in flight (1 s) ends
  const hiddenFrom = polls.length;
  await new Promise((r) => setTimeout(r, 3000));
  assert(polls.length === hiddenFrom, `a hidden page sent ${polls.length - hiddenFrom} long polls in 3 s`);

  const syncsBefore = (await tab.events()).filter((e) => e.type === "sync").length;
  await tab.page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "visible" });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await until("a sync when the page is visible again", async () => (await tab.events()).filter((e) => e.type === "sync").length > syncsBefore, { timeout: 5_000, every: 100 });
  await until("long polls again once visible", async () => polls.length >= hiddenFrom + 2, { timeout: 10_000, every: 100 });
  await tab.call("stop");
}

/**
 * The live channel (a WebSocket to GET /v1/live) is held while the page is
 * visible: another device's change reaches the page by the sync it starts,
 * with the periodic sync ten minutes away. Hidden, the page closes it and
 * hears nothing; visible again, it syncs and opens it again.
 */
async function theLiveChannelRunsWhileVisible(s) {
  const server = await s.server();
  const tab = await s.tab(await s.context(), { name: "live-ws", server: server.url, live: true, interval: 600_000 });
  const writer = await s.tab(await s.context(), { name: "live-writer", server: server.url, live: false }, "writer");
  const sockets = [];
  tab.page.on("websocket", (ws) => ws.url().includes("/v1/live") && sockets.push(ws));
  await tab.call("start");
  await until("the live channel opens", async () => sockets.length === 1, { timeout: 10_000, every: 100 });
  const title = async (id) => (await tab.call("get", TASKS, id))?.title ?? null;

  await writer.put(TASKS, "w1", { title: "while visible", done: false });
  await writer.call("sync");
  await until("w1 to reach the visible page through the live channel", async () => (await title("w1")) === "while visible", { timeout: 5_000, every: 100 });

  await tab.page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await until("the hidden page closes the live channel", async () => sockets[0].isClosed(), { timeout: 5_000, every: 100 });
  await writer.put(TASKS, "w2", { title: "while hidden", done: false });
  await writer.call("sync");
  await new Promise((r) => setTimeout(r, 2000));
  assert((await title("w2")) === null, "a hidden page synced without a trigger");

  await tab.page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "visible" });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await until("w2 once the page is visible again", async () => (await title("w2")) === "while hidden", { timeout: 5_000, every: 100 });
  await until("the live channel opens again", async () => sockets.length === 2 && !sockets[1].isClosed(), { timeout: 5_000, every: 100 });
  await writer.put(TASKS, "w3", { title: "visible again", done: false });
  await writer.call("sync");
  await until("w3 through the new live channel", async () => (await title("w3")) === "visible again", { timeout: 5_000, every: 100 });
  await tab.call("stop");
}

/** h. When the tab running the runner closes, another tab of the database takes it over. */
async function theRunnerMovesToAnotherTab(s) {
  const server = await s.server();
  const context = await s.context();
  const options = { name: "handover", server: server.url, live: true, debounce: 200 };
  const one = await s.tab(context, options, "tab 1");
  await one.call("start");
  await until("tab 1's first sync", async () => (await one.events()).some((e) => e.type === "sync"), { timeout: 10_000 });
  const two = await s.tab(context, options, "tab 2");
  await two.call("start");
  await two.put(TASKS, "h1", { title: "while tab 1 runs the runner", done: false });
  await until("h1 to reach the server", async () => (await serverLog(server.url)).length === 1, { timeout: 10_000 });

  await one.page.close(); // releases its locks: tab 2's runner must take over
  await two.put(TASKS, "h2", { title: "after tab 1 closed", done: false });
  await until("h2 to reach the server through tab 2's runner", async () => (await serverLog(server.url)).length === 2, { timeout: 15_000 });
  await two.call("stop");
}

/** i. The API's smaller promises: no-op writes, all-or-none batches, reset's refusal, reads of absent entities. */
async function theApiKeepsItsSmallPromises(s) {
  const server = await s.server();
  const tab = await s.tab(await s.context(), { name: "api", server: server.url, live: false });
  const id = await tab.put(TASKS, "a1", { title: "same", done: false });
  assert(typeof id === "string" && id.length > 0, `put resolved to ${canonical(id)}, not a change id`);
  assert((await tab.put(TASKS, "a1", { title: "same", done: false })) === null, "put of the same data did not resolve to null");
  assert((await tab.patch(TASKS, "a1", { done: false })) === null, "patch of an unchanged field did not resolve to null");
  assert((await tab.call("get", TASKS, "nope")) === null, "get of an absent entity is not null");

  const local = (await tab.events()).filter((e) => e.type === "change" && e.origin === "local");
  assert(local.some((e) => e.entities.some((x) => x.collection === TASKS && x.id === "a1")), `no local change event for a1: ${canonical(local)}`);

  // write(): all or none.
  const bad = await tab.attempt("write", [
    { op: "put", collection: TASKS, id: "a2", data: { title: "in a failed batch", done: false } },
    { op: "put", collection: "", id: "a3", data: {} },
  ]);
  assert(bad.error, `write() with an empty collection name resolved: ${canonical(bad.ok)}`);
  assert(bad.error.code === "invalid_input", `write() with an empty collection name rejected with ${bad.error.code} (${bad.error.message}), not invalid_input`);
  assert((await tab.call("get", TASKS, "a2")) === null, "a write() that failed kept its first write");
  const ok = await tab.call("write", [
    { op: "put", collection: TASKS, id: "a2", data: { title: "batch", done: false } },
    { op: "patch", collection: TASKS, id: "a1", data: { done: true } },
    { op: "delete", collection: TASKS, id: "a2" },
  ]);
  assert(Array.isArray(ok) && ok.length === 3 && ok.every((c) => typeof c === "string"), `write() resolved to ${canonical(ok)}`);
  assertEqual(await tab.list(TASKS), [{ id: "a1", data: { title: "same", done: true } }], "the list after the batch");
  assert((await tab.call("get", TASKS, "a2")) === null, "get of a deleted entity is not null");

  // reset(): refused while changes wait, unless forced.
  const refused = await tab.attempt("reset");
  assert(refused.error && refused.error.code === "pending_changes", `reset() with pending changes: ${canonical(refused)}`);
  assert((await tab.call("retryFailed")) === 0 && (await tab.call("discardFailed")) === 0, "retryFailed/discardFailed with nothing failed");
  await tab.sync();
  await tab.call("reset");
  assertEqual(await tab.list(TASKS), [], "the list after reset()");
  await until("a change event with origin reset", async () =>
    (await tab.events()).some((e) => e.type === "change" && e.origin === "reset"), { timeout: 5_000 });
  const report = await tab.sync();
  assert(report.verified, `the sync after reset(): ${canonical(report)}`);
  assertEqual(await tab.list(TASKS), [{ id: "a1", data: { title: "same", done: true } }], "the list after reset() and a sync");

  // After close(), every call rejects with `closed`.
  const codes = await tab.page.evaluate(async () => {
    const db = window.harness.db;
    await db.close();
    const code = async (f) => {
      try {
        await f();
        return "resolved";
      } catch (e) {
        return e && e.code;
      }
    };
    return [await code(() => db.list("tasks")), await code(() => db.put("tasks", "z", {})), await code(() => db.sync())];
  });
  assertEqual(codes, ["closed", "closed", "closed"], "list, put and sync after close()");
}

/**
 * n. Two tabs write the same field in turn, as fast as they can: the last
 * write wins in both tabs, on the server and on a CLI device (the tabs stamp
 * their changes in order: each write takes in the clock the store holds).
 */
async function twoTabsWritingInTurnLastWriteWins(s) {
  const server = await s.server();
  const context = await s.context();
  const options = { name: "turns", server: server.url, live: false };
  const one = await s.tab(context, options, "tab 1");
  const two = await s.tab(context, options, "tab 2");
  await one.put(TASKS, "turn", { title: "start", done: false });
  let lastTitle = "start";
  for (let i = 0; i < 20; i++) {
    const tab = i % 2 ? two : one;
    lastTitle = `write ${i} by ${tab.name}`;
    await tab.patch(TASKS, "turn", { title: lastTitle });
  }
  for (const tab of [one, two]) assertEqual(await tab.call("get", TASKS, "turn"), { title: lastTitle, done: false }, `${tab.name} before the sync`);
  const outbox = await one.call("exportPending");
  const hlcs = outbox.map((c) => c.hlc);
  assert(
    hlcs.every((h, i) => i === 0 || h > hlcs[i - 1]),
    `the outbox's HLCs are not increasing in write order: ${canonical(outbox.map((c) => [c.data && c.data.title, c.hlc]))}`,
  );
  const report = await two.sync();
  assert(report.verified && report.pending === 0 && report.lost.length === 0, `the sync: ${canonical(report)}`);
  const cli = s.cli("cli");
  await cli.sync(server.url);
  assertEqual(await cli.get(TASKS, "turn"), { title: lastTitle, done: false }, "the CLI's task");
  assertEqual(await one.call("get", TASKS, "turn"), { title: lastTitle, done: false }, "tab 1 after tab 2's sync");
}

/** m. A page from an origin the server does not allow (no --cors-origin): unreachable, and the change waits. */
async function anOriginNotAllowedIsUnreachable(s) {
  const server = await s.server({ cors: undefined });
  const tab = await s.tab(await s.context(), { name: "cors", server: server.url, live: false });
  await tab.put(TASKS, "x1", { title: "kept", done: false });
  const r = await tab.attempt("sync");
  assert(r.error && r.error.code === "unreachable", `sync() from an origin the server does not allow: ${canonical(r)}`);
  assert((await tab.status()).pending === 1, "the change is not pending after the refused sync");
  assert((await serverLog(server.url)).length === 0, "the server took a change from an origin it does not allow");
}

/**
 * j. The runner syncs when the browser comes back online (deltasync.d.ts:
 * "syncs now, …, when the browser goes online"), not at the end of its
 * backoff after failed syncs.
 */
async function theRunnerSyncsWhenBackOnline(s) {
  const server = await s.server();
  const context = await s.context();
  const tab = await s.tab(context, { name: "online", server: server.url, live: false, debounce: 200 });
  await tab.call("start");
  await until("the runner's first sync", async () => (await tab.events()).some((e) => e.type === "sync"), { timeout: 10_000 });
  await context.setOffline(true);
  await tab.put(TASKS, "n1", { title: "written offline", done: false });
  // Four failed syncs: the runner's next retry is 4 to 8 s away (backoff from 1 s, doubling).
  await until("four failed syncs", async () => (await tab.status()).failed_syncs >= 4, { timeout: 30_000 });
  await context.setOffline(false);
  const online = Date.now();
  await until("n1 to reach the server", async () => (await serverLog(server.url)).length === 1, { timeout: 30_000, every: 50 });
  const elapsed = Date.now() - online;
  await tab.call("stop");
  assert(elapsed <= 2500, `the runner pushed the offline write ${elapsed} ms after the browser went online, not at once`);
}

/** k. The background runner (live) heals by itself after the server comes back from an older copy. */
async function theRunnerHealsAfterARestore(s) {
  const backups = await restorableServer(s);
  let server = backups.server;
  const tab = await s.tab(await s.context(), { name: "runner-restore", server: server.url, live: true, debounce: 200 });
  await tab.call("start");
  await tab.put(TASKS, "k1", { title: "in the backup", done: false });
  await until("k1 on the server", async () => (await serverLog(server.url)).length === 1, { timeout: 10_000 });

  server = await backups.backUp();
  await tab.put(TASKS, "k2", { title: "after the backup", done: false });
  await until("k2 on the server (the runner reconnects)", async () => (await serverLog(server.url)).length === 2, { timeout: 20_000 });

  server = await backups.restore();
  await tab.put(TASKS, "k3", { title: "after the restore", done: false });

  const fresh = s.cli("fresh");
  await until("the server to hold k1, k2 and k3 again", async () => {
    await fresh.sync(server.url);
    assertEqual(ids(await fresh.list(TASKS)), ["k1", "k2", "k3"], "a fresh CLI device's tasks");
    return true;
  }, { timeout: 30_000, every: 500 });
  await until("a sync event of the runner saying it healed", async () => {
    const reports = (await tab.events()).filter((e) => e.type === "sync").map((e) => e.report);
    return reports.some((r) => r.healed && r.verified);
  }, { timeout: 10_000 });
  await until("the page to stand at the server's state", async () => {
    const st = await tab.status();
    const server_ = await serverStatus(server.url);
    assert(st.pending === 0 && st.state_digest === server_.state_digest, `page ${canonical(st)} vs server ${canonical(server_)}`);
    return true;
  }, { timeout: 10_000 });
  await tab.call("stop");
}

/** l. Odd values (Unicode, big and small numbers, nesting) and a batch larger than one request sync verified. */
async function oddValuesAndABigBatchSyncVerified(s) {
  const server = await s.server();
  const tab = await s.tab(await s.context(), { name: "values", server: server.url, live: false });
  const odd = {
    title: "ünïcødé 🎉 \u2028 \"quoted\" \\ tab\t",
    done: false,
    n: 1e21,
    f: 0.1,
    neg: -0,
    small: 5e-324,
    big: 9007199254740992,
    nested: { b: 1, a: [1, "x", null, true, { z: [] }] },
    "key with spaces": "",
  };
  await tab.put(TASKS, "odd", odd);
  const batch = Array.from({ length: 600 }, (_, i) => ({
    op: "put",
    collection: TASKS,
    id: `b-${String(i).padStart(4, "0")}`,
    data: { title: `batch ${i}`, done: i % 2 === 0 },
  }));
  await tab.call("write", batch);
  const report = await tab.sync();
  assert(report.applied === 601 && report.verified && report.pending === 0, `the sync of 601 changes: ${canonical(report)}`);
  const progress = (await tab.events()).filter((e) => e.type === "progress");
  assert(progress.length > 0, "a sync of 601 changes gave no progress event");
  const last = progress[progress.length - 1];
  assert(last.pushed === 601 && last.cursor === report.cursor, `the last progress event: ${canonical(last)} (report: cursor ${report.cursor})`);

  const cli = s.cli("cli");
  const cliReport = await cli.sync(server.url);
  assert(cliReport.state_digest === report.state_digest, `the CLI's digest ${cliReport.state_digest} vs the page's ${report.state_digest}`);
  assertEqual(await cli.get(TASKS, "odd"), await tab.call("get", TASKS, "odd"), "odd values, CLI vs page");
  assertEqual(await tab.call("get", TASKS, "odd"), odd, "odd values read back in the page");
  assert((await cli.list(TASKS)).length === 601, "the CLI does not list 601 tasks");

  // And the other way: the CLI writes odd values, the page pulls and verifies them.
  await cli.put(TASKS, "odd-cli", { title: "𝄞 from the CLI", n: 123456789.125, e: 1e-7 });
  await cli.sync(server.url);
  const back = await tab.sync();
  assert(back.verified && back.pulled === 1, `the page's sync pulling the CLI's odd values: ${canonical(back)}`);
  assertEqual(await tab.call("get", TASKS, "odd-cli"), { title: "𝄞 from the CLI", n: 123456789.125, e: 1e-7 }, "the CLI's odd values in the page");
}

/** How many segment records the IndexedDB database `name` holds (read from `tab`'s page). */
function segments(tab, name) {
  return tab.page.evaluate(
    (db) =>
      new Promise((resolve, reject) => {
        const r = indexedDB.open(db);
        r.onsuccess = () => {
          const count = r.result.transaction(["segments"]).objectStore("segments").count();
          count.onsuccess = () => (r.result.close(), resolve(count.result));
          count.onerror = () => reject(count.error);
        };
        r.onerror = () => reject(r.error);
      }),
    name,
  );
}

/**
 * A first sync big enough to be written as segments (a page's entities in a
 * few records): the other tab reads it while the syncing tab folds the
 * segments into rows, changes to those entities apply before and after the
 * fold, and everything agrees with the CLI.
 */
async function aBigFirstSyncIsFoldedWhileTabsRead(s) {
  const server = await s.server();
  const seeder = await s.tab(await s.context(), { name: "seeder", server: server.url, live: false }, "seeder");
  const title = (i) => `big task ${i}`;
  const key = (i) => `big-${String(i).padStart(5, "0")}`;
  const batch = Array.from({ length: 2500 }, (_, i) => ({ op: "put", collection: TASKS, id: key(i), data: { title: title(i), done: false } }));
  await seeder.call("write", batch);
  const seeded = await seeder.sync();
  assert(seeded.verified && seeded.pending === 0, `seeding 2,500 tasks: ${canonical(seeded)}`);

  const context = await s.context();
  const options = { name: "big", server: server.url, live: false };
  const one = await s.tab(context, options, "tab 1");
  const two = await s.tab(context, options, "tab 2");
  const first = await one.sync();
  assert(first.verified && first.pulled === 2500, `tab 1's first sync: ${canonical(first)}`);
  const live = await segments(one, "big");
  const listed = await two.list(TASKS);
  assert(listed.length === 2500, `tab 2 lists ${listed.length} tasks after tab 1's first sync, not 2,500`);
  assertEqual(listed[7], { id: key(7), data: { title: title(7), done: false } }, "tab 2's task 7");

  // Changes to synced entities while segments may still be live.
  const cli = s.cli("cli");
  await cli.sync(server.url);
  await cli.patch(TASKS, key(7), { done: true });
  await cli.delete(TASKS, key(8));
  await cli.sync(server.url);
  const second = await two.sync();
  assert(second.verified && second.pulled === 2, `tab 2's second sync: ${canonical(second)}`);

  await until("tab 1 to fold every segment into rows", async () => (await segments(one, "big")) === 0, { timeout: 60_000 });
  const expected = await cli.list(TASKS);
  assert(expected.length === 2499, `the CLI lists ${expected.length} tasks, not 2,499`);
  for (const tab of [one, two]) assertEqual(await tab.list(TASKS), expected, `${tab.name}'s tasks after the fold (${live} segments live after the first sync) vs the CLI's`);

  // And a change to a folded entity.
  await cli.patch(TASKS, key(2000), { title: "renamed after the fold" });
  const cliReport = await cli.sync(server.url);
  const third = await one.sync();
  assert(third.verified && third.state_digest === cliReport.state_digest, `tab 1's sync after the fold: ${canonical(third)} (CLI digest ${cliReport.state_digest})`);
  assertEqual(await two.call("get", TASKS, key(2000)), { title: "renamed after the fold", done: false }, "task 2000 in tab 2");
  assertEqual(await two.call("get", TASKS, key(8)), null, "the deleted task 8 in tab 2");
}

const SCENARIOS = [
  ["two browsers and a CLI device converge", twoBrowsersAndACliConverge],
  ["offline edits survive a reload and sync once online", offlineEditsSurviveAReload],
  ["two tabs of one database push each change once", twoTabsShareOneReplica],
  ["a bad token is refused and the change waits for a good one", aBadTokenKeepsTheChange],
  ["a server restored from an older copy: the page heals", aRestoredServerHeals],
  ["the example app syncs two browsers", theExampleAppSyncsTwoBrowsers],
  ["the runner spaces syncs caused by writes by the debounce", theRunnerSpacesWriteSyncsByTheDebounce],
  ["the runner moves to another tab when its tab closes", theRunnerMovesToAnotherTab],
  ["without the live channel, the long poll runs while the page is visible, and only then", theLongPollRunsWhileVisible],
  ["the live channel runs while the page is visible, and only then", theLiveChannelRunsWhileVisible],
  ["the API keeps its small promises", theApiKeepsItsSmallPromises],
  ["the runner syncs when the browser comes back online", theRunnerSyncsWhenBackOnline],
  ["the runner heals by itself after a server restore", theRunnerHealsAfterARestore],
  ["odd values and a batch larger than one request sync verified", oddValuesAndABigBatchSyncVerified],
  ["an origin the server does not allow is unreachable", anOriginNotAllowedIsUnreachable],
  ["two tabs writing one field in turn: the last write wins", twoTabsWritingInTurnLastWriteWins],
  ["a big first sync is folded into rows while tabs read it", aBigFirstSyncIsFoldedWhileTabsRead],
];

// ---------------------------------------------------------------------------

async function main() {
  if (!BIN) throw new Error("set DELTASYNC_BIN to the deltasync binary (cargo build -p deltasync-cli: target/debug/deltasync)");
  await access(BIN).catch(() => {
    throw new Error(`DELTASYNC_BIN=${BIN} does not exist`);
  });
  await access(join(webRoot, "dist/deltasync.js")).catch(() => {
    throw new Error("web/dist/deltasync.js is missing: run web/build.sh");
  });
  const tmp = await mkdtemp(join(tmpdir(), "deltasync-e2e-"));
  const web = await serveWeb();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  const env = { tmp, web, browser };

  // Can the harness load the client at all? If not, say why once instead of failing every scenario.
  {
    const scope = new Scope(env, "preflight");
    try {
      await scope.tab(await scope.context(), null, "harness");
    } catch (e) {
      await browser.close().catch(() => {});
      web.server.close();
      throw new Error(`${e.message}\n(is web/dist the browser client? web/build.sh builds it)`);
    } finally {
      await scope.release();
    }
  }

  const results = [];
  try {
    for (const [name, scenario] of SCENARIOS) {
      if (ONLY.length && !ONLY.some((w) => name.includes(w))) continue;
      const scope = new Scope(env, name);
      const started = Date.now();
      try {
        await withTimeout(scenario(scope), SCENARIO_MS, `the scenario`);
        results.push({ name, ok: true });
        console.log(`PASS  ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
      } catch (e) {
        const reason = e instanceof Failure ? e.message : (e && e.stack) || String(e);
        results.push({ name, ok: false, reason });
        console.log(`FAIL  ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)\n      ${reason.replace(/\n/g, "\n      ")}`);
        if (scope.logs.length) console.log(`      page output (last 20 lines):\n        ${scope.logs.slice(-20).join("\n        ")}`);
      } finally {
        await scope.release();
      }
    }
  } finally {
    await browser.close().catch(() => {});
    web.server.close();
    if (process.env.E2E_KEEP) console.log(`e2e: kept ${tmp}`);
    else await rm(tmp, { recursive: true, force: true }).catch(() => {});
  }
  return results;
}

const globalTimer = setTimeout(() => {
  console.log(`FAIL  e2e: the whole run passed ${TOTAL_MS} ms; stopping`);
  process.exit(1);
}, TOTAL_MS);

try {
  const results = await main();
  clearTimeout(globalTimer);
  const failed = results.filter((r) => !r.ok);
  console.log(`e2e: ${results.length - failed.length} of ${results.length} scenarios passed`);
  process.exit(failed.length ? 1 : 0);
} catch (e) {
  console.error(`e2e: could not run: ${(e && e.stack) || e}`);
  process.exit(2);
}
