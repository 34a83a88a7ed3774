#!/usr/bin/env python3
"""Generates the golden vectors of the deltasync protocol (spec §5), independently
of the Rust code.

    pip install rfc8785
    python3 crates/protocol/tests/golden/generate.py

writes crates/protocol/tests/golden/vectors.json and docs/golden-vectors.md.

JCS comes from the `rfc8785` package and SHA-256 from `hashlib`. The `fields`
merge policy (spec §4) is re-implemented here in its minimal form: per field
last-writer-wins by HLC, the tombstone `t` (greatest delete HLC), `u` (greatest
upsert HLC), the entity alive iff it has no tombstone or u > t, and a field
visible iff the entity is alive and the field's HLC is greater than `t`. The
vectors use distinct HLCs, so ties never arise.

Each change's `data` is kept here as JSON *text* and copied verbatim into
vectors.json, so that literals such as `4.50`, `-0`, `1e21` and `\\u00e9`
reach the clients under test exactly as written.
"""

import hashlib
import json
import os
import sys

import rfc8785

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
VECTORS = os.path.join(HERE, "vectors.json")
DOC = os.path.join(REPO, "docs", "golden-vectors.md")

T0 = 1763800000000
PHONE, LAPTOP, TABLET = "phone-7f3a", "laptop-01", "tablet-9"


def hlc(offset_ms, counter, device):
    return f"{T0 + offset_ms:013d}-{counter:05d}-{device}"


# (change_id, device_id, collection, entity_id, op, data as JSON text, hlc, what it exercises)
CHANGES = [
    ("c-001", PHONE, "tasks", "t1", "upsert",
     '{"title": "Buy milk", "done": false}',
     hlc(0, 0, PHONE), "first upsert of an entity"),
    ("c-002", LAPTOP, "tasks", "t2", "upsert",
     '{"title": "Caf\\u00e9 au lait \u2615", "price": 4.50, "currency": "\u20ac",'
     ' "note": "tab\\there \\"quoted\\" back\\\\slash \\/ \\b\\f\\u000f\\u007f end"}',
     hlc(1000, 0, LAPTOP), "unicode and escapes in strings (JCS escapes U+000F as \\u000f but writes U+007F raw); 4.50"),
    ("c-003", PHONE, "lists", "shopping list", "upsert",
     '{"items": [{"name": "bread", "qty": 2}, {"name": "\u0153ufs \U0001F95A", "qty": 12, "tags": ["bio", null, true]}],'
     ' "meta": {"owner": "ana", "shared": {"with": ["ben", "chlo\u00e9"], "since": 1763800000000}},'
     ' "empty": {}, "none": null}',
     hlc(2000, 0, PHONE), "entity id with a space; nested objects and arrays; null field"),
    ("c-004", LAPTOP, "tasks", "t1", "upsert",
     '{"done": true}',
     hlc(3000, 0, LAPTOP), "one-field update"),
    ("c-005", PHONE, "numbers", "n1", "upsert",
     '{"big": 1e21, "tenth": 0.1, "negzero": -0, "price": 4.50, "tiny": 1e-7, "milli": 2e-3,'
     ' "thirds": 333333333.33333329, "e30": 1E30, "max_safe": 9007199254740991,'
     ' "two53": 9007199254740992, "neg": -12.5, "arr": [1e21, 0.1, -0, 4.50, 1e-7, -0.0]}',
     hlc(4000, 0, PHONE), "numbers JCS formats specially"),
    ("c-006", PHONE, "lists", "shopping list", "append",
     '{"op": "insert", "path": ["items", 2], "value": {"name": "th\\u00e9 \\ud83c\\udf75", "qty": 1}}',
     hlc(5000, 0, PHONE), "append: chained, no effect on state"),
    ("c-007", LAPTOP, "tasks", "t2", "delete",
     None,
     hlc(6000, 0, LAPTOP), "delete"),
    ("c-008", PHONE, "tasks", "t2", "upsert",
     '{"title": "Th\u00e9 vert", "done": false}',
     hlc(7000, 0, PHONE), "revival after delete: only the reviving fields"),
    ("c-009", PHONE, "unicode", "keys", "upsert",
     '{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", "\\ufb33": "Hebrew Letter Dalet With Dagesh",'
     ' "1": "One", "\\ud83d\\ude00": "Emoji: Grinning Face", "\\u0080": "Control",'
     ' "\u00f6": "Latin Small Letter O With Diaeresis", "\u00e9": "e acute",'
     ' "nested": {"\U0001F600": 1, "\ufb33": 2, "a": 3}}',
     hlc(8000, 1, PHONE), "unicode keys sorted by UTF-16 code units (RFC 8785 3.2.3)"),
    ("c-010", TABLET, "tasks", "t1", "upsert",
     '{"done": false, "note": "was offline"}',
     hlc(1500, 0, TABLET), "stale upsert: `done` loses to c-004, `note` wins"),
    ("c-011", LAPTOP, "tasks", "t3", "delete",
     None,
     hlc(9000, 0, LAPTOP), "delete of an entity never seen (a tombstone)"),
    ("c-012", TABLET, "tasks", "t3", "upsert",
     '{"title": "ghost"}',
     hlc(8500, 0, TABLET), "upsert older than the tombstone: loses, nothing visible"),
    ("c-013", PHONE, "lists", "shopping list", "upsert",
     '{"meta": {"owner": "ben"}}',
     hlc(10000, 0, PHONE), "nested value replaced whole"),
]

