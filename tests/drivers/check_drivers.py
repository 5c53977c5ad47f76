#!/usr/bin/env python3
"""Driver-level checks for shardgate, using real Python drivers.

Drivers: psycopg 3 (``psycopg``, including its libpq wrapper ``psycopg.pq``),
psycopg2 and asyncpg (see requirements.txt).

Usage::

    python3 tests/drivers/check_drivers.py \
        --dsn-proxy  'host=127.0.0.1 port=6432  user=app password=app dbname=app' \
        --dsn-direct 'host=127.0.0.1 port=16000 user=app password=app dbname=app'

Most checks are differential: the same script of driver calls runs once
directly against PostgreSQL and once through the proxy, and the recorded
transcripts (results, SQLSTATEs, transaction status, ...) must be identical.
Every step that could hang is bounded by a timeout, so a hang is a FAIL.

Prints one line per check, ``ok <name>`` or ``FAIL <name>: <reason>``, then
a last line ``N passed, M failed``. Exit status 0 only if nothing failed.
Options: ``--only SUBSTR`` (repeatable) runs the checks whose name contains
SUBSTR; ``--verbose`` prints tracebacks of failures to stderr; ``--dump``
prints both transcripts of every differential check to stderr.

Checks (the number is the item of the issue it covers; 12 and 13 are extra):
  01a/01b  multi-statement simple Query containing BEGIN/COMMIT (psycopg2, psycopg 3)
  02a-02c  Flush without Sync: psycopg 3 pipeline, raw libpq pipeline, asyncpg
  03a/03b  Close answered in order: psycopg 3 prepared_max=2, raw libpq pipeline
  04a-04d  COPY: psycopg 3, extended-protocol COPY (PQexecParams), asyncpg, psycopg2
  05a/05b  session SET does not leak; session state follows the client like Postgres
  06       auth errors (28P01, 3D000) as Postgres reports them
  07a/07b  ParameterStatus; client_encoding=LATIN1 honoured
  08a-08d  errors inside transactions (25P02 until rollback), incl. named Parse
  09a/09b  asyncpg 20 connections x 50 queries; prepared statements reused
  10a-10c  NOTICE passthrough (psycopg 3, psycopg2, asyncpg)
  11a-11c  cancel: psycopg 3, idle client's cancel hits nobody, asyncpg timeout
  12a/12b  prepared statements after ALTER TABLE (fresh client, asyncpg re-prepare)
  13       the same query text prepared under different search_paths
  14       shardgate.* settings from psycopg 3, psycopg2 and asyncpg (proxy only)

To make pool-dependent bugs deterministic, some checks steer clients onto a
given server connection: a client notes pg_backend_pid() in a transaction,
then fresh clients open transactions until one of them sits on that backend
(``grab_server``).

The checks create tables (and for check 13 schemas) named ``sgdrv_<pid>_*``
in the target database through the direct DSN, and drop them at the end.
"""

import argparse
import asyncio
import io
import os
import select
import sys
import threading
import time
import traceback
from decimal import Decimal

import asyncpg
import psycopg
import psycopg2
import psycopg2.extensions
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DIRECT = None  # libpq conninfo strings, set in main()
PROXY = None

CONNECT_TIMEOUT = 10  # seconds, for every connection attempt
STEP_TIMEOUT = 30  # seconds, for one run of a transcript against one target
HANG_TIMEOUT = 10  # seconds, for the Flush-without-Sync checks


class CheckFailure(AssertionError):
    pass


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def short(value, limit=400):
    s = repr(value)
    return s if len(s) <= limit else s[:limit] + "..."


def fmt_exc(ex):
    state = getattr(ex, "sqlstate", None) or getattr(ex, "pgcode", None)
    msg = str(ex).strip().replace("\n", " | ")
    if len(msg) > 300:
        msg = msg[:300] + "..."
    name = type(ex).__name__
    if isinstance(ex, CheckFailure):
        return msg
    return f"{name}{'[' + state + ']' if state else ''}: {msg}"


def sqlstate(ex):
    return getattr(ex, "sqlstate", None) or getattr(ex, "pgcode", None)


def attempt(fn):
    """Run fn(); return ('ok', value) or ('err', <sqlstate or exception class>)."""
    try:
        return ("ok", fn())
    except (psycopg.Error, psycopg2.Error, asyncpg.PostgresError) as ex:
        return ("err", sqlstate(ex) or type(ex).__name__)


async def aattempt(coro):
    try:
        return ("ok", await coro)
    except asyncpg.PostgresError as ex:
        return ("err", ex.sqlstate)
    except (asyncpg.InterfaceError, asyncio.TimeoutError) as ex:
        return ("err", type(ex).__name__)


