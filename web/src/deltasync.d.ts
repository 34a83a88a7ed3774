// deltasync in a browser: the engine (wasm) on IndexedDB, syncing over fetch.
// Names here are a contract: apps and tests depend on them.

/** How `open` reaches its replica and server. */
export interface OpenOptions {
  /** The IndexedDB database that holds the replica (one per app and user). */
  name: string;
  /** The server's base URL (`https://sync.example.com`); absent: the replica works offline only. */
  server?: string;
  /** A bearer token (`--auth jwt`); absent on a server with `--auth none`. */
  token?: string;
  /** While the page is visible and the runner started, hold the live channel (a WebSocket, `GET /v1/live`) and sync as soon as the server's head moves; on a server without it, long-poll (default true). */
  live?: boolean;
  /** Milliseconds each long poll waits on the server, where there is no live channel (default 30000; whole seconds from 1 to 60). */
  wait?: number;
  /** Milliseconds between periodic syncs of the runner (default 30000). */
  interval?: number;
  /** Syncs caused by local writes are at least this many milliseconds apart (default 5000, the native runner's). */
  debounce?: number;
  /** Ask the browser to keep the database (`navigator.storage.persist()`; default true). */
  persist?: boolean;
}

/** One write of `db.write`. `data` is the object for `put` and `patch`. */
export type Write =
  | { op: "put"; collection: string; id: string; data: Record<string, unknown> }
  | { op: "patch"; collection: string; id: string; data: Record<string, unknown> }
  | { op: "delete"; collection: string; id: string };

/** One change of this device that lost a merge or was refused. */
export interface LostChange {
  change_id: string;
  collection: string;
  entity_id: string;
  /** Why it lost (absent when the server refused the change as invalid). */
  conflict: Record<string, unknown> | null;
  message?: string;
}

/** What one sync did: the object `deltasync client sync` prints. */
export interface SyncReport {
  pushed: number;
  applied: number;
  duplicate: number;
  restored: number;
  pulled: number;
  conflicts: number;
  failed: number;
  restamped: number;
  pending: number;
  cursor: number;
  state_hash: string;
  state_digest: string;
  verified: boolean;
  healed: boolean;
  bootstrapped: number;
  mismatch?: string;
  lost: LostChange[];
}

/** The replica's state: the object `deltasync client status` prints. */
export interface Status {
  device_id: string;
  server: string | null;
  user_id?: string;
  pending: number;
  failed: number;
  cursor: number;
  state_hash: string;
  state_digest: string;
  last_sync_at: number | null;
  failing_since: number | null;
  failed_syncs: number;
  last_error: { code: string; message: string; at: number } | null;
  journal: number;
}

/** Something that happened to the replica, in this tab or another tab of the same database. */
export type DeltasyncEvent =
  /** Entities changed: a local write, a page from the server, or (`reset`) everything. */
  | { type: "change"; origin: "local" | "server" | "reset"; entities: { collection: string; id: string }[] }
  /** A sync advanced: a page applied (`pushed`, `pulled` so far, the `cursor` reached) or
   * entities loaded by a bootstrap (`bootstrapped`), for a progress display during long syncs. */
  | { type: "progress"; pushed?: number; pulled?: number; cursor?: number; bootstrapped?: number }
  /** A sync finished (started by any tab). */
  | { type: "sync"; report: SyncReport }
  /** A sync failed (started by any tab); the outbox keeps every change. */
  | { type: "sync-error"; error: { code: string; message: string } };

/** A failure: `code` is the command line's error code (`unreachable`, `unauthorized`, …). */
export interface DeltasyncError extends Error {
  code: string;
  /** The offending changes, when the server named them. */
  details?: unknown[];
  /** Seconds the server asked to wait before trying again (`Retry-After` of a 429 or 503); the runner waits at least this long. */
  retryAfter?: number;
}

/** A replica in IndexedDB. */
export interface Db {
  /** The database's name. */
  readonly name: string;
  /** This device's id (shared by every tab of the database). */
  readonly deviceId: string;
  /** Makes `data` the entity's whole data; resolves to the change id, or null when nothing changed. */
  put(collection: string, id: string, data: Record<string, unknown>): Promise<string | null>;
  /** Writes the given fields; resolves to the change id, or null when nothing changed. */
  patch(collection: string, id: string, fields: Record<string, unknown>): Promise<string | null>;
  /** Deletes the entity; resolves to the change id. */
  delete(collection: string, id: string): Promise<string>;
  /** Many writes in one IndexedDB transaction (all or none); resolves to their change ids. */
  write(writes: Write[]): Promise<(string | null)[]>;
  /** The entity's data, or null when absent or deleted. */
  get(collection: string, id: string): Promise<Record<string, unknown> | null>;
  /** The live entities of a collection, sorted by id. */
  list(collection: string): Promise<{ id: string; data: Record<string, unknown> }[]>;
  /** Syncs now (waiting for another tab's sync to end first). */
  sync(): Promise<SyncReport>;
  /** The replica's state. */
  status(): Promise<Status>;
  /** The pending and failed changes, as `deltasync client export-pending` prints them. */
  exportPending(): Promise<Record<string, unknown>[]>;
  /** Sends every failed change back to the outbox; resolves to how many. */
  retryFailed(): Promise<number>;
  /** Forgets every failed change; resolves to how many. */
  discardFailed(): Promise<number>;
  /** Calls `listener` for each event; returns the function that stops it. */
  subscribe(listener: (event: DeltasyncEvent) => void): () => void;
  /** Starts the background runner: syncs now, when the page becomes visible, when the
   * browser goes online, every `interval`, after local writes (debounced), and long-polls
   * while visible. One tab of the database runs it at a time; the others hand it their writes. */
  start(): void;
  /** Stops the background runner. */
  stop(): void;
  /** Forgets the replica (refused with `pending_changes` while changes wait, unless `force`). */
  reset(options?: { force?: boolean }): Promise<void>;
  /** Stops the runner and closes the database. */
  close(): Promise<void>;
}

/** Opens (creating if needed) the replica in the IndexedDB database `options.name`. */
export function open(options: OpenOptions): Promise<Db>;