MAX_SAFE = 2**53 - 1


def parse_int(text):
    """JSON numbers are doubles: keep small integers as ints, larger ones as the double they denote."""
    n = int(text)
    if -MAX_SAFE <= n <= MAX_SAFE:
        return n
    f = float(text)
    if int(f) != n:
        sys.exit(f"integer {text} is not exactly a double")
    return f


def loads(text):
    return json.loads(text, parse_int=parse_int, parse_float=float)


def sha256(b):
    return hashlib.sha256(b).digest()


def jcs(v):
    return rfc8785.dumps(v)


class Entity:
    def __init__(self):
        self.fields = {}  # name -> (hlc, value)
        self.t = None
        self.u = None

    def apply(self, op, data, h):
        if op == "upsert":
            self.u = h if self.u is None else max(self.u, h)
            if self.t is not None and h <= self.t:
                return
            for name, value in data.items():
                if name not in self.fields or self.fields[name][0] < h:
                    self.fields[name] = (h, value)
        elif op == "delete":
            self.t = h if self.t is None else max(self.t, h)

    def alive(self):
        return self.t is None or (self.u is not None and self.u > self.t)

    def visible(self):
        if not self.alive():
            return {}
        return {n: v for n, (fh, v) in self.fields.items() if self.t is None or fh > self.t}


def entity_hash(collection, entity_id, data):
    return sha256(jcs({"collection": collection, "entity_id": entity_id, "data": data}))


def main():
    entities = {}
    state_hash = bytes(32)
    vectors = []
    for i, (change_id, device, coll, eid, op, data_text, h, note) in enumerate(CHANGES):
        seq = i + 1
        server_time = T0 + 123 + 1000 * i
        data = None if data_text is None else loads(data_text)
        c = {"seq": seq, "change_id": change_id, "device_id": device, "collection": coll,
             "entity_id": eid, "op": op, "data": data, "hlc": h}
        change_hash = sha256(jcs(c))
        state_hash = sha256(change_hash + state_hash)
        entity = None
        if op != "append":
            e = entities.setdefault((coll, eid), Entity())
            e.apply(op, data, h)
            vis = e.visible()
            entity = {
                "collection": coll,
                "entity_id": eid,
                "deleted": not e.alive(),
                "data_jcs": jcs(vis).decode("utf-8"),
                "entity_hash": entity_hash(coll, eid, vis).hex() if e.alive() else None,
            }
        total = 0
        for (ec, ei), e in entities.items():
            if e.alive():
                total += int.from_bytes(entity_hash(ec, ei, e.visible()), "big")
        digest = (total % 2**256).to_bytes(32, "big")
        # The stored change, as JSON text with `data` copied verbatim.
        parts = [
            f'"seq": {seq}',
            f'"change_id": {json.dumps(change_id)}',
            f'"device_id": {json.dumps(device)}',
            f'"collection": {json.dumps(coll)}',
            f'"entity_id": {json.dumps(eid, ensure_ascii=False)}',
            f'"op": {json.dumps(op)}',
            f'"data": {"null" if data_text is None else data_text}',
            f'"hlc": {json.dumps(h)}',
            f'"server_time": {server_time}',
        ]
        change_text = "{" + ", ".join(parts) + "}"
        assert loads(change_text)["data"] == data
        vectors.append({
            "note": note,
            "change_text": change_text,
            "jcs": jcs(c).decode("utf-8"),
            "change_hash": change_hash.hex(),
            "state_hash": state_hash.hex(),
            "state_digest": digest.hex(),
            "entity": entity,
        })
    write_vectors(vectors)
    write_doc(vectors)