def bounded(fn, timeout, what):
    """Run fn() in a thread; fail if it raises or does not finish in time."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as ex:  # noqa: BLE001 - reported below
            box["error"] = ex
            box["tb"] = traceback.format_exc()

    th = threading.Thread(target=target, daemon=True, name=what)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise CheckFailure(f"{what}: no answer within {timeout}s (hang)")
    if "error" in box:
        ex = box["error"]
        if VERBOSE:
            sys.stderr.write(f"--- {what} ---\n{box['tb']}\n")
        raise CheckFailure(f"{what}: {fmt_exc(ex)}") from ex
    return box.get("value")


def run_async(coro_fn, *args, timeout=STEP_TIMEOUT):
    async def runner():
        try:
            return await asyncio.wait_for(coro_fn(*args), timeout)
        except asyncio.TimeoutError:
            raise CheckFailure(f"no answer within {timeout}s (hang)") from None

    return asyncio.run(runner())


def first_difference(d, p, limit=3):
    """Describe (up to `limit`) differing steps of two transcripts."""
    if isinstance(d, list) and isinstance(p, list):
        diffs = [f"step {i}: direct={short(a)} proxy={short(b)}"
                 for i, (a, b) in enumerate(zip(d, p)) if a != b]
        more = len(diffs) - limit
        parts = diffs[:limit] + ([f"(+{more} more differing steps)"] if more > 0 else [])
        if len(d) != len(p):
            extra = d[len(p):] if len(d) > len(p) else p[len(d):]
            parts.append(f"direct has {len(d)} steps, proxy {len(p)}; extra: {short(extra)}")
        return "; ".join(parts)
    return f"direct={short(d)} proxy={short(p)}"


def differential(fn, timeout=STEP_TIMEOUT, is_async=False):
    """Run fn(dsn, tag) directly and through the proxy; the results must match.

    Returns the direct transcript (for extra sanity assertions)."""
    if is_async:
        def call(dsn, tag):
            return run_async(fn, dsn, tag, timeout=timeout)
    else:
        call = fn
    d = bounded(lambda: call(DIRECT, "d"), timeout + 2, "direct")
    if DUMP:
        sys.stderr.write(f"[direct transcript] {d!r}\n")
    p = bounded(lambda: call(PROXY, "p"), timeout + 2, "proxy")
    if DUMP:
        sys.stderr.write(f"[proxy transcript] {p!r}\n")
    if d != p:
        raise CheckFailure("differs from direct Postgres: " + first_difference(d, p))
    return d


def expect(cond, msg):
    if not cond:
        raise CheckFailure(msg)


# -- connections ------------------------------------------------------------


def pg3(dsn, autocommit=False, **kw):
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT, **kw)


def pg2(dsn, autocommit=True, **kw):
    conn = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT, **kw)
    conn.autocommit = autocommit
    return conn


class LL:
    """A libpq connection (psycopg.pq.PGconn) for protocol-level steps.

    Every wait is done by us in non-blocking mode, with select() and a
    deadline, so a hang never blocks inside libpq (which would hold the GIL
    and freeze the whole program) and turns into a failure instead."""

    COPY_STATES = (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH)

    def __init__(self, dsn, timeout=HANG_TIMEOUT):
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        self.c = self.conn.pgconn
        self.c.nonblocking = 1
        self.timeout = timeout

    def __getattr__(self, name):  # send_*, enter_pipeline_mode, transaction_status, ...
        return getattr(self.c, name)

    def _wait(self, deadline, write=False):
        left = deadline - time.monotonic()
        if left <= 0:
            raise CheckFailure(f"no answer from the server within {self.timeout}s (hang)")
        fd = self.c.socket
        select.select([fd], [fd] if write else [], [], min(left, 0.5))

    def flush(self):
        deadline = time.monotonic() + self.timeout
        while self.c.flush() != 0:
            self._wait(deadline, write=True)
            self.c.consume_input()
        return 0

    def get_result(self):
        self.flush()
        deadline = time.monotonic() + self.timeout
        while self.c.is_busy():
            self._wait(deadline)
            self.c.consume_input()
        return self.c.get_result()

    def _run(self, send, *args):
        """Like PQexec*: send, then return the last result (stopping at a COPY)."""
        send(*args)
        last = None
        while True:
            r = self.get_result()
            if r is None:
                return last
            last = r
            if r.status in self.COPY_STATES:
                return r

    def exec_(self, sql):
        return self._run(self.c.send_query, sql)

    def exec_params(self, sql, params):
        return self._run(self.c.send_query_params, sql, params)

    def prepare(self, name, sql):
        return self._run(self.c.send_prepare, name, sql)

    def exec_prepared(self, name, params):
        return self._run(self.c.send_query_prepared, name, params)

    def describe_prepared(self, name):
        return self._run(self.c.send_describe_prepared, name)

    def close_prepared(self, name):
        return self._run(self.c.send_close_prepared, name)

    def results(self):
        """All remaining results of the current command (until NULL)."""
        out = []
        while (r := self.get_result()) is not None:
            out.append(r)
        return out

    def put_copy_data(self, data):
        deadline = time.monotonic() + self.timeout
        while self.c.put_copy_data(data) == 0:
            self._wait(deadline, write=True)
        return 1

    def put_copy_end(self, error=None):
        deadline = time.monotonic() + self.timeout
        while self.c.put_copy_end(error) == 0:
            self._wait(deadline, write=True)
        self.flush()
        return 1

    def get_copy_data(self):
        deadline = time.monotonic() + self.timeout
        while True:
            n, data = self.c.get_copy_data(1)
            if n != 0:
                return n, data
            self._wait(deadline)
            self.c.consume_input()

    def finish(self):
        self.conn.close()


def raw(dsn):
    return LL(dsn)


def apg_kwargs(dsn):
    info = conninfo_to_dict(dsn)
    kw = {}
    if "host" in info:
        kw["host"] = info["host"]
    if "port" in info:
        kw["port"] = int(info["port"])
    if "user" in info:
        kw["user"] = info["user"]
    if "password" in info:
        kw["password"] = info["password"]
    if "dbname" in info:
        kw["database"] = info["dbname"]
    return kw


async def apg(dsn, **kw):
    args = apg_kwargs(dsn)
    args.update(kw)
    return await asyncpg.connect(timeout=CONNECT_TIMEOUT, **args)


def with_params(dsn, **kw):
    info = conninfo_to_dict(dsn)
    info.update({k: str(v) for k, v in kw.items()})
    return make_conninfo(**info)


# -- tables -----------------------------------------------------------------

_TABLES = []


def mktable(tag, base, columns):
    """Create a fresh table (through the direct DSN) and return its name."""
    name = f"sgdrv_{os.getpid()}_{base}_{tag}"
    with pg3(DIRECT, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {name}")
        c.execute(f"CREATE TABLE {name} ({columns})")
    _TABLES.append(name)
    return name


def drop_tables():
    if not _TABLES:
        return
    try:
        with pg3(DIRECT, autocommit=True) as c:
            for t in _TABLES:
                c.execute(f"DROP TABLE IF EXISTS {t}")
    except Exception as ex:  # noqa: BLE001
        sys.stderr.write(f"warning: could not drop test tables: {fmt_exc(ex)}\n")


# -- pool steering -------------------------------------------------------------

SETTINGS_SQL = (
    "select current_setting('statement_timeout'), current_setting('client_encoding'), "
    "current_setting('DateStyle'), current_setting('TimeZone'), "
    "current_setting('application_name'), current_setting('search_path'), "
    "current_setting('work_mem')"
)


def fresh_settings(dsn):
    with pg3(dsn, autocommit=True) as c:
        return c.execute(SETTINGS_SQL).fetchone()


def backend_pid(conn):
    """pid of the server backend a psycopg 3 autocommit connection uses now (in a tx)."""
    conn.execute("BEGIN")
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    conn.execute("COMMIT")
    return pid


def grab_server(dsn, pid, limit=12, connect=None):
    """Through the proxy: open transactions on fresh connections until one of them
    sits on server backend `pid`, so that backend's previous client must use
    another server connection next. Returns (holders, settings seen on `pid`,
    settings seen by every holder); when `pid` was found, holders is just the
    client sitting on it. A no-op for the direct DSN."""
    holders, seen, everyone = [], None, []
    if dsn == DIRECT:
        return holders, seen, everyone
    try:
        for _ in range(limit):
            h = connect() if connect else pg3(dsn, autocommit=True)
            holders.append(h)
            try:
                h.execute("BEGIN")
                row = h.execute(f"select pg_backend_pid(), * from ({SETTINGS_SQL}) s").fetchone()
            except psycopg.errors.TooManyConnections:  # 53300: the pool is smaller than `limit`
                break
            everyone.append(tuple(row[1:]))
            if row[0] == pid:
                seen = tuple(row[1:])
                break
    except BaseException:
        release(holders)
        raise
    if seen is not None and len(holders) > 1:
        # Only the holder on `pid` matters. The others give their connections
        # back, so that pid's previous client can get one: a proxy that hands
        # a client's last connection to others only when it has no idle one
        # (shardgate's spares) lets the holders take every idle one first.
        release(holders[:-1])
        holders = holders[-1:]
    return holders, seen, everyone


def release(holders):
    for h in holders:
        try:
            h.execute("ROLLBACK")
            h.close()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------

CHECKS = []


def check(name):
    def deco(fn):
        CHECKS.append((name, fn))
        return fn

    return deco


TX2 = {
    psycopg2.extensions.TRANSACTION_STATUS_IDLE: "IDLE",
    psycopg2.extensions.TRANSACTION_STATUS_ACTIVE: "ACTIVE",
    psycopg2.extensions.TRANSACTION_STATUS_INTRANS: "INTRANS",
    psycopg2.extensions.TRANSACTION_STATUS_INERROR: "INERROR",
    psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN: "UNKNOWN",
}


# -- 1. multi-statement simple query containing BEGIN ---------------------------


def t_multi_begin_psycopg2(dsn, tag):
    t = mktable(tag, "multi2", "id int")
    conn, obs = pg2(dsn), pg2(dsn)
    cur, ocur = conn.cursor(), obs.cursor()
    out = []

    def st():
        return TX2[conn.get_transaction_status()]

    def seen():
        ocur.execute(f"select count(*) from {t}")
        return ocur.fetchone()[0]

    def run(label, sql, params=None):
        try:
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description else None
            out.append((label, "ok", rows, cur.statusmessage, st()))
        except psycopg2.Error as ex:
            out.append((label, "err", ex.pgcode, st()))

    try:
        run("begin-multi", f"BEGIN; SELECT 1; INSERT INTO {t} VALUES (1); SELECT 2")
        out.append(("observer-before-commit", seen()))
        cur.execute("SELECT pg_backend_pid(), txid_current()")
        a = cur.fetchone()
        run("in-tx", "SELECT 3")
        cur.execute("SELECT pg_backend_pid(), txid_current()")
        b = cur.fetchone()
        out.append(("same-backend-and-xid", a == b))
        run("commit", "COMMIT")
        out.append(("observer-after-commit", seen()))
        run("select-begin-multi", f"SELECT 1; BEGIN; INSERT INTO {t} VALUES (2); SELECT 4; SELECT 5")
        out.append(("observer", seen()))
        for i in range(10):  # other traffic while this client sits in its transaction
            ocur.execute("select %s", (i,))
            run(f"in-tx-{i}", "select %s::int", (i,))
        run("commit-multi", "SELECT 6; COMMIT; SELECT 7")
        out.append(("observer", seen()))
        run("begin", "BEGIN; SELECT 8")
        run("error-in-multi", "SELECT 9; SELECT 1/0; SELECT 10")
        run("aborted", "SELECT 11")
        run("rollback", "ROLLBACK")
        run("implicit-tx-error", f"INSERT INTO {t} VALUES (3); SELECT 1/0")
        out.append(("observer", seen()))
        run("begin-commit-in-one", f"BEGIN; INSERT INTO {t} VALUES (4); COMMIT; SELECT 12")
        out.append(("observer", seen()))
        run("begin-only", "BEGIN")
        run("set-local-multi", "SET LOCAL work_mem = '3MB'; SHOW work_mem")
        run("commit-then-begin", "COMMIT; BEGIN; SELECT 13")
        run("rollback-multi", "SELECT 14; ROLLBACK")
        run("final", "SELECT 15")
    finally:
        conn.close()
        obs.close()
    return out


@check("01a_multistatement_begin_psycopg2")
def c01a():
    d = differential(t_multi_begin_psycopg2)
    expect(d[0] == ("begin-multi", "ok", [(2,)], "SELECT 1", "INTRANS"), f"test bug: {d[0]}")


def all_sets(cur):
    sets = []
    while True:
        sets.append((cur.statusmessage, cur.fetchall() if cur.description else None))
        if not cur.nextset():
            return sets


def t_multi_begin_psycopg3(dsn, tag):
    out = []
    with pg3(dsn, autocommit=True) as conn:
        def run(label, sql):
            try:
                cur = conn.execute(sql)
                out.append((label, "ok", all_sets(cur), conn.info.transaction_status.name))
            except psycopg.Error as ex:
                out.append((label, "err", ex.sqlstate, conn.info.transaction_status.name))

        run("begin-multi", "BEGIN; SELECT 1; SELECT 2")
        run("pid-xid", "SELECT pg_backend_pid() = pg_backend_pid(), txid_current() > 0")
        xid1 = conn.execute("select txid_current()").fetchone()[0]
        run("in-tx-extended", "SELECT 3")
        out.append(("in-tx-params", conn.execute("select %s::int", (4,)).fetchone(),
                    conn.info.transaction_status.name))
        xid2 = conn.execute("select txid_current()").fetchone()[0]
        out.append(("same-xid", xid1 == xid2))
        run("commit", "COMMIT")
        run("multi-commit-begin", "SELECT 5; COMMIT; BEGIN; SELECT 6")
        run("status", "SELECT 7")
        run("error", "SELECT 1/0; SELECT 8")
        run("aborted", "SELECT 9")
        run("rollback", "ROLLBACK; SELECT 10")
    return out


@check("01b_multistatement_begin_psycopg3")
def c01b():
    d = differential(t_multi_begin_psycopg3)
    expect(d[0][3] == "INTRANS", f"test bug: {d[0]}")


# -- 2. Flush without Sync -------------------------------------------------------


def t_pipeline_psycopg3(dsn, tag):
    t = mktable(tag, "pipe", "id int")
    out = []
    with pg3(dsn, autocommit=True) as conn, pg3(dsn, autocommit=True) as other:
        with conn.pipeline() as p:
            c1 = conn.execute("select %s::int", (1,))
            c2 = conn.execute("select %s::text", ("two",))
            # fetching before p.sync() makes psycopg send a Flush (no Sync)
            out.append(("fetch-before-sync", c1.fetchone()))
            c3 = conn.execute("select pg_backend_pid()")
            out.append(("second", c2.fetchone()))
            pid1 = c3.fetchone()[0]
            for i in range(20):  # other clients work while the batch is open
                other.execute("select %s::int", (i,)).fetchone()
            c4 = conn.execute("select pg_backend_pid()")
            pid2 = c4.fetchone()[0]
            out.append(("same-backend-within-batch", pid1 == pid2))
            p.sync()
            out.append(("status-after-sync", conn.info.transaction_status.name))
            curs = [conn.execute("select %s::int * 2", (i,)) for i in range(100)]
            mid = curs[50].fetchone()  # Flush in the middle of the batch
            out.append(("mid-fetch", mid))
            p.sync()
            out.append(("batch", [mid[0] if i == 50 else c.fetchone()[0] for i, c in enumerate(curs)]))
        out.append(("after-pipeline", conn.execute("select 42").fetchone()))

        # an error before Sync rolls back the whole implicit transaction
        step = []
        try:
            with conn.pipeline() as p:
                conn.execute(f"insert into {t} values (%s)", (1,))
                ci = conn.execute(f"select count(*) from {t}")
                step.append(ci.fetchone())  # Flush: insert visible inside the batch
                conn.execute("select 1/0")
                conn.execute(f"insert into {t} values (%s)", (2,))
                p.sync()
        except psycopg.Error as ex:
            step.append((type(ex).__name__, ex.sqlstate))
        out.append(("error-batch", step))
        out.append(("rows-after-error-batch", conn.execute(f"select count(*) from {t}").fetchone()))
        out.append(("status", conn.info.transaction_status.name))

        # explicit transaction inside a pipeline, with Flushes
        with conn.pipeline() as p:
            with conn.transaction():
                conn.execute(f"insert into {t} values (%s)", (3,))
                out.append(("in-tx-fetch", conn.execute(f"select count(*) from {t}").fetchone()))
                for i in range(10):
                    other.execute("select 1")
                conn.execute(f"insert into {t} values (%s)", (4,))
            p.sync()
        out.append(("after-tx", conn.execute(f"select array_agg(id order by id) from {t}").fetchone()))

    # non-autocommit connection: psycopg queues BEGIN in the pipeline
    with pg3(dsn) as conn:
        with conn.pipeline():
            a = conn.execute("select %s::int", (10,))
            out.append(("nonauto-fetch", a.fetchone(), conn.info.transaction_status.name))
            b = conn.execute("select %s::int", (11,))
        out.append(("nonauto-after", b.fetchone(), conn.info.transaction_status.name))
        conn.commit()
        out.append(("nonauto-commit", conn.info.transaction_status.name))
    return out


@check("02a_flush_psycopg3_pipeline")
def c02a():
    d = differential(t_pipeline_psycopg3, timeout=HANG_TIMEOUT)
    expect(d[0] == ("fetch-before-sync", (1,)), f"test bug: {d[0]}")


def t_flush_lowlevel(dsn, tag):
    """libpq pipeline: Parse/Bind/Execute + Flush, read the answers, continue, Sync."""
    out = []
    c = raw(dsn)
    try:
        c.enter_pipeline_mode()
        c.send_query_params(b"select $1::int + 1", [b"1"])
        c.send_prepare(b"f1", b"select $1::text || 'x'")
        c.send_flush_request()
        c.flush()
        out.append(collect(c, 2))
        c.send_query_prepared(b"f1", [b"a"])
        c.send_describe_prepared(b"f1")
        c.send_flush_request()
        c.flush()
        out.append(collect(c, 2))
        c.send_query_params(b"select 1/0", None)
        c.send_query_params(b"select 2", None)
        c.send_flush_request()
        c.flush()
        out.append(collect(c, 2))
        c.pipeline_sync()
        out.append(collect(c, 1))
        c.send_query_prepared(b"f1", [b"b"])
        c.pipeline_sync()
        out.append(collect(c, 2))
        c.exit_pipeline_mode()
        out.append(pq.TransactionStatus(c.transaction_status).name)
    finally:
        c.finish()
    return out


@check("02b_flush_libpq_pipeline")
def c02b():
    d = differential(t_flush_lowlevel, timeout=HANG_TIMEOUT)
    expect(d[0] == [[("TUPLES_OK", "2")], [("COMMAND_OK",)]], f"test bug: {d[0]}")


async def t_flush_asyncpg(dsn, tag):
    t = mktable(tag, "aflush", "id int primary key, v text")
    out = []
    conn = await apg(dsn)
    other = await apg(dsn)
    try:
        stmt = await conn.prepare("select $1::int + 100")  # Parse/Describe/Flush
        for i in range(20):
            await other.fetchval("select $1::int", i)
        out.append(("prepared", await stmt.fetchval(1)))
        out.append(("fetchval", [await conn.fetchval(f"select $1::int + {k}", k) for k in range(30)]))
        try:
            await conn.prepare("selec 1")
            out.append(("syntax", "no error"))
        except asyncpg.PostgresError as ex:
            out.append(("syntax", ex.sqlstate))
        out.append(("after-error", await conn.fetchval("select 7")))
        await conn.executemany(f"insert into {t} values ($1, $2)", [(i, str(i)) for i in range(500)])
        out.append(("executemany", await conn.fetchval(f"select count(*) from {t}")))
        try:  # error in the middle of a pipelined executemany (asyncpg makes it atomic)
            await conn.executemany(f"insert into {t} values ($1, $2)",
                                   [(1000, "a"), (1001, "b"), (1000, "c")] + [(2000 + i, "d") for i in range(200)])
            out.append(("executemany-error", "no error"))
        except asyncpg.PostgresError as ex:
            out.append(("executemany-error", ex.sqlstate))
        out.append(("count", await conn.fetchval(f"select count(*) from {t}")))
        async with conn.transaction():
            rows = [r[0] async for r in conn.cursor("select generate_series(1, 300)", prefetch=17)]
        out.append(("cursor", rows == list(range(1, 301))))
        out.append(("array", await conn.fetchval("select $1::int[]", [1, 2, 3])))
        out.append(("json", await conn.fetchval("select $1::jsonb ->> 'a'", '{"a": "b"}')))

        # many clients preparing at once
        async def worker(n):
            c = await apg(dsn)
            try:
                return [await c.fetchval(f"select $1::int * {n} + {k}", k) for k in range(15)]
            finally:
                await c.close()

        res = await asyncio.gather(*[worker(n) for n in range(10)])
        out.append(("concurrent", res == [[k * n + k for k in range(15)] for n in range(10)]))
    finally:
        await conn.close()
        await other.close()
    return out


@check("02c_flush_asyncpg")
def c02c():
    d = differential(t_flush_asyncpg, timeout=HANG_TIMEOUT, is_async=True)
    expect(d[0] == ("prepared", 101), f"test bug: {d[0]}")


# -- 3. Close answered in order -----------------------------------------------------


def t_prepared_psycopg3(dsn, tag):
    out = []
    with pg3(dsn, autocommit=True) as conn:
        conn.prepare_threshold = 0
        conn.prepared_max = 2
        for rnd in range(4):
            out.append(("auto", rnd, [conn.execute(f"select %s::int + {k}", (rnd,)).fetchone()[0]
                                      for k in range(10)]))
        for rnd in range(3):
            with conn.transaction():
                out.append(("tx", rnd, [conn.execute(f"select %s::int - {k}", (rnd,)).fetchone()[0]
                                        for k in range(6)]))
        with conn.pipeline():
            curs = [conn.execute(f"select %s::int * {k}", (3,)) for k in range(12)]
        out.append(("pipeline", [c.fetchone()[0] for c in curs]))
        with conn.pipeline() as p:
            vals = []
            for k in range(8):
                vals.append(conn.execute(f"select %s::text || '{k}'", ("p",)).fetchone()[0])
            p.sync()
        out.append(("pipeline-flush", vals))
        conn.prepare_threshold = None  # only prepare=True prepares now
        out.append(("prepare-true", [conn.execute(f"select %s::int + {100 + k}", (1,), prepare=True)
                                     .fetchone()[0] for k in range(8)]))
        out.append(("unprepared", conn.execute("select %s::int + 1000", (1,)).fetchone()[0]))
        out.append(("status", conn.info.transaction_status.name))
    return out


@check("03a_close_psycopg3_prepared")
def c03a():
    d = differential(t_prepared_psycopg3)
    expect(d[1] == ("auto", 1, [1 + k for k in range(10)]), f"test bug: {d[1]}")
    expect(psycopg.capabilities.has_send_close_prepared(),
           "libpq of psycopg lacks PQsendClosePrepared: deallocation does not use Close")


def res_desc(r):
    st = pq.ExecStatus(r.status)
    if st == pq.ExecStatus.FATAL_ERROR:
        return (st.name, (r.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode())
    if st == pq.ExecStatus.TUPLES_OK and r.ntuples:
        v = r.get_value(0, 0)
        return (st.name, None if v is None else v.decode())
    return (st.name,)


def collect(c, ncmds):
    """Collect the results of `ncmds` pipelined commands (a Sync counts as one)."""
    cmds = []
    for _ in range(ncmds):
        results = []
        while True:
            r = c.get_result()
            if r is None:
                break
            results.append(res_desc(r))
            if r.status == pq.ExecStatus.PIPELINE_SYNC:
                break
        cmds.extend(results if results and results[-1] == ("PIPELINE_SYNC",) else [results])
    return cmds if ncmds > 1 else cmds[0]


def t_close_lowlevel(dsn, tag):
    out = []
    c = raw(dsn)
    try:
        c.enter_pipeline_mode()
        c.send_prepare(b"s1", b"select $1::int + 1")
        c.send_query_prepared(b"s1", [b"1"])
        c.send_close_prepared(b"s1")
        c.send_prepare(b"s1", b"select $1::int * 10")  # same name again after Close
        c.send_query_prepared(b"s1", [b"2"])
        c.send_close_prepared(b"never_prepared")
        c.send_flush_request()
        c.flush()
        out.append(("flushed", collect(c, 6)))
        c.send_close_prepared(b"s1")
        c.send_query_prepared(b"s1", [b"3"])  # closed: 26000
        c.send_prepare(b"s2", b"select 2")  # skipped after the error
        c.pipeline_sync()
        out.append(("synced", collect(c, 4)))
        c.send_query_prepared(b"s2", None)  # never created: 26000
        c.pipeline_sync()
        out.append(("s2", collect(c, 2)))
        c.send_prepare(b"s1", b"select 'again'")
        c.send_query_prepared(b"s1", None)
        c.send_close_portal(b"")
        c.send_close_prepared(b"s1")
        c.send_close_prepared(b"s1")  # closing twice is fine
        c.send_query_params(b"select 'tail'", None)
        c.pipeline_sync()
        out.append(("reuse", collect(c, 7)))
        c.exit_pipeline_mode()
        # the same outside pipeline mode: each step ends with Sync
        out.append(("p", res_desc(c.prepare(b"s3", b"select 33"))))
        out.append(("c", res_desc(c.close_prepared(b"s3"))))
        out.append(("e", res_desc(c.exec_prepared(b"s3", None))))
        out.append(("p2", res_desc(c.prepare(b"s3", b"select 34"))))
        out.append(("e2", res_desc(c.exec_prepared(b"s3", None))))
        out.append(("dup", res_desc(c.prepare(b"s3", b"select 35"))))
        out.append(("e3", res_desc(c.exec_prepared(b"s3", None))))
        out.append(pq.TransactionStatus(c.transaction_status).name)
    finally:
        c.finish()
    return out


@check("03b_close_libpq_pipeline_order")
def c03b():
    d = differential(t_close_lowlevel, timeout=HANG_TIMEOUT)
    expect(d[0][1][4] == [("TUPLES_OK", "20")], f"test bug: {d[0]}")


# -- 4. COPY -------------------------------------------------------------------

COPY_ROWS = [(i, f"row {i} é\t\n\\ ✓ ' \"", None if i % 7 == 0 else Decimal(i) / 4) for i in range(1, 1001)]


def t_copy_psycopg3(dsn, tag):
    t = mktable(tag, "copy3", "id int, t text, n numeric")
    out = []
    with pg3(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy(f"COPY {t} (id, t, n) FROM STDIN") as cp:
            for r in COPY_ROWS:
                cp.write_row(r)
        out.append(("copy-in", cur.rowcount, cur.statusmessage, conn.info.transaction_status.name))
        back = []
        with cur.copy(f"COPY (SELECT id, t, n FROM {t} ORDER BY id) TO STDOUT") as cp:
            cp.set_types(["int4", "text", "numeric"])
            back.extend(cp.rows())
        out.append(("copy-out-equal", back == COPY_ROWS, len(back), cur.statusmessage))
        with cur.copy(f"COPY {t} (id, t, n) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "numeric"])
            for r in COPY_ROWS[:100]:
                cp.write_row((r[0] + 5000, r[1], r[2]))
        out.append(("binary-in", cur.rowcount))
        with cur.copy(f"COPY (SELECT id, t FROM {t} WHERE id > 5000 ORDER BY id) TO STDOUT (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text"])
            out.append(("binary-out", list(cp.rows()) == [(r[0] + 5000, r[1]) for r in COPY_ROWS[:100]]))
        try:
            with cur.copy(f"COPY {t} (id) FROM STDIN") as cp:
                cp.write("1\n2\nnot-a-number\n3\n")
            out.append(("bad-data", "no error"))
        except psycopg.Error as ex:
            out.append(("bad-data", ex.sqlstate, conn.info.transaction_status.name))
        try:
            with cur.copy("COPY (SELECT 1/0) TO STDOUT") as cp:
                list(cp)
            out.append(("copy-out-error", "no error"))
        except psycopg.Error as ex:
            out.append(("copy-out-error", ex.sqlstate))
        out.append(("usable", conn.execute(f"select count(*) from {t}").fetchone()))
        conn.execute("BEGIN")
        with cur.copy(f"COPY {t} (id) FROM STDIN") as cp:
            cp.write_row((9999,))
        out.append(("in-tx", conn.execute(f"select count(*) from {t}").fetchone(),
                    conn.info.transaction_status.name))
        conn.execute("ROLLBACK")
        out.append(("rolled-back", conn.execute(f"select count(*) from {t} where id = 9999").fetchone()))
    return out


@check("04a_copy_psycopg3")
def c04a():
    d = differential(t_copy_psycopg3)
    expect(d[1][1] is True, f"test bug: {d[1]}")


def copy_out_all(c):
    chunks = []
    while True:
        n, data = c.get_copy_data()
        if n == -1:
            break
        if n == -2:
            raise CheckFailure(f"get_copy_data error: {c.get_error_message()!r}")
        chunks.append(bytes(data))
    return b"".join(chunks)


def t_copy_extended(dsn, tag):
    """COPY sent with PQexecParams: Parse/Bind/Describe/Execute/Sync, then the copy data."""
    t = mktable(tag, "copyx", "id int, t text")
    data = "".join(f"{i}\tvalue {i} é\n" for i in range(1, 501)).encode()
    out = []
    c = raw(dsn)
    try:
        r = c.exec_params(f"COPY {t} (id, t) FROM STDIN".encode(), None)
        out.append(("copy-in-start", pq.ExecStatus(r.status).name))
        for i in range(0, len(data), 1000):
            c.put_copy_data(data[i:i + 1000])
        c.put_copy_end()
        out.append(("copy-in-end", [res_desc(r) for r in c.results()]))
        out.append(("status", pq.TransactionStatus(c.transaction_status).name))
        r = c.exec_params(f"select count(*), sum(id) from {t}".encode(), None)
        out.append(("count", r.get_value(0, 0), r.get_value(0, 1)))
        r = c.exec_params(f"COPY (SELECT id, t FROM {t} ORDER BY id) TO STDOUT".encode(), None)
        out.append(("copy-out-start", pq.ExecStatus(r.status).name))
        got = copy_out_all(c)
        out.append(("copy-out-data", got == data, len(got)))
        out.append(("copy-out-end", [res_desc(r) for r in c.results()]))
        # client aborts the COPY (CopyFail)
        r = c.exec_params(f"COPY {t} (id, t) FROM STDIN".encode(), None)
        c.put_copy_data(b"7\tseven\n")
        c.put_copy_end(b"client gave up")
        out.append(("copy-fail", [res_desc(r) for r in c.results()]))
        # bad data detected by the server
        r = c.exec_params(f"COPY {t} (id, t) FROM STDIN".encode(), None)
        c.put_copy_data(b"8\teight\nnot-a-number\tx\n")
        c.put_copy_end()
        out.append(("copy-bad", [res_desc(r) for r in c.results()]))
        out.append(("status", pq.TransactionStatus(c.transaction_status).name))
        for i in range(20):
            r = c.exec_params(b"select $1::int", [str(i).encode()])
            if r.get_value(0, 0) != str(i).encode():
                out.append(("out-of-step", i, res_desc(r)))
        r = c.exec_params(f"select count(*) from {t}".encode(), None)
        out.append(("final-count", r.get_value(0, 0)))
        # inside an explicit transaction
        c.exec_(b"BEGIN")
        c.exec_params(f"COPY {t} (id, t) FROM STDIN".encode(), None)
        c.put_copy_data(b"9\tnine\n")
        c.put_copy_end()
        out.append(("tx-copy", [res_desc(r) for r in c.results()], pq.TransactionStatus(c.transaction_status).name))
        out.append(("tx-rollback", res_desc(c.exec_(b"ROLLBACK")), pq.TransactionStatus(c.transaction_status).name))
    finally:
        c.finish()
    # others can use the pool normally afterwards
    conns = [pg3(dsn, autocommit=True) for _ in range(5)]
    try:
        out.append(("others", [[cc.execute("select %s::int", (i,)).fetchone()[0] for i in range(5)]
                               for cc in conns]))
    finally:
        for cc in conns:
            cc.close()
    return out


@check("04b_copy_extended_protocol_libpq")
def c04b():
    d = differential(t_copy_extended, timeout=HANG_TIMEOUT)
    expect(d[0] == ("copy-in-start", "COPY_IN"), f"test bug: {d[0]}")


async def t_copy_asyncpg(dsn, tag):
    t = mktable(tag, "copya", "id int, t text, n numeric")
    out = []
    conn = await apg(dsn)
    try:
        res = await conn.copy_records_to_table(t, records=COPY_ROWS, columns=["id", "t", "n"])
        out.append(("records", res))
        buf = io.BytesIO()
        res = await conn.copy_from_query(f"select id, t, n from {t} where id <= $1 order by id", 300,
                                         output=buf, format="csv")
        out.append(("from-query", res, buf.getvalue()))
        buf2 = io.BytesIO()
        res = await conn.copy_from_table(t, output=buf2, columns=["id", "t"], format="text")
        out.append(("from-table", res, len(buf2.getvalue())))
        res = await conn.copy_to_table(t, source=io.BytesIO(b"5001,a\n5002,b\n"), columns=["id", "t"],
                                       format="csv")
        out.append(("to-table", res))
        out.append(("bad", await aattempt(conn.copy_to_table(t, source=io.BytesIO(b"1,a\nxx,b\n"),
                                                             columns=["id", "t"], format="csv"))))
        out.append(("bad-out", await aattempt(conn.copy_from_query("select 1/0", output=io.BytesIO()))))
        async with conn.transaction():
            await conn.copy_records_to_table(t, records=[(7000, "x", None)], columns=["id", "t", "n"])
            out.append(("in-tx", await conn.fetchval(f"select count(*) from {t}")))
        out.append(("count", await conn.fetchval(f"select count(*) from {t}")))
        rows = await conn.fetch(f"select id, t, n from {t} where id <= 1000 order by id")
        out.append(("equal", [tuple(r) for r in rows] == COPY_ROWS))
    finally:
        await conn.close()
    return out


@check("04c_copy_asyncpg")
def c04c():
    d = differential(t_copy_asyncpg, is_async=True)
    expect(d[-1] == ("equal", True), f"test bug: {d[-1]}")


def t_copy_psycopg2(dsn, tag):
    t = mktable(tag, "copy2", "id int, t text")
    out = []
    csv = "".join(f'{i},"v {i} é, ""q"""\n' for i in range(1, 301))
    conn = pg2(dsn)
    try:
        cur = conn.cursor()
        cur.copy_expert(f"COPY {t} (id, t) FROM STDIN WITH (FORMAT csv)", io.StringIO(csv))
        out.append(("in", cur.rowcount, TX2[conn.get_transaction_status()]))
        buf = io.StringIO()
        cur.copy_expert(f"COPY (SELECT id, t FROM {t} ORDER BY id) TO STDOUT WITH (FORMAT csv)", buf)
        out.append(("out", buf.getvalue() == csv, buf.getvalue()[:60]))
        try:
            cur.copy_expert(f"COPY {t} (id) FROM STDIN", io.StringIO("1\nbad\n"))
            out.append(("bad", "no error"))
        except psycopg2.Error as ex:
            out.append(("bad", ex.pgcode, TX2[conn.get_transaction_status()]))
        cur.execute("select count(*) from " + t)
        out.append(("count", cur.fetchone()))
        conn.autocommit = False
        cur.copy_from(io.StringIO("1000\tx\n1001\ty\n"), t, columns=("id", "t"))
        out.append(("tx", TX2[conn.get_transaction_status()]))
        conn.commit()
        buf = io.StringIO()
        cur.copy_to(buf, t, columns=("id",))
        out.append(("copy-to", sorted(int(x) for x in buf.getvalue().split())[-3:]))
        conn.rollback()
    finally:
        conn.close()
    return out


