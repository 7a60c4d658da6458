"""The Redis state schema: every key Shoal writes, its type, TTL and version.

Nothing outside shared/state builds a key by hand. All keys start with
`shoal:v<SCHEMA_VERSION>:`; a change of layout bumps SCHEMA_VERSION so old
and new code never read each other's data. Celery uses its own database
number on the same server (see the controller settings).

| key | type | TTL | written by | meaning |
| --- | --- | --- | --- | --- |
| workers | SET | - | registry | ids of registered workers (index; stale ids pruned on read) |
| worker:{id} | HASH info, load, updated_at | lease | worker heartbeat | entry; gone when the lease lapses |
| left:{id} | STRING "1" | lease | worker deregistration | the worker left on purpose (not a lost entry) |
| cluster | STRING id | - | controller | present while Redis holds Shoal's state; gone after a wipe |
| cordoned | SET | - | controller | worker ids that get no new requests |
| kv:events | STREAM | MAXLEN ~KV_EVENTS_MAXLEN | workers, kvstore | block added/removed events |
| kv:snapshot:{pub} | HASH epoch, seq, hashes | SNAPSHOT_TTL | publishers | a publisher's whole block set |
| doc:{name} | HASH version, body | - | controller | versioned JSON documents (pools, models, expert maps) |
| lock:{name} | STRING | lock TTL | controller jobs | mutual exclusion (one migration at a time) |
| decisions | STREAM | MAXLEN ~DECISIONS_MAXLEN | controller | reconcile decisions and their reasons |
| job:{id} | STRING JSON, versioned (CAS) | FINISHED_TTL once finished | controller, Celery | a long job, its progress |
| jobs:open | SET | - | controller, Celery | ids of jobs not finished (the reconcile loop's sweep) |
| jobs:index | ZSET id -> created_at | - | controller, Celery | every job, for listing (expired ones pruned as met) |
| metrics:router | STREAM | MAXLEN ~METRICS_MAXLEN | router | per-interval request statistics |
| graph:{id} | STRING JSON | FINISHED_TTL once finished | controller | an agent graph: per-step state, plan, result |
| graphs:open | SET | - | controller | ids of graphs not finished |
| graphs:index | ZSET id -> created_at | - | controller | every graph, for listing (expired ones pruned as met) |
| experts:history:{worker} | STREAM (capped) | - | controller | an expert-parallel instance's balance over time |
| session:{id} | STRING worker id | SESSION_TTL | routers | the worker an agent session last ran on |
| apikeys:changes | STRING counter | - | controller | bumped on every key change: routers read the keys again |
| bucket:{key id}:{kind} | HASH tokens, at | until full again | routers | a key's request or token bucket |
| audit | STREAM | MAXLEN ~AUDIT_MAXLEN | controller | every admin API write: who, what, when, result |
"""

from __future__ import annotations

from typing import Final

SCHEMA_VERSION: Final = 1
PREFIX: Final = f"shoal:v{SCHEMA_VERSION}:"

KV_EVENTS_MAXLEN: Final = 200_000
DECISIONS_MAXLEN: Final = 10_000
METRICS_MAXLEN: Final = 20_000
SNAPSHOT_TTL_S: Final = 3600
SESSION_TTL_S: Final = 3600


def _key(*parts: str) -> str:
    if not all(parts):
        raise ValueError(f"empty part in key {parts!r}")
    return PREFIX + ":".join(parts)


WORKERS: Final = _key("workers")
# Written by the controller; its absence means Redis lost its data (wiped, or restarted without it).
CLUSTER: Final = _key("cluster")
CORDONED: Final = _key("cordoned")
KV_EVENTS: Final = _key("kv", "events")
DECISIONS: Final = _key("decisions")
OPEN_JOBS: Final = _key("jobs", "open")
JOB_INDEX: Final = _key("jobs", "index")
OPEN_GRAPHS: Final = _key("graphs", "open")
GRAPH_INDEX: Final = _key("graphs", "index")
ROUTER_METRICS: Final = _key("metrics", "router")
API_KEY_CHANGES: Final = _key("apikeys", "changes")
AUDIT: Final = _key("audit")
AUDIT_MAXLEN: Final = 100_000


WORKER_KEY_PREFIX: Final = _key("worker") + ":"


def worker(worker_id: str) -> str:
    return _key("worker", worker_id)


def worker_left(worker_id: str) -> str:
    return _key("left", worker_id)


KV_SNAPSHOT_PREFIX: Final = _key("kv", "snapshot") + ":"


def kv_snapshot(publisher: str) -> str:
    return _key("kv", "snapshot", publisher)


DOC_KEY_PREFIX: Final = _key("doc") + ":"
# Documents routers serve from (models, pools, aliases), and a counter bumped whenever one is written,
# so a router reads them again only when they changed.
CATALOG_DOCS: Final = ("model:", "pool:", "alias:")
CATALOG_CHANGES: Final = _key("catalog", "changes")
# OpenAI API keys are documents too (doc:apikey:{id}: digest, limits, revocation), with their own counter.
API_KEY_DOC: Final = "apikey:"


def doc(name: str) -> str:
    return _key("doc", name)


def job(job_id: str) -> str:
    return _key("job", job_id)


def graph(graph_id: str) -> str:
    return _key("graph", graph_id)


def lock(name: str) -> str:
    return _key("lock", name)


def expert_history(worker_id: str) -> str:
    return _key("experts", "history", worker_id)


def session(session_id: str) -> str:
    return _key("session", session_id)


def bucket(key_id: str, kind: str) -> str:
    return _key("bucket", key_id, kind)
