// deltasync in a browser: the sync engine (Rust, compiled to wasm) keeps a
// replica in IndexedDB and syncs it over fetch. This module is the browser's
// side of it: the API apps call, the sync triggers (start, visible, online,
// periodic, after local writes, manual), the live channel (a WebSocket that
// says when the server's head moves; a long poll on a server without it)
// while the page is visible, and the tabs: every tab of an app opens the same database, one tab
// at a time syncs (Web Locks), and every tab hears every change
// (BroadcastChannel). Every sync rule (merge, outbox, verification, heal,
// backoff) is the engine's. See deltasync.d.ts for the API.

import init, { Core, retryDelayMs, runnerDefaults } from "./deltasync_core.js";

let loaded = null;

/** Loads the wasm once (from deltasync_core_bg.wasm beside this module). */
function load() {
  loaded ??= init();
  return loaded;
}

/** An Error with the command line's error code. */
function failure(code, message) {
  const e = new Error(message);
  e.code = code;
  return e;
}

const locks = () => globalThis.navigator?.locks;
const visible = () => typeof document === "undefined" || document.visibilityState === "visible";

/** A queue of reasons to wake the runner, awaited with a deadline. */
class Wakeup {
  #queue = [];
  #waiter = null;

  push(reason) {
    if (this.#waiter) {
      const wake = this.#waiter;
      this.#waiter = null;
      wake(reason);
    } else {
      this.#queue.push(reason);
    }
  }

  /** The next reason, or "deadline" after `ms`. */
  next(ms) {
    if (this.#queue.length) return Promise.resolve(this.#queue.shift());
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        if (this.#waiter === wake) this.#waiter = null;
        resolve("deadline");
      }, Math.max(0, ms));
      const wake = (reason) => {
        clearTimeout(timer);
        resolve(reason);
      };
      this.#waiter = wake;
    });
  }
}

/** A replica in IndexedDB (see deltasync.d.ts). */
class Db {
  #core;
  #options;
  #channel = null;
  #listeners = new Set();
  #runner = null;
  #closed = false;
  #warnedLocks = false;
  #folding = false;

  constructor(core, options) {
    this.#core = core;
    this.#options = options;
    if (typeof BroadcastChannel === "function") {
      this.#channel = new BroadcastChannel(`deltasync:${options.name}`);
      this.#channel.onmessage = (m) => this.#fromOtherTab(m.data);
    }
  }