@check("04d_copy_psycopg2")
def c04d():
    d = differential(t_copy_psycopg2)
    expect(d[0] == ("in", 300, "IDLE"), f"test bug: {d[0]}")


# -- 5. session settings do not leak ----------------------------------------------


@check("05a_set_does_not_leak_to_other_clients")
def c05a():
    base = fresh_settings(DIRECT)
    expect(base[0] != "4321ms", "test bug: default statement_timeout is 4321ms")
    landed = 0
    for rnd in range(6):
        a = pg3(PROXY, autocommit=True)
        try:
            a.execute("SET statement_timeout = '4321ms'", prepare=bool(rnd % 2))
            pid = backend_pid(a)
            holders, seen, everyone = grab_server(PROXY, pid)
            landed += seen is not None
            try:
                for i, s in enumerate(everyone):
                    expect(s == base, f"round {rnd}: fresh client #{i} sees {s}, expected {base}"
                                      f"{' (it sits on the server A used)' if s == seen else ''}")
                # A keeps its setting, on whatever server it gets now
                for _ in range(3):
                    with a.transaction():
                        v = a.execute("show statement_timeout").fetchone()[0]
                    expect(v == "4321ms", f"round {rnd}: A lost its SET, sees {v}")
                v = a.execute("show statement_timeout").fetchone()[0]
                expect(v == "4321ms", f"round {rnd}: A lost its SET (autocommit), sees {v}")
            finally:
                release(holders)
            # fresh clients of the other drivers
            c2 = pg2(PROXY)
            try:
                cur = c2.cursor()
                cur.execute("show statement_timeout")
                v = cur.fetchone()[0]
                expect(v == base[0], f"round {rnd}: fresh psycopg2 client sees statement_timeout={v}")
            finally:
                c2.close()

            async def fresh_asyncpg():
                cs = [await apg(PROXY) for _ in range(3)]
                try:
                    return [await c.fetchval("show statement_timeout") for c in cs]
                finally:
                    for c in cs:
                        await c.close()

            vs = run_async(fresh_asyncpg)
            expect(all(v == base[0] for v in vs), f"round {rnd}: fresh asyncpg clients see {vs}")
        finally:
            a.close()
    # make sure the check really put fresh clients on the server connections A had dirtied
    expect(landed > 0, "test could not place a fresh client on the server connection that A used "
                       "(checked pg_backend_pid() of up to 12 fresh transactions per round)")