DESCRIPTION = (
    "Golden vectors of the deltasync protocol v1 (spec section 5), generated by generate.py with "
    "the rfc8785 package (JCS) and hashlib (SHA-256), independently of the Rust code. "
    "`vectors` is the log in seq order; every collection uses the default `fields` policy. "
    "For vector n: change_hash = SHA-256(JCS(c)) where c holds exactly seq, change_id, device_id, "
    "collection, entity_id, op, data (null when absent) and hlc of the stored change (`jcs` is that "
    "canonical text); state_hash = SHA-256(change_hash || previous state_hash), raw 32-byte digests "
    "concatenated, starting from 32 zero bytes; state_digest = (sum over live entities of "
    "SHA-256(JCS({\"collection\": c, \"entity_id\": id, \"data\": d})) read as 256-bit big-endian "
    "integers) mod 2^256, d the entity's visible data, after the change is merged; deleted entities "
    "and append changes add nothing, an empty state is 64 zeros. `entity` is the merged entity "
    "after the change (null for an append): `data_jcs` its visible data in JCS form, `entity_hash` "
    "its contribution to the digest (null when deleted). Hashes are 64 lowercase hex digits. "
    "`change` is the stored change exactly as served (its number literals are kept as written: "
    "a client must read them as IEEE 754 doubles)."
)


def write_vectors(vectors):
    out = ["{", f'  "description": {json.dumps(DESCRIPTION)},', '  "policy": "fields",', '  "vectors": [']
    for i, v in enumerate(vectors):
        entity = "null" if v["entity"] is None else json.dumps(v["entity"], ensure_ascii=False)
        out.append("    {")
        out.append(f'      "note": {json.dumps(v["note"])},')
        out.append(f'      "change": {v["change_text"]},')
        out.append(f'      "jcs": {json.dumps(v["jcs"], ensure_ascii=False)},')
        out.append(f'      "change_hash": "{v["change_hash"]}",')
        out.append(f'      "state_hash": "{v["state_hash"]}",')
        out.append(f'      "state_digest": "{v["state_digest"]}",')
        out.append(f'      "entity": {entity}')
        out.append("    }" + ("," if i + 1 < len(vectors) else ""))
    out += ["  ]", "}", ""]
    text = "\n".join(out)
    json.loads(text)  # well-formed
    with open(VECTORS, "w", encoding="utf-8") as f:
        f.write(text)


def write_doc(vectors):
    lines = [
        "# Golden vectors",
        "",
        "<!-- Generated by crates/protocol/tests/golden/generate.py; do not edit by hand. -->",
        "",
        "Every deltasync client must compute the same hashes as the server (protocol §5).",
        "These vectors let any implementation check itself: feed the stored changes below,",
        "in `seq` order, into your hash chain, your `fields` merge and your state digest, and",
        "compare after each change.",
        "",
        "- `change_hash = SHA-256(JCS(c))`, where `c` holds exactly `seq`, `change_id`,",
        "  `device_id`, `collection`, `entity_id`, `op`, `data` (`null` when absent) and `hlc`;",
        "  JCS is RFC 8785.",
        "- `state_hash = SHA-256(change_hash || previous state_hash)` over the raw 32-byte",
        "  digests, starting from 32 zero bytes.",
        "- `state_digest` = the sum, mod 2^256, of",
        "  `SHA-256(JCS({\"collection\": c, \"entity_id\": id, \"data\": d}))` over every live",
        "  entity, each read as a 256-bit big-endian integer (`d` its visible data); deleted",
        "  entities and `append` changes add nothing; the empty state is 64 zeros.",
        "",
        "All collections use the default `fields` policy. Number literals are kept as written",
        "(`4.50`, `-0`, `1e21`, …): a client reads them as IEEE 754 doubles, and JCS writes",
        "them in ECMAScript form (`4.5`, `0`, `1e+21`). The machine-readable file is",
        "[`crates/protocol/tests/golden/vectors.json`](../crates/protocol/tests/golden/vectors.json);",
        "`crates/protocol/tests/golden.rs` checks the Rust crate against it. The values were",
        "computed independently of the Rust code, with the `rfc8785` Python package and",
        "`hashlib`.",
        "",
    ]
    for v in vectors:
        c = json.loads(v["change_text"])
        lines += [
            f"## seq {c['seq']}: {c['op']} `{c['collection']}` / `{c['entity_id']}`",
            "",
            f"{v['note'][0].upper() + v['note'][1:]}.",
            "",
            "Stored change:",
            "",
            "```json",
            v["change_text"],
            "```",
            "",
            "Canonical form hashed (JCS):",
            "",
            "```json",
            v["jcs"],
            "```",
            "",
        ]
        e = v["entity"]
        if e is not None:
            state = "deleted" if e["deleted"] else f"`{e['data_jcs']}`"
            lines += [f"Entity after the merge: {state}", ""]
        lines += [
            "| | |",
            "| --- | --- |",
            f"| change_hash | `{v['change_hash']}` |",
            f"| state_hash | `{v['state_hash']}` |",
            f"| state_digest | `{v['state_digest']}` |",
            "",
        ]
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