  /** @internal Routes the engine's events. */
  static async open(options) {
    let db = null;
    const early = [];
    const core = await Core.open(options.name, options.server ?? null, options.token ?? null, (event) =>
      db ? db.#fromEngine(event) : early.push(event),
    );
    db = new Db(core, options);
    early.forEach((event) => db.#fromEngine(event));
    // A tab closed while folding left segments: finish its work.
    db.#fold();
    return db;
  }

  get name() {
    return this.#options.name;
  }

  get deviceId() {
    return this.#core.deviceId;
  }

  #live() {
    if (this.#closed) throw failure("closed", `the replica ${this.#options.name} was closed`);
    return this.#core;
  }

  /** Calls `fn` on the engine, once the replica is known to be open. */
  async #call(fn) {
    return fn(this.#live());
  }

  put(collection, id, data) {
    return this.#call((core) => core.put(collection, id, data));
  }

  patch(collection, id, fields) {
    return this.#call((core) => core.patch(collection, id, fields));
  }

  delete(collection, id) {
    return this.#call((core) => core.delete(collection, id));
  }

  write(writes) {
    return this.#call((core) => core.write(writes));
  }

  get(collection, id) {
    return this.#call((core) => core.get(collection, id));
  }

  list(collection) {
    return this.#call((core) => core.list(collection));
  }

  status() {
    return this.#call((core) => core.status());
  }

  exportPending() {
    return this.#call((core) => core.exportPending());
  }

  retryFailed() {
    return this.#call((core) => core.retryFailed());
  }

  discardFailed() {
    return this.#call((core) => core.discardFailed());
  }

  /** A manual sync: waits for another tab's sync to end, then syncs, resetting backoffs. */
  sync() {
    return this.#call(() => this.#sync(true));
  }

  reset(options = {}) {
    return this.#call((core) => this.#exclusive(() => core.reset(Boolean(options.force))));
  }

  subscribe(listener) {
    if (typeof listener !== "function") throw failure("invalid_input", "subscribe needs a function");
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  start() {
    this.#live();
    if (this.#runner) return;
    const runner = { stopped: false, abort: new AbortController(), wakeup: new Wakeup() };
    this.#runner = runner;
    const lead = () => this.#lead(runner);
    if (locks()) {
      // The tab holding this lock runs the runner; the others wait their turn
      // and send it their writes. Closing the tab releases the lock.
      locks()
        .request(`deltasync-runner:${this.#options.name}`, { signal: runner.abort.signal }, lead)
        .catch((e) => {
          if (e?.name !== "AbortError") console.error("deltasync: the background runner failed", e);
        });
    } else {
      lead().catch((e) => console.error("deltasync: the background runner failed", e));
    }
  }

  stop() {
    const runner = this.#runner;
    if (!runner) return;
    this.#runner = null;
    runner.stopped = true;
    runner.abort.abort();
    runner.wakeup.push("stop");
  }

  async close() {
    if (this.#closed) return;
    this.stop();
    this.#closed = true;
    this.#channel?.close();
    this.#listeners.clear();
    this.#core.close();
  }

  /** Runs `work` while holding this database's sync lock (shared by every tab). */
  #exclusive(work) {
    if (locks()) return locks().request(`deltasync-sync:${this.#options.name}`, work);
    if (!this.#warnedLocks) {
      this.#warnedLocks = true;
      console.warn("deltasync: no Web Locks here (not a secure context?): tabs of this app may sync at once");
    }
    return work();
  }

  /** One sync under the lock; tells every tab how it went. */
  async #sync(manual) {
    try {
      const report = await this.#exclusive(() => this.#core.sync(manual));
      this.#announce({ type: "sync", report });
      return report;
    } catch (e) {
      this.#announce({ type: "sync-error", error: { code: e.code ?? "internal", message: e.message } });
      throw e;
    } finally {
      this.#fold();
    }
  }

  /**
   * Folds the segments a big sync wrote (a page's entities in a few records,
   * which is what makes a first sync fast) into per-entity rows: one short
   * step at a time, each under the sync lock, yielding to the page between
   * steps. Reads are right before, during and after.
   */
  #fold() {
    if (this.#folding || this.#closed) return;
    this.#folding = true;
    const step = async () => {
      let left = 0;
      try {
        left = await this.#exclusive(() => (this.#closed ? 0 : this.#core.foldStore()));
      } catch (e) {
        // The segments stay readable; the next sync or open tries again.
        console.warn("deltasync: folding synced entities into their rows failed", e);
      }
      if (left > 0 && !this.#closed) setTimeout(step, 0);
      else this.#folding = false;
    };
    setTimeout(step, 0);
  }

  /** The runner, in the one tab holding the runner lock, until stopped. */
  async #lead(runner) {
    const defaults = runnerDefaults();
    const interval = this.#options.interval ?? defaults.interval_ms;
    const debounce = this.#options.debounce ?? defaults.debounce_ms;
    const live = this.#options.live ?? true;
    // The server counts whole seconds, from 1 to 60.
    const waitSecs = Math.min(60, Math.max(1, Math.round((this.#options.wait ?? defaults.wait_secs * 1000) / 1000)));
    const wake = (reason) => () => runner.wakeup.push(reason);
    // Hidden, the page lets go of the live channel; visible again, it syncs and watches again.
    const onVisible = () => (visible() ? runner.wakeup.push("visible") : runner.socket?.close(1000));
    const onOnline = wake("online");
    globalThis.document?.addEventListener("visibilitychange", onVisible);
    globalThis.addEventListener?.("online", onOnline);
    runner.lead = true;
    let failures = 0;
    let watching = false;
    try {
      while (!runner.stopped) {
        let retryAfter; // seconds the server asked to wait (Retry-After), if it did
        try {
          await this.#sync(false);
          failures = 0;
          runner.noLive = false; // a socket that failed may open now
        } catch (e) {
          failures += 1;
          retryAfter = e?.retryAfter;
        }
        const syncedAt = Date.now();
        let deadline = syncedAt + (failures === 0 ? interval : retryDelayMs(failures - 1, interval, retryAfter));
        while (!runner.stopped) {
          if (live && failures === 0 && !watching && visible()) {
            watching = true;
            this.#watch(runner, waitSecs).then((reason) => {
              watching = false;
              runner.wakeup.push(reason);
            });
          }
          const reason = await runner.wakeup.next(deadline - Date.now());
          if (reason === "local-write") {
            if (failures === 0) deadline = Math.min(deadline, Math.max(syncedAt + debounce, Date.now()));
          } else if (reason === "poll-failed") {
            failures += 1;
            deadline = Date.now() + retryDelayMs(failures - 1, interval, undefined);
          } else if (reason !== "polled") {
            break; // the deadline, behind, visible, online, stop
          }
        }
      }
    } finally {
      runner.lead = false;
      runner.socket?.close(1000);
      runner.socket = null;
      globalThis.document?.removeEventListener("visibilitychange", onVisible);
      globalThis.removeEventListener?.("online", onOnline);
    }
  }

  /**
   * Waits for the server's head to move past this replica. On the live
   * channel, resolves "behind" (sync now) or "poll-failed" (it closed); on a
   * server without one (the socket never opened), one long poll: "polled"
   * or "poll-failed".
   */
  async #watch(runner, waitSecs) {
    if (!runner.noLive) {
      const reason = await this.#liveHead(runner);
      if (reason !== "unsupported") return reason;
      runner.noLive = true;
    }
    try {
      await this.#core.waitForChanges(waitSecs);
      return "polled";
    } catch {
      return "poll-failed";
    }
  }

  /** The live socket's verdict: "behind", "poll-failed", or "unsupported". */
  #liveHead(runner) {
    const live = this.#core.liveRequest();
    if (!live || typeof WebSocket === "undefined") return Promise.resolve("unsupported");
    let socket = runner.socket;
    if (!socket) {
      socket = new WebSocket(live.url, live.protocols);
      socket.opened = false;
      socket.head = null;
      socket.addEventListener("open", () => (socket.opened = true));
      // Kept between watches: a head that arrives during a sync is judged after it.
      socket.addEventListener("message", (e) => {
        try {
          socket.head = JSON.parse(e.data);
        } catch {
          // not a head: ignored
        }
      });
      runner.socket = socket;
    }
    return new Promise((resolve) => {
      let settled = false;
      const done = (reason) => {
        if (settled) return;
        settled = true;
        socket.removeEventListener("message", judge);
        socket.removeEventListener("close", onClose);
        resolve(reason);
      };
      const judge = async () => {
        const head = socket.head;
        if (!head) return;
        try {
          if (await this.#core.isBehind(head)) done("behind");
        } catch {
          // judged again on the next head
        }
      };
      const onClose = () => {
        if (runner.socket === socket) runner.socket = null;
        done(!visible() ? "polled" : socket.opened ? "poll-failed" : "unsupported");
      };
      socket.addEventListener("message", judge);
      socket.addEventListener("close", onClose);
      if (socket.readyState === WebSocket.CLOSED) onClose();
      else judge();
    });
  }

  /** An event of this tab's engine. */
  #fromEngine(event) {
    if (event.type === "local-write") {
      this.#localWrite();
      this.#channel?.postMessage(event);
    } else if (event.type === "change" || event.type === "progress") {
      this.#announce(event);
    }
  }

  /** An event from another tab of this database. */
  #fromOtherTab(event) {
    if (event?.type === "local-write") this.#localWrite();
    else if (event?.type) this.#emit(event);
  }

  #localWrite() {
    if (this.#runner?.lead) this.#runner.wakeup.push("local-write");
  }

  /** Tells this tab's subscribers and the other tabs. */
  #announce(event) {
    this.#emit(event);
    this.#channel?.postMessage(event);
  }

  #emit(event) {
    for (const listener of this.#listeners) {
      try {
        listener(event);
      } catch (e) {
        console.error("deltasync: a subscriber threw", e);
      }
    }
  }
}

/** Opens (creating if needed) the replica in the IndexedDB database `options.name`. */
export async function open(options) {
  if (!options || typeof options.name !== "string" || options.name === "") {
    throw failure("invalid_input", "open needs { name }: the IndexedDB database that holds the replica");
  }
  if (options.server != null && typeof options.server !== "string") {
    throw failure("invalid_input", "server must be the server's base URL, as a string");
  }
  await load();
  const db = await Db.open(options);
  if (options.persist ?? true) {
    // Asks the browser not to evict the replica under storage pressure; it may say no.
    globalThis.navigator?.storage?.persist?.().catch(() => {});
  }
  return db;
}