def t_set_sequence(dsn, tag):
    """Session-state changes of one client, each read back on a different server connection."""
    out = []
    a = pg3(dsn, autocommit=True)

    def show_elsewhere(label, what="statement_timeout"):
        pid = backend_pid(a)
        holders, seen, everyone = grab_server(dsn, pid)
        try:
            v = a.execute(f"show {what}").fetchone()[0]
            out.append((label, v))
        finally:
            release(holders)

    def run(label, sql, **kw):
        try:
            a.execute(sql, **kw)
            out.append((label, "ok", a.info.transaction_status.name))
        except psycopg.Error as ex:
            out.append((label, ex.sqlstate, a.info.transaction_status.name))

    try:
        show_elsewhere("default")
        run("set", "SET statement_timeout = '4321ms'")
        show_elsewhere("after-set")
        run("begin", "BEGIN")
        run("set-in-rolled-back-tx", "SET statement_timeout = '1111ms'")
        run("rollback", "ROLLBACK")
        show_elsewhere("after-rolled-back-set")
        run("begin", "BEGIN")
        run("set-local", "SET LOCAL statement_timeout = '2222ms'")
        out.append(("local-inside", a.execute("show statement_timeout").fetchone()[0]))
        run("commit", "COMMIT")
        show_elsewhere("after-set-local")
        run("begin", "BEGIN")
        run("set-in-committed-tx", "SET statement_timeout = '3333ms'")
        run("commit", "COMMIT")
        show_elsewhere("after-committed-set")
        run("begin", "BEGIN")
        run("savepoint", "SAVEPOINT s")
        run("set-in-savepoint", "SET statement_timeout = '5555ms'")
        run("rollback-to", "ROLLBACK TO SAVEPOINT s")
        out.append(("inside-after-rollback-to", a.execute("show statement_timeout").fetchone()[0]))
        run("commit", "COMMIT")
        show_elsewhere("after-savepoint-rollback")
        run("begin", "BEGIN")
        run("savepoint", "SAVEPOINT s")
        run("set-in-released-savepoint", "SET statement_timeout = '5656ms'")
        run("release", "RELEASE SAVEPOINT s")
        run("commit", "COMMIT")
        show_elsewhere("after-savepoint-release")
        run("set-in-failed-implicit-tx", "SET statement_timeout = '6666ms'; SELECT 1/0")
        show_elsewhere("after-failed-implicit-tx")
        try:
            with a.pipeline() as p:
                a.execute("SET statement_timeout = '7777ms'")
                a.execute("select 1/0")
                p.sync()
        except psycopg.Error as ex:
            out.append(("pipeline-error", ex.sqlstate))
        show_elsewhere("after-failed-pipeline")
        run("set-multi", "SET search_path = pg_catalog, public; SELECT 1")
        show_elsewhere("search_path", "search_path")
        run("set-prepared", "SET work_mem = '7MB'", prepare=True)
        show_elsewhere("work_mem", "work_mem")
        run("reset", "RESET statement_timeout")
        show_elsewhere("after-reset")
        run("set-again", "SET statement_timeout = '8888ms'")
        run("reset-all", "RESET ALL")
        show_elsewhere("after-reset-all")
        show_elsewhere("work_mem-after-reset-all", "work_mem")
        run("set-again", "SET statement_timeout = '9999ms'")
        run("discard-all", "DISCARD ALL")
        show_elsewhere("after-discard-all")
        run("set-timezone", "SET TIME ZONE 'Asia/Tokyo'")
        out.append(("tz-parameter-status", a.info.parameter_status("TimeZone")))
        show_elsewhere("timezone", "TimeZone")
        run("set-app-name", "SET application_name = 'sgdrv'")
        out.append(("app-parameter-status", a.info.parameter_status("application_name")))
        show_elsewhere("application_name", "application_name")
    finally:
        a.close()
    return out


