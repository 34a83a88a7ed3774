// A task list on deltasync: every edit goes to the replica in IndexedDB at
// once (it works offline), and the background runner syncs it with the server
// that serves this page (`deltasync serve --static examples/web-tasks`).
//
// Collection `tasks`, entities `{ title: string, done: boolean }`.
// `?token=JWT` in the address passes a token to a server with `--auth jwt`.
import { open } from "./dist/deltasync.js";

const COLLECTION = "tasks";
const STATUS_EVERY_MS = 3000;

const $ = (selector) => document.querySelector(selector);
const list = $("#tasks");
const statusLine = $("#status");
const lostList = $("#lost");
const errorLine = $("#error");

/** Changes of this device that lost a merge, from `sync` events (kept for this page's life). */
const lostInSync = new Map();
/** The verdict of the newest sync this page heard of: `true`, `false`, or null before one. */
let lastVerified = null;

function showError(e) {
  errorLine.textContent = e ? `${e.code ? `${e.code}: ` : ""}${e.message || e}` : "";
}

/** A new task id: sorts by creation time, unique across devices. */
function newId() {
  const random = crypto.getRandomValues(new Uint32Array(2));
  return `t-${Date.now().toString(36).padStart(9, "0")}-${random[0].toString(36)}${random[1].toString(36)}`;
}

/** The `<li>` of one task, made once per task id and updated in place afterwards. */
function taskItem(db, id) {
  const li = document.createElement("li");
  li.dataset.id = id;
  li.dataset.testid = "task";

  const done = document.createElement("input");
  done.type = "checkbox";
  done.className = "done";
  done.setAttribute("aria-label", "done");
  done.addEventListener("change", () => db.patch(COLLECTION, id, { done: done.checked }).catch(showError));

  const title = document.createElement("input");
  title.className = "title";
  title.setAttribute("aria-label", "title");
  // Renames when the field loses focus or on Enter; Escape puts back what the replica holds.
  const rename = () => {
    const value = title.value.trim();
    if (value && value !== title.dataset.saved) db.patch(COLLECTION, id, { title: value }).catch(showError);
  };
  title.addEventListener("change", rename);
  title.addEventListener("keydown", (e) => {
    if (e.key === "Enter") title.blur();
    if (e.key === "Escape") {
      title.value = title.dataset.saved;
      title.blur();
    }
  });

  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "delete";
  remove.textContent = "Delete";
  remove.addEventListener("click", () => db.delete(COLLECTION, id).catch(showError));

  li.append(done, title, remove);
  return li;
}

/** Makes the list show the replica: adds, updates and removes items in place, never
 * overwriting a title the user is editing. */
async function renderTasks(db) {
  const tasks = await db.list(COLLECTION);
  const existing = new Map([...list.children].map((li) => [li.dataset.id, li]));
  let previous = null;
  for (const { id, data } of tasks) {
    let li = existing.get(id);
    existing.delete(id);
    if (!li) li = taskItem(db, id);
    const title = li.querySelector(".title");
    const done = li.querySelector(".done");
    const text = typeof data.title === "string" ? data.title : "";
    title.dataset.saved = text;
    if (document.activeElement !== title) title.value = text;
    done.checked = data.done === true;
    li.classList.toggle("done", done.checked);
    // Keep the replica's order (by id, so by creation time).
    const want = previous ? previous.nextSibling : list.firstChild;
    if (want !== li) list.insertBefore(li, want);
    previous = li;
  }
  for (const li of existing.values()) li.remove();
}

function time(ms) {
  return ms == null ? "never" : new Date(ms).toLocaleTimeString();
}

async function renderStatus(db) {
  const st = await db.status();
  const parts = [
    `pending ${st.pending}`,
    `failed ${st.failed}`,
    `last sync ${time(st.last_sync_at)}`,
    `verified ${lastVerified === null ? "?" : lastVerified ? "yes" : "NO"}`,
  ];
  if (st.last_error) parts.push(`last error ${st.last_error.code}: ${st.last_error.message}`);
  statusLine.textContent = parts.join(" · ");
  statusLine.dataset.pending = String(st.pending);
  statusLine.dataset.failed = String(st.failed);
  statusLine.dataset.verified = String(lastVerified);

  // Lost changes: those `sync` events named, and the outbox's failed entries.
  const items = [...lostInSync.values()].map((l) => ({
    change_id: l.change_id,
    entity_id: l.entity_id,
    why: l.message || (l.conflict && (l.conflict.reason || JSON.stringify(l.conflict))) || "lost",
  }));
  for (const entry of await db.exportPending()) {
    if (entry.state !== "failed" || lostInSync.has(entry.change_id)) continue;
    const why = entry.last_error ? entry.last_error.code || JSON.stringify(entry.last_error) : "refused";
    items.push({ change_id: entry.change_id, entity_id: entry.entity_id, why: `failed: ${why}` });
  }
  lostList.replaceChildren(
    ...items.map((item) => {
      const li = document.createElement("li");
      li.dataset.changeId = item.change_id;
      li.textContent = `${item.entity_id}: ${item.why} (change ${item.change_id})`;
      return li;
    }),
  );
}

async function main() {
  const token = new URLSearchParams(location.search).get("token") || undefined;
  const db = await open({ name: "web-tasks", server: location.origin, token });
  window.tasksDb = db; // for debugging from the console

  // Renders are serialised and coalesced: at most one runs and one waits.
  let running = null;
  let again = false;
  const refresh = () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      do {
        again = false;
        try {
          await renderTasks(db);
          await renderStatus(db);
        } catch (e) {
          showError(e);
        }
      } while (again);
      running = null;
    })();
    return running;
  };

  db.subscribe((event) => {
    if (event.type === "progress") {
      // A long sync (a first one pulls the whole log): say how far it got.
      const done = event.bootstrapped ?? event.pulled;
      statusLine.textContent = `syncing… ${done} changes received`;
      return;
    }
    if (event.type === "sync") {
      lastVerified = event.report.verified;
      for (const lost of event.report.lost || []) lostInSync.set(lost.change_id, lost);
      showError(null);
    } else if (event.type === "sync-error") {
      showError(event.error);
    }
    refresh();
  });

  $("#new-task").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = $("#new-title");
    const title = input.value.trim();
    if (!title) return;
    input.value = "";
    try {
      await db.put(COLLECTION, newId(), { title, done: false });
    } catch (err) {
      showError(err);
    }
  });
  $("#retry-failed").addEventListener("click", () => db.retryFailed().then(refresh, showError));
  $("#discard-failed").addEventListener("click", () => db.discardFailed().then(refresh, showError));

  await refresh();
  setInterval(refresh, STATUS_EVERY_MS);
  db.start();
  document.body.dataset.ready = "true";
}

main().catch((e) => {
  statusLine.textContent = "could not open the database";
  showError(e);
});