@check("05b_session_state_follows_client_like_postgres")
def c05b():
    d = differential(t_set_sequence)
    expect(("after-set", "4321ms") in d, f"test bug: {d}")


# -- 6. auth errors ------------------------------------------------------------

AUTH_CASES = [
    ("wrong-password", dict(password="definitely-wrong"), "28P01"),
    ("unknown-database", dict(dbname="sgdrv_no_such_db"), "3D000"),
    ("unknown-user", dict(user="sgdrv_no_such_user"), "28P01"),
    ("wrong-password-and-database", dict(password="definitely-wrong", dbname="sgdrv_no_such_db"), "28P01"),
]


def libpq_error_text(ex):
    # libpq prefixes "connection to server at "host", port N failed: "; keep what the server said
    s = str(ex)
    return s.rsplit(" failed: ", 1)[-1].strip()


def t_auth(dsn, tag):
    out = []
    for label, kw, _ in AUTH_CASES:
        bad = with_params(dsn, **kw)
        try:
            pg3(bad).close()
            out.append((label, "psycopg3", "connected"))
        except psycopg.Error as ex:
            out.append((label, "psycopg3", type(ex).__name__, ex.sqlstate, libpq_error_text(ex)))
        try:
            pg2(bad).close()
            out.append((label, "psycopg2", "connected"))
        except psycopg2.Error as ex:
            out.append((label, "psycopg2", type(ex).__name__, ex.pgcode, libpq_error_text(ex)))

        async def a():
            try:
                c = await apg(bad)
                await c.close()
                return (label, "asyncpg", "connected")
            except asyncpg.PostgresError as ex:
                return (label, "asyncpg", type(ex).__name__, ex.sqlstate, ex.severity, ex.message,
                        ex.detail, ex.hint)

        out.append(run_async(a))
    return out


@check("06_auth_errors")
def c06():
    d = differential(t_auth)
    p = {(r[0], r[1]): r for r in d}
    for label, _, want in AUTH_CASES:
        expect(p[(label, "asyncpg")][3] == want, f"{label}: asyncpg SQLSTATE {p[(label, 'asyncpg')]}")
    # and on the proxy (same as direct, already compared) -- explicit for clarity:
    pr = bounded(lambda: t_auth(PROXY, "p"), STEP_TIMEOUT, "proxy")
    for r in pr:
        if r[1] == "asyncpg":
            want = dict((c[0], c[2]) for c in AUTH_CASES)[r[0]]
            expect(r[3] == want, f"proxy {r[0]}: SQLSTATE {r[3]} != {want}")


# -- 7. ParameterStatus, client_encoding ---------------------------------------

REPORTED = ["application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
            "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser", "server_encoding",
            "server_version", "session_authorization", "standard_conforming_strings", "TimeZone"]


def t_params(dsn, tag):
    out = []
    with pg3(dsn, autocommit=True) as c:
        out.append(("reported", {k: c.info.parameter_status(k) for k in REPORTED}))
        out.append(("server_version_num", c.info.server_version))
    with pg3(with_params(dsn, options="-c DateStyle=German -c IntervalStyle=iso_8601",
                         application_name="sgdrv-app"), autocommit=True) as c:
        for rnd in range(3):
            out.append(("datestyle-ps", c.info.parameter_status("DateStyle"),
                        c.info.parameter_status("IntervalStyle"), c.info.parameter_status("application_name")))
            pid = backend_pid(c)
            holders, _, _ = grab_server(dsn, pid)
            try:
                out.append(("datestyle", c.execute(
                    "select '2024-03-05'::date::text, interval '1 day 2 hours'::text, "
                    "current_setting('application_name')").fetchone()))
            finally:
                release(holders)
    return out


@check("07a_parameter_status")
def c07a():
    d = differential(t_params)
    rep = d[0][1]
    expect(rep["DateStyle"] and rep["server_version"], f"test bug: {rep}")
    with pg3(PROXY, autocommit=True) as c:
        expect(c.info.parameter_status("DateStyle") is not None, "proxy: no DateStyle ParameterStatus")
        expect(c.info.parameter_status("server_version") is not None, "proxy: no server_version")


LATIN = "Grüße café ñ ÿ © naïve"


def t_latin1(dsn, tag):
    out = []
    with pg3(with_params(dsn, client_encoding="LATIN1"), autocommit=True) as c:
        out.append(("startup", c.info.encoding, c.info.parameter_status("client_encoding"),
                    c.execute("SHOW client_encoding").fetchone()[0]))
        for rnd in range(4):
            pid = backend_pid(c)
            holders, _, _ = grab_server(dsn, pid)
            try:
                row = c.execute("select %s::text, length(%s::text), convert_to(%s::text, 'LATIN1'), "
                                "chr(233) || chr(255), current_setting('client_encoding')",
                                (LATIN, LATIN, LATIN)).fetchone()
                out.append(("roundtrip", rnd, row[0] == LATIN, row[1], bytes(row[2]) == LATIN.encode("latin1"),
                            row[3], row[4], c.info.parameter_status("client_encoding")))
                row = c.execute("select 'é' || 'ü'").fetchone()  # literal in a simple Query
                out.append(("simple", row[0]))
            finally:
                release(holders)
        out.append(("unmappable", attempt(lambda: c.execute("select chr(26085)").fetchone())))
    # SET client_encoding later in the session
    with pg3(dsn, autocommit=True) as c:
        c.execute("SET client_encoding TO 'LATIN1'")
        out.append(("set", c.info.encoding, c.info.parameter_status("client_encoding")))
        for rnd in range(3):
            pid = backend_pid(c)
            holders, _, _ = grab_server(dsn, pid)
            try:
                row = c.execute("select %s::text, current_setting('client_encoding')", (LATIN,)).fetchone()
                out.append(("set-roundtrip", rnd, row[0] == LATIN, row[1], c.info.encoding))
            finally:
                release(holders)
    # a UTF8 client afterwards
    with pg3(dsn, autocommit=True) as c:
        row = c.execute("select %s::text, current_setting('client_encoding')", ("日本語 ✓",)).fetchone()
        out.append(("utf8-after", row, c.info.encoding))
    return out


@check("07b_client_encoding_latin1")
def c07b():
    d = differential(t_latin1)
    expect(d[0] == ("startup", "iso8859-1", "LATIN1", "LATIN1"), f"test bug: {d[0]}")


# -- 8. errors inside transactions -------------------------------------------------


def t_tx_errors_psycopg3(dsn, tag):
    t = mktable(tag, "txerr3", "id int primary key")
    out = []
    with pg3(dsn) as conn:
        def step(label, fn):
            out.append((label, attempt(fn), conn.info.transaction_status.name))

        step("s1", lambda: conn.execute("select 1").fetchone())
        step("div0", lambda: conn.execute("select 1/0").fetchone())
        step("next-simple", lambda: conn.execute("select 2").fetchone())
        step("next-params", lambda: conn.execute("select %s::int", (3,)).fetchone())
        step("next-prepared", lambda: conn.execute("select %s::int + 1", (3,), prepare=True).fetchone())
        conn.rollback()
        step("after-rollback", lambda: conn.execute("select 4").fetchone())
        step("savepoint", lambda: conn.execute("SAVEPOINT a").statusmessage)
        step("insert", lambda: conn.execute(f"insert into {t} values (1)").statusmessage)
        step("dup", lambda: conn.execute(f"insert into {t} values (1)").statusmessage)
        step("aborted", lambda: conn.execute("select 5").fetchone())
        step("rollback-to", lambda: conn.execute("ROLLBACK TO SAVEPOINT a").statusmessage)
        step("after-rollback-to", lambda: conn.execute(f"select count(*) from {t}").fetchone())
        conn.commit()
        step("bad-param", lambda: conn.execute("select %s::int", ("x",)).fetchone())
        step("after-bad-param", lambda: conn.execute("select 6").fetchone())
        conn.rollback()
        step("unknown-column", lambda: conn.execute("select no_such_column").fetchone())
        step("after", lambda: conn.execute("select 7").fetchone())
        conn.rollback()
        conn.autocommit = True
        step("begin", lambda: conn.execute("BEGIN").statusmessage)
        step("err", lambda: conn.execute("select 1/0").fetchone())
        step("commit-in-failed-tx", lambda: conn.execute("COMMIT").statusmessage)
        step("after-commit", lambda: conn.execute("select 8").fetchone())
        step("autocommit-error", lambda: conn.execute("select 1/0").fetchone())
        step("after-autocommit-error", lambda: conn.execute("select 9").fetchone())
    # a fresh client is not in an aborted transaction
    with pg3(dsn) as c2:
        out.append(("fresh", c2.execute("select 10").fetchone(), c2.info.transaction_status.name))
    return out


@check("08a_tx_errors_psycopg3")
def c08a():
    d = differential(t_tx_errors_psycopg3)
    expect(d[2] == ("next-simple", ("err", "25P02"), "INERROR"), f"test bug: {d[2]}")


def t_tx_errors_psycopg2(dsn, tag):
    out = []
    conn = pg2(dsn, autocommit=False)
    try:
        cur = conn.cursor()

        def step(label, sql, params=None):
            def f():
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else cur.statusmessage
            out.append((label, attempt(f), TX2[conn.get_transaction_status()]))

        step("s1", "select 1")
        step("div0", "select 1/0")
        step("next", "select 2")
        step("next2", "select %s", (3,))
        conn.rollback()
        step("after-rollback", "select 4")
        conn.commit()
        conn.autocommit = True
        step("begin", "BEGIN")
        step("err", "select 1/0")
        step("next", "select 5")
        step("commit", "COMMIT")
        step("after", "select 6")
    finally:
        conn.close()
    return out


@check("08b_tx_errors_psycopg2")
def c08b():
    d = differential(t_tx_errors_psycopg2)
    expect(d[2][1] == ("err", "25P02"), f"test bug: {d[2]}")


async def t_tx_errors_asyncpg(dsn, tag):
    out = []
    conn = await apg(dsn)
    try:
        tr = conn.transaction()
        await tr.start()
        out.append(("s1", await aattempt(conn.fetchval("select 1"))))
        out.append(("div0", await aattempt(conn.fetchval("select 1/0"))))
        out.append(("next", await aattempt(conn.fetchval("select 2"))))
        out.append(("next-args", await aattempt(conn.fetchval("select $1::int", 3))))
        out.append(("new-stmt", await aattempt(conn.fetchval("select $1::int * 7", 3))))
        await tr.rollback()
        out.append(("after-rollback", await aattempt(conn.fetchval("select $1::int * 7", 3))))
        try:
            async with conn.transaction():
                await conn.execute("select 1")
                async with conn.transaction():  # savepoint
                    await conn.execute("select 1/0")
        except asyncpg.PostgresError as ex:
            out.append(("nested", ex.sqlstate))
        out.append(("in-tx", conn.is_in_transaction()))
        async with conn.transaction():
            try:
                async with conn.transaction():
                    await conn.execute("select 1/0")
            except asyncpg.PostgresError as ex:
                out.append(("savepoint-error", ex.sqlstate))
            out.append(("after-savepoint", await aattempt(conn.fetchval("select 8"))))
        out.append(("end", await conn.fetchval("select 9"), conn.is_in_transaction()))
    finally:
        await conn.close()
    return out


@check("08c_tx_errors_asyncpg")
def c08c():
    d = differential(t_tx_errors_asyncpg, is_async=True)
    expect(d[2] == ("next", ("err", "25P02")), f"test bug: {d[2]}")


def t_tx_errors_lowlevel(dsn, tag):
    """Parse/Describe/Bind on named statements inside a failed transaction."""
    out = []
    c = raw(dsn)
    try:
        out.append(("warm", res_desc(c.prepare(b"warm", b"select 12345"))))
        out.append(("begin", res_desc(c.exec_(b"BEGIN"))))
        # executing it here makes sure the server connection this transaction holds has the statement
        out.append(("exec-warm-in-tx", res_desc(c.exec_prepared(b"warm", None))))
        out.append(("div0", res_desc(c.exec_(b"select 1/0"))))
        out.append(("parse-known-text", res_desc(c.prepare(b"fresh", b"select 12345"))))
        out.append(("parse-new-text", res_desc(c.prepare(b"fresh2", b"select 54321 /* sgdrv */"))))
        out.append(("exec-existing", res_desc(c.exec_prepared(b"warm", None))))
        out.append(("describe-existing", res_desc(c.describe_prepared(b"warm"))))
        out.append(("rollback", res_desc(c.exec_(b"ROLLBACK")), pq.TransactionStatus(c.transaction_status).name))
        out.append(("exec-fresh", res_desc(c.exec_prepared(b"fresh", None))))
        out.append(("describe-fresh", res_desc(c.describe_prepared(b"fresh"))))
        out.append(("exec-fresh2", res_desc(c.exec_prepared(b"fresh2", None))))
        out.append(("exec-warm", res_desc(c.exec_prepared(b"warm", None))))
        out.append(("reparse-fresh", res_desc(c.prepare(b"fresh", b"select 12345"))))
        out.append(("exec-fresh-again", res_desc(c.exec_prepared(b"fresh", None))))
        out.append(("begin", res_desc(c.exec_(b"BEGIN"))))
        out.append(("parse-duplicate-in-tx", res_desc(c.prepare(b"warm", b"select 1"))))
        out.append(("next", res_desc(c.exec_(b"select 1")), pq.TransactionStatus(c.transaction_status).name))
        out.append(("rollback", res_desc(c.exec_(b"ROLLBACK")), pq.TransactionStatus(c.transaction_status).name))
    finally:
        c.finish()
    return out


@check("08d_tx_errors_prepared_libpq")
def c08d():
    d = differential(t_tx_errors_lowlevel)
    expect(d[4] == ("parse-known-text", ("FATAL_ERROR", "25P02")), f"test bug: {d[4]}")


# -- 9. asyncpg prepared statements, many transactions, concurrency --------------


async def t_asyncpg_concurrency(dsn, tag):
    async def worker(n):
        c = await apg(dsn)
        try:
            bad = []
            stmt = await c.prepare("select $1::int * 3")
            for i in range(50):
                if i % 10 == 0:
                    async with c.transaction():
                        v = await c.fetchval("select $1::int + 1", i)
                        w = await stmt.fetchval(i)
                else:
                    v = await c.fetchval("select $1::int + 1", i)
                    w = await stmt.fetchval(i)
                if v != i + 1 or w != i * 3:
                    bad.append((n, i, v, w))
            return bad
        finally:
            await c.close()

    res = await asyncio.gather(*[worker(n) for n in range(20)])
    return [b for r in res for b in r]


@check("09a_asyncpg_20_connections_x_50")
def c09a():
    for target, dsn in (("direct", DIRECT), ("proxy", PROXY)):
        bad = bounded(lambda: run_async(t_asyncpg_concurrency, dsn, target, timeout=60), 62, target)
        expect(not bad, f"{target}: wrong results {short(bad)}")


async def t_asyncpg_reuse(dsn, tag):
    out = []
    c = await apg(dsn)
    c2 = await apg(dsn, statement_cache_size=0)
    try:
        s_int = await c.prepare("select $1::int + 1")
        s_txt = await c.prepare("select $1::text || '!'")
        s_multi = await c.prepare("select g, $1::text from generate_series(1, $2::int) g")
        vals = []
        for i in range(100):
            async with c.transaction():
                vals.append((await s_int.fetchval(i), await s_txt.fetchval(str(i)),
                             len(await s_multi.fetch("x", i % 7))))
        out.append(("reuse", vals == [(i + 1, f"{i}!", i % 7) for i in range(100)]))
        out.append(("types", await c.fetchval("select $1", "text"), await c.fetchval("select $1::int8", 5)))
        out.append(("no-cache", [await c2.fetchval("select $1::int * 2", i) for i in range(20)]))
        async with c2.transaction():
            out.append(("no-cache-tx", [await c2.fetchval(f"select $1::int + {k}", 1) for k in range(5)]))
        out.append(("introspection", await c.fetchval("select $1::int4range", asyncpg.Range(1, 5))))
    finally:
        await c.close()
        await c2.close()
    return out


@check("09b_asyncpg_prepared_reuse")
def c09b():
    d = differential(t_asyncpg_reuse, is_async=True)
    expect(d[0] == ("reuse", True), f"test bug: {d[0]}")


# -- 10. NOTICE ----------------------------------------------------------------------


def t_notice_psycopg3(dsn, tag):
    got = []
    out = []
    with pg3(dsn, autocommit=True) as c:
        c.add_notice_handler(lambda d: got.append((d.severity_nonlocalized, d.sqlstate, d.message_primary)))
        c.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        out.append(("simple", list(got)))
        c.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 2; END $$", prepare=True)
        c.execute("select %s::int", (1,))
        out.append(("extended", list(got)))
        with c.transaction():
            c.execute("DO $$ BEGIN RAISE WARNING 'careful'; RAISE NOTICE 'two' USING ERRCODE = '01000'; END $$")
        with c.pipeline():
            c.execute("DO $$ BEGIN RAISE NOTICE 'piped'; END $$")
            c.execute("select %s::int", (2,))
        c.execute("SET client_min_messages = warning")
        c.execute("DO $$ BEGIN RAISE NOTICE 'hidden'; RAISE WARNING 'shown'; END $$")
        c.execute("RESET client_min_messages")
        c.execute("DO $$ BEGIN RAISE NOTICE 'visible again'; END $$")
        out.append(("all", list(got)))
    return out


@check("10a_notice_psycopg3")
def c10a():
    d = differential(t_notice_psycopg3)
    expect(d[0] == ("simple", [("NOTICE", "00000", "hello")]), f"test bug: {d[0]}")


def t_notice_psycopg2(dsn, tag):
    conn = pg2(dsn)
    try:
        cur = conn.cursor()
        cur.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        cur.execute("DO $$ BEGIN RAISE NOTICE 'second'; END $$")
        return list(conn.notices)
    finally:
        conn.close()


@check("10b_notice_psycopg2")
def c10b():
    d = differential(t_notice_psycopg2)
    expect(d == ["NOTICE:  hello\n", "NOTICE:  second\n"], f"test bug: {d}")


async def t_notice_asyncpg(dsn, tag):
    got = []
    c = await apg(dsn)
    try:
        c.add_log_listener(lambda conn, m: got.append((m.severity, m.sqlstate, m.message)))
        await c.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        await c.fetchval("select $1::int", 1)
        async with c.transaction():
            await c.execute("DO $$ BEGIN RAISE WARNING 'w'; END $$")
        await asyncio.sleep(0.1)
        return list(got)
    finally:
        await c.close()


@check("10c_notice_asyncpg")
def c10c():
    d = differential(t_notice_asyncpg, is_async=True)
    expect(d and d[0] == ("NOTICE", "00000", "hello"), f"test bug: {d}")


# -- 11. cancel ------------------------------------------------------------------------


def t_cancel_psycopg3(dsn, tag):
    out = []
    with pg3(dsn, autocommit=True) as c:
        def timed(label, sql, canceller, params=None, delay=1.0):
            timer = threading.Timer(delay, canceller)
            timer.start()
            t0 = time.monotonic()
            try:
                c.execute(sql, params)
                r = "no error"
            except psycopg.Error as ex:
                r = ex.sqlstate
            el = time.monotonic() - t0
            timer.cancel()
            out.append((label, r, "fast" if el < 5 else f"slow ({el:.1f}s)", c.info.transaction_status.name))

        timed("cancel", "select pg_sleep(10)", c.cancel)
        out.append(("usable", c.execute("select 1").fetchone()))
        c.execute("BEGIN")
        c.execute("select 1")
        timed("cancel-in-tx", "select pg_sleep(10)", c.cancel_safe)
        out.append(("aborted", attempt(lambda: c.execute("select 2").fetchone())))
        c.execute("ROLLBACK")
        out.append(("after-rollback", c.execute("select 3").fetchone()))
        c.execute("select %s::int", (1,))
        timed("cancel-extended", "select pg_sleep(%s)", c.cancel_safe, params=(10,))
        out.append(("usable2", c.execute("select %s::int", (4,)).fetchone()))
    return out


@check("11a_cancel_psycopg3")
def c11a():
    d = differential(t_cancel_psycopg3)
    expect(d[0] == ("cancel", "57014", "fast", "IDLE"), f"test bug: {d[0]}")


def t_cancel_idle(dsn, tag):
    """An idle client's cancel must not hit another client's query."""
    out = []
    with pg3(dsn, autocommit=True) as a, pg3(dsn, autocommit=True) as b:
        a.execute("select 1")  # a's server goes back to the pool, b likely gets it
        res = {}

        def run_b():
            try:
                b.execute("select pg_sleep(2)")
                res["b"] = "ok"
            except psycopg.Error as ex:
                res["b"] = ex.sqlstate

        th = threading.Thread(target=run_b)
        th.start()
        time.sleep(0.5)
        for _ in range(3):
            a.cancel()
            time.sleep(0.2)
        th.join(15)
        out.append(("other-client", res.get("b", "hang")))
        out.append(("a-usable", a.execute("select pg_sleep(0.2), 5").fetchone()[1]))
    return out


@check("11b_cancel_from_idle_client_hits_nobody")
def c11b():
    d = differential(t_cancel_idle)
    expect(d[0] == ("other-client", "ok"), f"test bug: {d[0]}")


async def t_cancel_asyncpg(dsn, tag):
    out = []
    c = await apg(dsn)
    try:
        t0 = time.monotonic()
        r = await aattempt(c.fetchval("select pg_sleep(10)", timeout=1))
        out.append(("timeout", r, time.monotonic() - t0 < 5))
        t0 = time.monotonic()
        out.append(("usable", await c.fetchval("select $1::int", 1), time.monotonic() - t0 < 5))
        tr = c.transaction()
        await tr.start()
        out.append(("in-tx-timeout", await aattempt(c.fetchval("select pg_sleep(10)", timeout=1))))
        out.append(("aborted", await aattempt(c.fetchval("select 2"))))
        await tr.rollback()
        out.append(("after", await c.fetchval("select 3")))
        task = asyncio.ensure_future(c.fetchval("select pg_sleep(10)"))
        await asyncio.sleep(0.5)
        task.cancel()
        t0 = time.monotonic()
        try:
            await task
        except asyncio.CancelledError:
            pass
        out.append(("task-cancel", await c.fetchval("select 4"), time.monotonic() - t0 < 5))
    finally:
        await c.close()
    return out


@check("11c_cancel_asyncpg")
def c11c():
    d = differential(t_cancel_asyncpg, is_async=True)
    expect(d[0] == ("timeout", ("err", "TimeoutError"), True), f"test bug: {d[0]}")


# -- extra: prepared statements after a schema change ---------------------------------


def t_ddl_psycopg3(dsn, tag):
    t = mktable(tag, "ddl3", "a int")
    out = []
    with pg3(DIRECT, autocommit=True) as d:
        d.execute(f"insert into {t} values (1)")
    q = f"select * from {t} where a = %s"
    with pg3(dsn, autocommit=True) as c1:
        c1.execute("BEGIN")
        pid = c1.execute("select pg_backend_pid()").fetchone()[0]
        out.append(("before", c1.execute(q, (1,), prepare=True).fetchall()))
        c1.execute("COMMIT")
        with pg3(DIRECT, autocommit=True) as ddl:
            ddl.execute(f"alter table {t} add column b int default 7")
        # a client that never prepared this text, on the server connection c1 used
        holders, seen, _ = grab_server(dsn, pid)
        try:
            if seen is not None:
                c2 = holders[-1]
            else:
                c2 = pg3(dsn, autocommit=True)
                holders.append(c2)
                c2.execute("BEGIN")
            out.append(("fresh-client", attempt(lambda: c2.execute(q, (1,), prepare=True).fetchall())))
        finally:
            release(holders)
        with pg3(dsn, autocommit=True) as c3:
            out.append(("fresh-client-2", attempt(lambda: c3.execute(q, (1,), prepare=True).fetchall())))
        out.append(("old-client", attempt(lambda: c1.execute(q, (1,), prepare=True).fetchall())))
    return out


@check("12a_prepare_after_schema_change_psycopg3")
def c12a():
    d = differential(t_ddl_psycopg3)
    expect(d[1] == ("fresh-client", ("ok", [(1, 7)])), f"test bug: {d[1]}")


async def records(coro):
    return [tuple(r) for r in await coro]


async def t_ddl_asyncpg(dsn, tag):
    t = mktable(tag, "ddla", "a int")
    out = []
    q = f"select * from {t}"
    c1 = await apg(dsn)
    try:
        await c1.execute(f"insert into {t} values (1)")
        out.append(("before", [tuple(r) for r in await c1.fetch(q)]))
        ddl = await apg(dsn)
        await ddl.execute(f"alter table {t} add column b int default 7")
        await ddl.close()
        # asyncpg re-prepares by itself on "cached plan must not change result type"
        out.append(("same-client", await aattempt(records(c1.fetch(q)))))
        c2 = await apg(dsn)
        out.append(("fresh-client", await aattempt(records(c2.fetch(q)))))
        await c2.close()
    finally:
        await c1.close()
    return out


@check("12b_prepare_after_schema_change_asyncpg")
def c12b():
    d = differential(t_ddl_asyncpg, is_async=True)
    expect(d[1] == ("same-client", ("ok", [(1, 7)])), f"test bug: {d[1]}")


# -- extra: prepared statements and search_path -----------------------------------------

_SCHEMAS = []


def t_search_path(dsn, tag):
    """The same query text prepared by clients with different search_paths."""
    table = f"sgdrv_{os.getpid()}_sp"
    schemas = [f"sgdrv_{os.getpid()}_{tag}_{x}" for x in ("a", "b")]
    with pg3(DIRECT, autocommit=True) as d:
        for sch, val in zip(schemas, ("a", "b")):
            d.execute(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
            d.execute(f"CREATE SCHEMA {sch}")
            d.execute(f"CREATE TABLE {sch}.{table} (v text)")
            d.execute(f"INSERT INTO {sch}.{table} VALUES ('{val}')")
            _SCHEMAS.append(sch)
        # tenant b's table has one more column: `select *` has a different result type there
        d.execute(f"ALTER TABLE {schemas[1]}.{table} ADD COLUMN extra int DEFAULT 42")
    q = f"select v, right(current_schemas(false)::text, 3) from {table} where v <> %s"
    star = f"select * from {table} where v <> %s"
    out = []

    def client(sch):
        return pg3(with_params(dsn, options=f"-c search_path={sch}"), autocommit=True)

    with client(schemas[0]) as a:
        a.execute("BEGIN")
        pid = a.execute("select pg_backend_pid()").fetchone()[0]
        out.append(("a", a.execute(q, ("x",), prepare=True).fetchall()))
        out.append(("a-star", a.execute(star, ("x",), prepare=True).fetchall()))
        a.execute("COMMIT")
        # client b (other search_path) on the server connection a used
        holders, seen, _ = grab_server(dsn, pid, connect=lambda: client(schemas[1]))
        try:
            if seen is not None:
                b = holders[-1]
            else:
                b = client(schemas[1])
                holders.append(b)
                b.execute("BEGIN")
            out.append(("b-prepared", attempt(lambda: b.execute(q, ("x",), prepare=True).fetchall())))
            out.append(("b-unprepared", attempt(lambda: b.execute(q, ("x",)).fetchall())))
            out.append(("b-star-prepared", attempt(lambda: b.execute(star, ("x",), prepare=True).fetchall())))
        finally:
            release(holders)
        with client(schemas[1]) as b2:
            b2.execute("SET search_path = " + schemas[1])
            out.append(("b2-set", attempt(lambda: b2.execute(q, ("x",), prepare=True).fetchall())))
            out.append(("b2-star", attempt(lambda: b2.execute(star, ("x",), prepare=True).fetchall())))
        out.append(("a-again", a.execute(q, ("x",), prepare=True).fetchall()))
        out.append(("a-star-again", attempt(lambda: a.execute(star, ("x",), prepare=True).fetchall())))
    return out


@check("13_prepared_statement_uses_clients_search_path")
def c13():
    try:
        d = differential(t_search_path)
    finally:
        with pg3(DIRECT, autocommit=True) as c:
            for sch in _SCHEMAS:
                c.execute(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
    expect(d[0][1][0][0] == "a", f"test bug: {d[0]}")


@check("14_shardgate_settings_from_every_driver")
def c14():
    """SET/SHOW/RESET shardgate.* are answered by the proxy through the
    extended protocol (psycopg 3, asyncpg) and the simple one (psycopg2)."""
    with pg3(PROXY, autocommit=True) as c:
        expect(c.execute("show shardgate.target").fetchone() == ("auto",), "psycopg 3: default target")
        c.execute("set shardgate.target = primary")
        expect(c.execute("show shardgate.target").fetchone() == ("primary",), "psycopg 3: set")
        c.execute("reset shardgate.target")
        expect(c.execute("show shardgate.target").fetchone() == ("auto",), "psycopg 3: reset")
        lsn = c.execute("show shardgate.last_commit_lsn").fetchone()[0]
        expect("/" in lsn, f"psycopg 3: lsn {lsn!r}")
        got = attempt(lambda: c.execute("set shardgate.target = sideways"))
        expect(got == ("err", "22023"), f"psycopg 3: bad value gave {got!r}")
    c = pg2(PROXY)
    try:
        cur = c.cursor()
        cur.execute("set shardgate.min_lsn = '0/1'")
        cur.execute("show shardgate.min_lsn")
        expect(cur.fetchone() == ("0/1",), "psycopg2: min_lsn")
    finally:
        c.close()

    async def apg():
        conn = await asyncpg.connect(**apg_kwargs(PROXY))
        try:
            await conn.execute("set shardgate.target = replica")
            got = await conn.fetchval("show shardgate.target")
            expect(got == "replica", f"asyncpg: {got!r}")
        finally:
            await conn.close()

    run_async(apg)


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------

VERBOSE = False
DUMP = False


def run_check(name, fn, timeout):
    box = {}

    def target():
        try:
            fn()
            box["ok"] = True
        except BaseException as ex:  # noqa: BLE001
            box["error"] = ex
            box["tb"] = traceback.format_exc()

    th = threading.Thread(target=target, daemon=True, name=name)
    th.start()
    th.join(timeout)
    if th.is_alive():
        return f"no result within {timeout}s (hang)"
    if "error" in box:
        if VERBOSE:
            sys.stderr.write(f"--- {name} ---\n{box['tb']}\n")
        return fmt_exc(box["error"])
    return None


def main():
    global DIRECT, PROXY, VERBOSE, DUMP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn-proxy", required=True)
    ap.add_argument("--dsn-direct", required=True)
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures to stderr")
    ap.add_argument("--dump", action="store_true", help="print both transcripts of differential checks to stderr")
    ap.add_argument("--check-timeout", type=float, default=180)
    args = ap.parse_args()
    DIRECT, PROXY, VERBOSE, DUMP = args.dsn_direct, args.dsn_proxy, args.verbose, args.dump

    passed = failed = 0
    try:
        for name, fn in CHECKS:
            if args.only and not any(s in name for s in args.only):
                continue
            err = run_check(name, fn, args.check_timeout)
            if err is None:
                passed += 1
                print(f"ok {name}", flush=True)
            else:
                failed += 1
                print(f"FAIL {name}: {err}", flush=True)
    finally:
        drop_tables()
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # threads stuck in a hung driver call must not keep the process alive
    os._exit(0 if failed == 0 and passed > 0 else 1)


if __name__ == "__main__":
    main()
