"""Where the CPU of a push goes: the bare framer loop and the engine, by category.

Against the nginx sink of the other benches (``return 200``, 1000 streams, pinned to core 1;
the client on core 0, 2 connections), one fan-out through (a) the bare framer loop of
``bench/throughput.py``'s ``floor`` worker (one ``Connection`` per socket, a fixed request,
no engine) and (b) the engine (``Client.fan_out``), and the client's CPU per push split into
TLS, socket I/O, kernel, HTTP/2 framing, HPACK decoding, trio scheduling, result building,
dispatch, request preparation, JWT and the rest.

Method (bench/README.md, "Where the CPU goes"):

1. CPU time, wall clock: N pushes (20,000; ``--quick`` 5,000) per client, interleaved
   rounds, user and system CPU from getrusage. Noisy on a shared machine: only the totals
   come from here.
2. Instruction counts, deterministic: the same workers under ``valgrind --tool=callgrind``
   at ``--cg-n`` pushes and half as many, collection switched on by a client request once
   the connections are up; the difference divided by the extra pushes is the marginal
   instructions per push (start-up, handshakes and the first burst cancel).
3. Attribution, deterministic: a PEP 523 frame-evaluation hook (a small C module compiled
   here with the machine's cc) sends every Python frame through one of 8,192 distinct C
   trampolines, one per (callee function, caller function, depth); callgrind's inclusive
   count of each trampoline, minus those of the trampolines nested in it, is the exclusive
   instruction count of every Python function, C calls included (ssl, struct, msgspec, ...).
   The hook stops CPython inlining Python-to-Python calls, which costs instructions per call:
   calibrated here on micro-loops and subtracted per call (kind: inlinable call, call from C,
   generator resume); the residual against the unhooked total is reported.
4. Functions map to categories by module and name (``category()``); µs per push are
   instructions times the floor's ns per instruction (its user CPU over its instructions),
   for both clients, so engine − floor is a difference of instructions; the engine's CPU
   time beyond that is its own row (noise; slower instructions: ``--cache-sim=yes`` counts
   simulated cache misses). The system CPU per push is the kernel row.
5. Ideas: each change in ``ABLATIONS`` monkeypatched into the workers and measured the
   same way (every push must still be delivered).

The code measured is a ``git archive`` of a commit (``--tree``, default HEAD; ``.`` for the
working tree as it is), so that edits going on in the working tree cannot change it under
the runs; ``--compare REF`` measures an earlier commit too and reports it beside.

    python bench/breakdown.py                                   # HEAD, ~7 min
    python bench/breakdown.py --tree eb78b7c --compare 01574bc  # two commits, ~12 min
    python bench/breakdown.py --quick    # 5,000 pushes x 2 rounds; callgrind at 4,000/2,000
    python bench/breakdown.py --render   # rewrite the .md from the .json

Writes bench/results/breakdown.json and .md. Every push goes to 127.0.0.1; every run is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAYLOAD,
    RESULTS,
    ROOT,
    TOPIC,
    machine,
    now,
    pin,
    sink_session,
    start_sink,
    table_head,
    write_results,
)

CONNECTIONS = 2
WORKER_TIMEOUT = 300
CG_TIMEOUT = 1800
CLIENTS = ("floor", "engine")

# ----------------------------------------------------------------------------- categories

CATEGORIES: list[tuple[str, str]] = [
    ("tls", "TLS: ssl.MemoryBIO/SSLObject read, write (encrypt, decrypt), tls.py"),
    ("socket", "socket I/O, user space: trio's socket wrappers, send/recv calls"),
    ("kernel", "kernel: system CPU (send, recv, epoll_wait), measured"),
    ("h2", "HTTP/2 framing and stream state: framer.py, connection.py"),
    ("hpack", "HPACK decoding of responses: hpack.Decoder or fanout's hpackdec"),
    ("sched", "trio scheduling: run loop, checkpoints, wakeups, Events, locks"),
    ("results", "result building: Result, classification, delivery to the caller"),
    ("dispatch", "engine dispatch: feed, window, pool, limiter, Push"),
    ("prepare", "request preparation: PushTemplate.for_token"),
    ("jwt", "JWT: TokenAuth.header"),
    ("driver", "the benchmark's own loop: floor callbacks, consumer, counters"),
    ("other", "other Python: stdlib helpers (enum, abc, ...)"),
    ("beyond", "CPU time beyond the instructions at the floor's ns/instruction (noise, stalls)"),
]
CATEGORY_NAMES = [c for c, _ in CATEGORIES]

# client.py functions that belong to dispatch; the rest of client.py builds and delivers
# results (on_response, _finish, _close, _topic_done, _header, _Batch.deliver, _stream)
_DISPATCH = {"Client._feed", "Client._feed_one", "Client._admit", "Client._dispatch",
             "Client._schedule", "Client._retry", "Client._retry_loop", "Client._convert",
             "Client.fan_out", "Push.__init__", "_Batch.__init__"}


def category(filename: str, qualname: str) -> str:
    """The category of a Python function, by its module (file) and qualified name."""
    f = filename.replace("\\", "/")
    if f.endswith("fanout/_engine/tls.py") or f.endswith("/ssl.py"):
        return "tls"
    if f.endswith("trio/_highlevel_socket.py") or f.endswith("trio/_socket.py") \
            or f.endswith("/socket.py"):
        return "socket"
    if f.endswith("fanout/_engine/framer.py") or f.endswith("fanout/_engine/connection.py"):
        return "h2"
    if "/hpack/" in f or f.endswith("fanout/_engine/hpackdec.py") \
            or qualname.startswith("_QuietDebug."):
        return "hpack"  # _QuietDebug: hpack's logger, muted by connection.py
    if "/trio/" in f or "/site-packages/outcome/" in f or "/sniffio/" in f \
            or (f.startswith("<attrs generated") and "trio" in f):
        return "sched"
    if f.endswith("fanout/auth.py"):
        return "jwt"
    if f.endswith("fanout/payload.py"):
        return "prepare"
    if f.endswith("fanout/_engine/pool.py") or f.endswith("fanout/_limiter.py") \
            or f.endswith("fanout/_flow.py"):
        return "dispatch"
    if f.endswith("fanout/client.py"):
        return "dispatch" if qualname in _DISPATCH else "results"
    if f.endswith(("fanout/outcome.py", "fanout/events.py", "fanout/metrics.py")):
        return "results"
    if f.endswith("bench/breakdown.py"):
        return "driver"
    return "other"


# ----------------------------------------------------------------------------- the hook

HOOK_SLOTS = 8192
HOOK_MAXID = 2048

_HOOK_HEAD = r"""
#define PY_SSIZE_T_CLEAN
#define Py_BUILD_CORE
#include <Python.h>
#include "opcode.h"
#include "internal/pycore_frame.h"
#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#endif
#endif
#ifndef CALLGRIND_START_INSTRUMENTATION
#define CALLGRIND_ZERO_STATS
#define CALLGRIND_START_INSTRUMENTATION
#define CALLGRIND_STOP_INSTRUMENTATION
#define CALLGRIND_TOGGLE_COLLECT
#define RUNNING_ON_VALGRIND 0
#endif
typedef PyObject *(*evalfn)(PyThreadState *, struct _PyInterpreterFrame *, int);
#define NSLOTS @SLOTS@
#define MAXID @MAXID@
#define MAXDEPTH 4
"""

_HOOK_BODY = r"""
/* every Python frame passes here (PEP 523); a frame of another function than the caller's
   runs inside the trampoline of its (callee, caller, depth): callgrind's inclusive count of
   that trampoline is the callee's cost there, nested trampolines included */
/* co_extra's layout (Objects/codeobject.c, not in the headers); checked at install */
typedef struct { Py_ssize_t ce_size; void *ce_extras[1]; } fo_code_extra;
static int direct_extra = 0;
static Py_ssize_t extra_index = -1;
static PyObject *classify_cb = NULL;
static int cur_id = 0;        /* one thread runs Python in the measured window */
static int in_classify = 0;
static unsigned short slot_of[MAXDEPTH][MAXID][MAXID];
static int slot_callee[NSLOTS], slot_parent[NSLOTS], slot_depth[NSLOTS], active[NSLOTS];
static int nslots = 0;
static char dunder[MAXID];
static long long overflow = 0, evals[MAXID][3];  /* kinds: inlinable call, call from C, resume */

static intptr_t classify(PyCodeObject *co) {
    in_classify = 1;
    PyObject *r = PyObject_CallOneArg(classify_cb, (PyObject *)co);
    in_classify = 0;
    intptr_t id = 0;
    if (r == NULL) {
        PyErr_Clear();
    } else {
        id = PyLong_AsLong(r);
        Py_DECREF(r);
        if (id < 0 || id >= MAXID) { PyErr_Clear(); id = 0; }
    }
    if (id > 0) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(co->co_name);
        dunder[id] = n > 4 && PyUnicode_READ_CHAR(co->co_name, 0) == '_'
            && PyUnicode_READ_CHAR(co->co_name, 1) == '_'
            && PyUnicode_READ_CHAR(co->co_name, n - 1) == '_';
    }
    _PyCode_SetExtra((PyObject *)co, extra_index, (void *)(id + 1));
    return id;
}

static PyObject *fo_hook(PyThreadState *ts, struct _PyInterpreterFrame *f, int exc) {
    if (in_classify) return _PyEval_EvalFrameDefault(ts, f, exc);
    PyCodeObject *co = f->f_code;
    intptr_t id;
    void *extra = NULL;
    if (direct_extra) {
        fo_code_extra *ex = (fo_code_extra *)co->co_extra;
        if (ex != NULL && extra_index < ex->ce_size)
            extra = ex->ce_extras[extra_index];
    } else {
        _PyCode_GetExtra((PyObject *)co, extra_index, &extra);
    }
    id = extra != NULL ? (intptr_t)extra - 1 : classify(co);
    int kind = 1;
    if (f->owner == FRAME_OWNED_BY_GENERATOR) {
        kind = 2;
    } else {
        struct _PyInterpreterFrame *caller = ts->cframe->current_frame;
        if (caller != NULL && caller->prev_instr != NULL && !dunder[id]) {
            int op = _Py_OPCODE(*caller->prev_instr);
            if (op == CALL || op == CALL_ADAPTIVE || op == CALL_PY_EXACT_ARGS
                    || op == CALL_PY_WITH_DEFAULTS)
                kind = 0;
        }
    }
    evals[id][kind]++;
    if (id == 0 || id == cur_id) return _PyEval_EvalFrameDefault(ts, f, exc);
    int parent = cur_id, s = -1;
    for (int d = 0; d < MAXDEPTH; d++) {
        int v = slot_of[d][id][parent];
        if (v == 0) {
            if (nslots >= NSLOTS) break;
            s = nslots++;
            slot_of[d][id][parent] = (unsigned short)(s + 1);
            slot_callee[s] = (int)id; slot_parent[s] = parent; slot_depth[s] = d;
            break;
        }
        if (!active[v - 1]) { s = v - 1; break; }
    }
    if (s < 0) { overflow++; return _PyEval_EvalFrameDefault(ts, f, exc); }
    active[s]++;
    cur_id = (int)id;
    PyObject *r = TRAMPS[s](ts, f, exc);
    cur_id = parent;
    active[s]--;
    return r;
}

static PyObject *install(PyObject *self, PyObject *args) {
    PyObject *cb, *probe;
    if (!PyArg_ParseTuple(args, "OO", &cb, &probe)) return NULL;
    if (extra_index < 0) extra_index = _PyEval_RequestCodeExtraIndex(NULL);
    if (extra_index < 0) return NULL;
    if (!PyCode_Check(probe)) { PyErr_SetString(PyExc_TypeError, "install(classify, code)"); return NULL; }
    void *want = (void *)0x5a5a, *got = NULL;
    if (_PyCode_SetExtra(probe, extra_index, want) < 0) return NULL;
    fo_code_extra *ex = (fo_code_extra *)((PyCodeObject *)probe)->co_extra;
    if (ex != NULL && extra_index < ex->ce_size) got = ex->ce_extras[extra_index];
    direct_extra = got == want;
    _PyCode_SetExtra(probe, extra_index, NULL);
    Py_INCREF(cb);
    Py_XSETREF(classify_cb, cb);
    _PyInterpreterState_SetEvalFrameFunc(PyInterpreterState_Get(), fo_hook);
    Py_RETURN_NONE;
}

static PyObject *uninstall(PyObject *self, PyObject *unused) {
    _PyInterpreterState_SetEvalFrameFunc(PyInterpreterState_Get(), _PyEval_EvalFrameDefault);
    Py_RETURN_NONE;
}

static PyObject *stats(PyObject *self, PyObject *unused) {
    PyObject *slots = PyList_New(nslots);
    for (int s = 0; s < nslots; s++)
        PyList_SET_ITEM(slots, s, Py_BuildValue("(iii)", slot_callee[s], slot_parent[s],
                                                slot_depth[s]));
    PyObject *ev = PyList_New(MAXID);
    for (int i = 0; i < MAXID; i++)
        PyList_SET_ITEM(ev, i, Py_BuildValue("(LLL)", evals[i][0], evals[i][1], evals[i][2]));
    return Py_BuildValue("{sNsNsLsi}", "slots", slots, "evals", ev, "overflow", overflow,
                         "direct_extra", direct_extra);
}

static PyObject *cg_start(PyObject *self, PyObject *unused) {
    CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT;
    Py_RETURN_NONE;
}
static PyObject *cg_stop(PyObject *self, PyObject *unused) {
    CALLGRIND_TOGGLE_COLLECT; CALLGRIND_STOP_INSTRUMENTATION;
    Py_RETURN_NONE;
}
static PyObject *on_valgrind(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(RUNNING_ON_VALGRIND);
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS, "install(classify, code): every frame through the hook"},
    {"uninstall", uninstall, METH_NOARGS, "back to the default frame evaluation"},
    {"stats", stats, METH_NOARGS, "slots (callee, caller, depth), evals per id and kind"},
    {"cg_start", cg_start, METH_NOARGS, "callgrind: zero, instrument, collect"},
    {"cg_stop", cg_stop, METH_NOARGS, "callgrind: stop collecting"},
    {"on_valgrind", on_valgrind, METH_NOARGS, "running under valgrind?"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_fo_evalhook", NULL, -1, methods};
PyMODINIT_FUNC PyInit__fo_evalhook(void) { return PyModule_Create(&mod); }
"""


def hook_source() -> str:
    # noinline + an empty asm after the call: each trampoline stays a real frame of its own
    # (no tail call, no identical-code folding: -fno-optimize-sibling-calls -fno-ipa-icf)
    tramps = "\n".join(
        f"__attribute__((noinline, noclone, used)) PyObject *fo_t{i:05d}(PyThreadState *t, "
        f"struct _PyInterpreterFrame *f, int e) {{ PyObject *r = _PyEval_EvalFrameDefault(t, "
        f"f, e); __asm__ volatile(\"\" ::: \"memory\"); return r; }}" for i in range(HOOK_SLOTS))
    table = "static evalfn TRAMPS[NSLOTS] = {" + ",".join(
        f"fo_t{i:05d}" for i in range(HOOK_SLOTS)) + "};"
    head = _HOOK_HEAD.replace("@SLOTS@", str(HOOK_SLOTS)).replace("@MAXID@", str(HOOK_MAXID))
    return head + tramps + "\n" + table + "\n" + _HOOK_BODY


def build_hook() -> Path:
    """Compile the hook module once (cached by source and Python version); its directory."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("the frame hook is written against CPython 3.11's frame layout")
    src = hook_source()
    tag = hashlib.sha1((src + sys.version).encode()).hexdigest()[:12]
    d = Path(tempfile.gettempdir()) / f"fanout-breakdown-hook-{tag}"
    so = d / ("_fo_evalhook" + sysconfig.get_config_var("EXT_SUFFIX"))
    if so.exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    c = d / "_fo_evalhook.c"
    c.write_text(src)
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    tmp = so.with_suffix(".tmp")
    cmd = [shutil.which(cc) or "cc", "-O2", "-shared", "-fPIC", "-fno-optimize-sibling-calls",
           "-fno-ipa-icf", "-I", sysconfig.get_paths()["include"], str(c), "-o", str(tmp)]
    print("compiling the frame hook:", " ".join(cmd[:6]), "...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    tmp.rename(so)
    return d


def load_hook() -> Any:
    d = os.environ.get("FANOUT_BREAKDOWN_HOOK")
    if not d:
        raise SystemExit("FANOUT_BREAKDOWN_HOOK not set")
    sys.path.insert(0, d)
    import _fo_evalhook  # type: ignore[import-not-found]

    return _fo_evalhook


class Classifier:
    """Ids for code objects, keyed by (file, qualified name, first line): the same function
    has the same key in every run."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str, int]] = [("<root>", "<root>", 0)]
        self.ids: dict[tuple[str, str, int], int] = {}

    def __call__(self, co: Any) -> int:
        key = (co.co_filename, co.co_qualname, co.co_firstlineno)
        i = self.ids.get(key)
        if i is None:
            if len(self.keys) >= HOOK_MAXID:
                return 0
            i = self.ids[key] = len(self.keys)
            self.keys.append(key)
        return i


# ----------------------------------------------------------------------------- workers

class Window:
    """The measured part of a worker: CPU from getrusage, and under callgrind the collection
    (and the frame hook, mode ``hook``) switched on and off around it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.hook = load_hook() if mode in ("plain", "hook") else None
        self.classifier = Classifier()

    def start(self) -> None:
        if self.hook is not None:
            if self.mode == "hook":
                self.hook.install(self.classifier, (lambda: None).__code__)
            self.hook.cg_start()
        self.t0 = time.perf_counter()
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> dict[str, Any]:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        seconds = time.perf_counter() - self.t0
        if self.hook is not None:
            self.hook.cg_stop()
            if self.mode == "hook":
                self.hook.uninstall()
        return {"seconds": seconds, "user": r1.ru_utime - self.r0.ru_utime,
                "sys": r1.ru_stime - self.r0.ru_stime}

    def hook_stats(self) -> dict[str, Any] | None:
        if self.hook is None or self.mode != "hook":
            return None
        st = self.hook.stats()
        n = len(self.classifier.keys)
        return {"keys": self.classifier.keys, "slots": st["slots"], "evals": st["evals"][:n],
                "overflow": st["overflow"], "direct_extra": st["direct_extra"]}


def count_io(io: dict[str, int]) -> None:
    """Count TLS reads (receive) and writes (flush_chunks): pushes per read and per write
    say which regime a run was in (batching changes with the client's speed)."""
    from fanout._engine import tls

    recv, flush = tls.TLSStream.receive, tls.TLSStream.flush_chunks

    async def receive(self: Any) -> bytes:
        data = await recv(self)
        io["reads"] += 1
        io["read_bytes"] += len(data)
        return data

    async def flush_chunks(self: Any, chunk: int, progress: Any) -> None:
        io["writes"] += 1
        io["write_bytes"] += self._out.pending
        await flush(self, chunk, progress)

    tls.TLSStream.receive = receive  # type: ignore[method-assign]
    tls.TLSStream.flush_chunks = flush_chunks  # type: ignore[method-assign]


def slow_timeouts(args: argparse.Namespace) -> dict[str, float]:
    """Under valgrind the client runs ~50x slower: an answer can wait in the socket longer
    than the 10 s stream deadline (or a PING answer longer than 5 s) on a loaded machine.
    Only the reaper's and the watchdog's wake-ups depend on these."""
    return {} if args.mode == "native" else {"timeout": 600.0, "ping_timeout": 300.0}


def worker_floor(args: argparse.Namespace, window: Window, io: dict[str, int]) -> dict:
    """The bare framer loop, as bench/throughput.py's worker_floor: one Connection per socket,
    a fixed request, no engine."""
    import ssl

    import trio

    from fanout._engine.connection import Connection, Exchange
    from fanout.auth import TokenAuth
    from fanout.payload import PushTemplate

    auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
    template = PushTemplate(PAYLOAD, topic=TOPIC)
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["h2"])
    state: dict[str, Any] = {"left": args.n, "ok": 0, "done": None}

    class Loop:
        def fill(self, conn: Connection) -> None:
            while state["left"] > 0 and conn.capacity > 0:
                state["left"] -= 1
                conn.start(Exchange(template.for_token(f"{state['left']:064x}")))

        def on_response(self, conn: Any, job: Any, status: int, headers: Any, body: Any) -> None:
            state["ok"] += status == 200
            if state["ok"] == args.n:
                state["done"].set()

        def on_capacity(self, conn: Any) -> None:
            if state["done"] is not None:
                self.fill(conn)

        def on_unprocessed(self, conn: Any, job: Any, why: str) -> None:
            raise RuntimeError(why)

        on_lost = on_unprocessed

        def on_timeout(self, conn: Any, job: Any) -> None:
            raise RuntimeError("timeout")

        def on_retired(self, conn: Any, why: str) -> None: ...

        def on_closed(self, conn: Any) -> None: ...

    async def main() -> dict:
        loop = Loop()
        async with trio.open_nursery() as nursery:
            conns = []
            for i in range(CONNECTIONS):
                conn = Connection("127.0.0.1", args.port, ctx, loop, loop, auth=auth, index=i,
                                  **slow_timeouts(args))
                await nursery.start(conn.run)
                conns.append(conn)
            state["done"] = trio.Event()
            io.update(dict.fromkeys(io, 0))
            window.start()
            for conn in conns:
                loop.fill(conn)
            await state["done"].wait()
            out = window.stop()
            out["ok"] = state["ok"]
            for conn in conns:
                conn.retire("done")
        return out

    return trio.run(main)


def worker_engine(args: argparse.Namespace, window: Window, io: dict[str, int]) -> dict:
    """The engine, as bench/throughput.py's worker_fanout: Client.fan_out over N tokens."""
    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client
    from fanout.payload import Notification

    async def main() -> dict:
        auth = TokenAuth.from_file(args.key, args.key_id, args.team_id)
        tokens = [f"{i:064x}" for i in range(args.n)]
        async with Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=args.port,
                          ca_file=args.ca, connections=CONNECTIONS,
                          **slow_timeouts(args)) as client:
            await client.send(Notification(token="00" * 32, payload=PAYLOAD, topic=TOPIC))
            ok = 0
            io.update(dict.fromkeys(io, 0))
            window.start()
            async for r in client.fan_out(PAYLOAD, tokens):
                ok += r.outcome == "delivered"
            out = window.stop()
            out["ok"] = ok
            return out

    return trio.run(main)


WORKERS = {"floor": worker_floor, "engine": worker_engine}


def run_worker(args: argparse.Namespace) -> dict:
    for name in args.ablate or []:
        ABLATIONS[name][1]()
    io = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0}
    count_io(io)
    window = Window(args.mode)
    out = WORKERS[args.worker](args, window, io)
    out["io"] = dict(io)
    stats = window.hook_stats()
    if stats is not None:
        Path(args.stats).write_text(json.dumps(stats))
    return out


# ----------------------------------------------------------------------------- calibration

def _leaf(x: int) -> int:
    return x * 2 + 1


class _Prop:
    @property
    def prop(self) -> int:
        return 3


def _gen() -> Any:
    while True:
        yield 1


def _loop_call(n: int) -> int:
    s = 0
    for i in range(n):
        s += _leaf(i)
    return s


def _loop_prop(n: int) -> int:
    s, p = 0, _Prop()
    for _ in range(n):
        s += p.prop
    return s


def _loop_gen(n: int) -> int:
    s, g = 0, _gen()
    for _ in range(n):
        s += next(g)
    return s


CALIBRATION = {"call": _loop_call, "prop": _loop_prop, "gen": _loop_gen}

# nginx's answer to every push (a table size update to 0 opens the first block): :status
# 200, then server, date, content-type, content-length as Huffman-coded literals with
# incremental indexing
NGINX_BLOCK = bytes.fromhex("887689aa6355e580ae212e1f6196c361be94034a5f29141004e2817ee34f5c"
                            "6c0a62d1bf5f87497ca58ae819aa5c0130")


def hpack_blocks(shape: str, n: int) -> list[bytes]:
    """``n`` response header blocks: nginx's, or an APNs-like 200 (:status from the static
    table, then apns-id, a fresh upper-case UUID each, as a literal without indexing: its
    name and value Huffman-coded, or the value raw)."""
    if shape == "nginx":
        return [b"\x20" + NGINX_BLOCK] + [NGINX_BLOCK] * (n - 1)
    import uuid

    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    huff = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode
    from fanout._engine.framer import encode_int

    name = huff(b"apns-id")
    head = b"\x88\x00" + encode_int(len(name), 7, 0x80) + name
    out = []
    for i in range(n):
        value = str(uuid.UUID(int=i * 7919 + 12345)).upper().encode()
        if shape == "apns-huffman":
            v = huff(value)
            out.append(head + encode_int(len(v), 7, 0x80) + v)
        else:
            out.append(head + encode_int(len(value), 7, 0) + value)
    return out


HPACK_SHAPES = ("nginx", "apns-huffman", "apns-raw")


def run_hpack_shape(args: argparse.Namespace) -> dict:
    """Decode ``n`` blocks of one shape with one decoder (as a connection does): hpack's, or
    the engine's own (fanout._engine.hpackdec, where the code has it)."""
    import functools

    import hpack

    from fanout._engine import connection  # mutes hpack's debug logging

    blocks = hpack_blocks(args.hpack, args.n)
    if args.decoder == "engine":
        from fanout._engine.hpackdec import ResponseDecoder  # type: ignore[import-not-found]

        decode = ResponseDecoder(connection.MAX_HEADER_BLOCK).decode
    else:
        decode = functools.partial(
            hpack.Decoder(max_header_list_size=connection.MAX_HEADER_BLOCK).decode, raw=True)
    window = Window("plain")
    window.start()
    for block in blocks:
        decode(block)
    window.stop()
    return {}


def run_calibration(args: argparse.Namespace) -> dict:
    """One micro-loop (a Python call, a property called from C, a generator resume) under the
    hook or not: the instructions the hook adds per frame of each kind."""
    fn = CALIBRATION[args.calib]
    fn(100)
    window = Window(args.mode)
    window.start()
    fn(args.n)
    window.stop()
    stats = window.hook_stats()
    if stats is not None:
        Path(args.stats).write_text(json.dumps(stats))
    return {}


# ----------------------------------------------------------------------------- ablations

def _ablate_hpack_cache() -> None:
    """memoise hpack's Huffman decoder on the encoded bytes (nginx re-sends the same
    server/date/content-type literals in every response)."""
    import hpack.hpack as hp

    orig = hp.decode_huffman
    memo: dict[bytes, bytes] = {}

    def decode_huffman(data: bytes) -> bytes:
        key = bytes(data)
        out = memo.get(key)
        if out is None:
            if len(memo) > 256:
                memo.clear()
            out = memo[key] = orig(key)
        return out

    hp.decode_huffman = decode_huffman


def _ablate_block_cache() -> None:
    """a cache keyed on the whole response header block: a block seen before, made
    of static-table indexes and literals only, gives the same headers and the same table
    insertions (replayed into the decoder's table, which stays in step with the server)."""
    import hpack

    from fanout._engine import connection as conn_mod

    orig = hpack.Decoder.decode
    memo: dict[bytes, tuple[list, list]] = {}

    def decode(self: Any, data: bytes, raw: bool = False) -> Any:
        hit = memo.get(data)
        if hit is not None:
            headers, inserts = hit
            add = self.header_table.add
            for name, value in inserts:
                add(name, value)
            return headers
        headers = orig(self, data, raw=raw)
        fields = _block_inserts(data) if raw else None
        if fields is not None and len(headers) == fields[0]:
            if len(memo) > 64:
                memo.clear()
            memo[bytes(data)] = (headers, [(headers[i][0], headers[i][1]) for i in fields[1]])
        return headers

    conn_mod.hpack.Decoder.decode = decode  # type: ignore[method-assign]


def _block_inserts(block: bytes) -> tuple[int, list[int]] | None:
    """If an HPACK block refers to no dynamic-table entry and resizes nothing (its meaning
    does not depend on the table's state): its number of fields and the positions of those
    inserted into the table (literals with incremental indexing); else None."""
    i, n, fields, inserts = 0, len(block), 0, []

    def integer(prefix: int) -> int:
        nonlocal i
        limit = (1 << prefix) - 1
        v = block[i] & limit
        i += 1
        if v < limit:
            return v
        shift = 0
        while True:
            b = block[i]
            i += 1
            v += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v

    def skip_string() -> None:
        nonlocal i
        length = integer(7)
        i += length

    while i < n:
        b = block[i]
        if b & 0x80:                      # indexed field
            if integer(7) > 61:
                return None
        elif b & 0xE0 == 0x20:            # dynamic table size update
            return None
        else:                             # a literal: with incremental indexing or not
            indexing = b & 0xC0 == 0x40
            if integer(6 if indexing else 4) > 61:
                return None
            if not b & (0x3F if indexing else 0x0F):
                skip_string()             # a literal name
            skip_string()
            if indexing:
                inserts.append(fields)
        fields += 1
    return (fields, inserts) if i == n else None


def _ablate_start() -> None:
    """Connection.start's common case (token auth, a topic, no apns-id, expiration,
    collapse id, extra headers or stamp; the body fits the windows) with the :path prefix
    per path length cached and the frame headers packed inline (no encode_int, encode_str,
    literal_never_indexed, frame_header calls)."""
    import trio

    from fanout._engine import connection as cm
    from fanout._engine import framer as fr

    orig = cm.Connection.start
    pack = fr._HDR.pack
    path_prefix: dict[int, bytes] = {}
    post_https = fr.METHOD_POST + fr.SCHEME_HTTPS

    def start(self: Any, job: Any) -> None:
        p = job.prepared
        auth = self._auth
        topic = p.topic
        body = p.body
        n = len(body)
        if auth is None or topic is None or p.apns_id is not None or p.expiration is not None \
                or p.collapse_id is not None or p.extra or p.stamp is not None or not n \
                or self._blocked or n > self._send_window or n > self._initial_window \
                or n > self._max_frame_out:
            return orig(self, job)
        sid = self._next_sid
        self._next_sid = sid + 2
        job.auth_generation = auth.generation
        lead, rest = self._encoder.constant((
            b":authority", self._authority, b"authorization", auth.header(), b"apns-topic",
            topic, b"apns-push-type", p.push_type, b"apns-priority", p.priority))
        path = p.path
        pre = path_prefix.get(len(path))
        if pre is None:
            pre = path_prefix[len(path)] = post_https + fr.encode_int(4, 4, 0x10) \
                + fr.encode_int(len(path), 7, 0)
        block = lead + pre + path + rest
        if len(block) > self._max_frame_out:
            self._next_sid = sid
            return orig(self, job)
        job.sid = sid
        job.conn = self
        job.sent_at = trio.current_time()
        job.status = 0
        job.resp_headers = cm._NO_HEADERS
        job.resp_body = None
        self.streams[sid] = job
        self.streams_started += 1
        if self._next_sid > fr.MAX_STREAM_ID - cm.ID_MARGIN:
            self.retire("stream ids exhausted")
        self._send_window -= n
        job.window = self._initial_window - n
        job.body_off = n
        k = len(block)
        self._send(pack(k >> 16, k & 0xFFFF, fr.HEADERS, fr.END_HEADERS, sid) + block
                   + pack(n >> 16, n & 0xFFFF, fr.DATA, fr.END_STREAM, sid) + body)

    cm.Connection.start = start  # type: ignore[method-assign]


def _ablate_read() -> None:
    """frames parsed in the read loop itself, a HEADERS frame without padding or
    priority (every APNs answer) handed straight to _on_headers, and a connection-level
    WINDOW_UPDATE (nginx sends one for every DATA frame) applied inline: no list of frame
    tuples, no star-call into _handle, no strip_padding, no parse_u32."""
    import trio

    from fanout._engine import connection as cm
    from fanout._engine import framer as fr
    from fanout.errors import ProtocolError, TransportError

    async def _read_loop(self: Any) -> None:
        tls = self._tls
        reader = self._reader
        handle = self._handle
        on_headers = self._on_headers
        unpack = fr._HDR.unpack_from
        buf = reader.buf
        headers_type, mask, plain = fr.HEADERS, fr.PADDED | fr.PRIORITY_FLAG | fr.END_HEADERS, \
            fr.END_HEADERS
        window_update, u32 = fr.WINDOW_UPDATE, fr._U32.unpack_from
        while True:
            data = await tls.receive()
            if not data:
                if self.retiring and not self.streams:
                    self._finished.set()
                    return
                raise TransportError("connection closed by the server")
            self.last_recv = trio.current_time()
            buf += data
            pos, end, limit = 0, len(buf), reader.max_frame_size
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                length = (hi << 16) | lo
                if length > limit:
                    raise ProtocolError(f"frame of {length} bytes exceeds "
                                        f"SETTINGS_MAX_FRAME_SIZE {limit}")
                stop = pos + 9 + length
                if stop > end:
                    break
                sid &= fr.MAX_STREAM_ID
                if ftype == headers_type and flags & mask == plain and sid \
                        and not self._cont_sid:
                    on_headers(sid, flags, bytes(buf[pos + 9:stop]))
                elif ftype == window_update and not sid and length == 4 and not self._cont_sid:
                    inc = u32(buf, pos + 9)[0] & fr.MAX_STREAM_ID
                    if inc == 0:
                        raise ProtocolError("WINDOW_UPDATE with zero increment")
                    self._send_window += inc
                    if self._send_window > fr.MAX_WINDOW:
                        raise ProtocolError("connection flow-control window over 2**31-1")
                    if self._blocked:
                        self._pump_blocked()
                else:
                    handle(ftype, flags, sid, bytes(buf[pos + 9:stop]))
                pos = stop
            if pos:
                del buf[:pos]

    cm.Connection._read_loop = _read_loop  # type: ignore[method-assign]


def _ablate_h2_both() -> None:
    """h2-start and h2-read together."""
    _ablate_start()
    _ablate_read()


def _ablate_tls_read() -> None:
    """TLSStream.receive asks SSLObject.read for 16 KiB + 256 (a record's plaintext at
    most) instead of 256 KiB: _ssl allocates a bytes object of the size asked for at every
    read and then shrinks it."""
    import ssl

    from fanout._engine import tls as tm
    from fanout.errors import TransportError

    size = 16 * 1024 + 256

    async def receive(self: Any) -> bytes:
        while True:
            data = await self._recv_raw()
            if not data:
                return b""
            self._in.write(data)
            chunks = []
            try:
                while True:
                    chunks.append(self._obj.read(size))
                    if not chunks[-1]:
                        break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                if any(chunks):
                    return b"".join(chunks)
                return b""
            except ssl.SSLError as exc:
                raise TransportError(f"TLS error: {exc.reason or exc}") from None
            if self._out.pending:
                await self.flush()
            out = b"".join(chunks)
            if out:
                return out

    tm.TLSStream.receive = receive  # type: ignore[method-assign]


def _ablate_prepare() -> None:
    """PushTemplate.for_token without keyword-argument construction (a bare
    Prepared filled by slot stores) and a lowercase-hex token checked by one regex match
    (anything else goes through the full _check_token)."""
    import re as re_mod

    from fanout import payload as pm

    check = pm._check_token
    lower_hex = re_mod.compile(r"[0-9a-f]+").fullmatch
    new = object.__new__
    prepared_cls = pm.Prepared
    device = pm._DEVICE_PATH
    cap = pm.MAX_TOKEN_LENGTH

    def for_token(self: Any, token: str, id: Any = None) -> Any:
        if type(token) is str and not len(token) & 1 and len(token) <= cap \
                and lower_hex(token) is not None:
            tok = token
        else:
            tok = check(token)
        p = new(prepared_cls)
        p.token = tok
        p.path = device + tok.encode()
        p.body = self.body
        p.push_type = self._push_type_b
        p.topic = self.topic
        p.priority = self.priority
        p.limit = self.limit
        p.expiration = self.expiration
        p.collapse_id = self.collapse_id
        p.apns_id = self.apns_id
        p.id = id
        p.stamp = p.extra = p.channel_id = p.environment = None
        return p

    pm.PushTemplate.for_token = for_token  # type: ignore[method-assign]


def _ablate_results() -> None:
    """the engine's 200 path: apns-id (or apns-request-id) found in one pass over
    the headers instead of two calls to _header, and Push.__init__ without super()."""
    import trio

    from fanout import client as cm
    from fanout.outcome import Outcome

    orig = cm.Client.on_response
    delivered = Outcome.DELIVERED

    def on_response(self: Any, conn: Any, push: Any, status: int, headers: Any,
                    body: bytes) -> None:
        if status != 200:
            return orig(self, conn, push, status, headers, body)
        latency = trio.current_time() - push.sent_at
        topic = push.prepared.topic
        guard = self._guards.get(topic)
        if guard is None:
            guard = self._guards[topic] = cm._TopicGuard()
        if guard.run or not guard.confirmed:
            guard.confirmed = True
            guard.run = 0
            if guard.held:
                self._release(guard)
        apns_id = request_id = None
        for name, value in headers:
            if name == b"apns-id":
                apns_id = value
                break
            if name == b"apns-request-id" and request_id is None:
                request_id = value
        self._finish(push, delivered, status=200, apns_id=apns_id or request_id,
                     latency=latency)

    def push_init(self: Any, prepared: Any, sink: Any) -> None:
        self.prepared = prepared
        self.sid = 0
        self.conn = None
        self.auth_generation = 0
        self.avoid = None
        self.id = prepared.id
        self.attempts = 0
        self.resends = 0
        self.sink = sink
        self.maybe = False
        self.resent = False
        self.abandoned = False

    cm.Client.on_response = on_response  # type: ignore[method-assign]
    cm.Push.__init__ = push_init  # type: ignore[method-assign]


# name: (what, the change, the clients it applies to)
ABLATIONS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "hpack-block-cache": ("cache decoded header blocks keyed on their bytes (blocks that use no "
                          "dynamic entry; their table insertions replayed)", _ablate_block_cache,
                          CLIENTS),
    "hpack-huffman-memo": ("memoise hpack's Huffman decoding on the encoded bytes",
                           _ablate_hpack_cache, CLIENTS),
    "h2-start": ("Connection.start: common case inlined, :path prefix cached", _ablate_start,
                 CLIENTS),
    "h2-read": ("frames parsed in _read_loop, HEADERS straight to _on_headers", _ablate_read,
                CLIENTS),
    "h2-both": ("h2-start and h2-read together", _ablate_h2_both, CLIENTS),
    "tls-read": ("TLSStream.receive: SSLObject.read of 16 KiB, not 256 KiB", _ablate_tls_read,
                 CLIENTS),
    "prepare": ("for_token: slot stores instead of keyword construction, one regex check",
                _ablate_prepare, CLIENTS),
    "engine-200": ("on_response: one pass for apns-id; Push.__init__ without super()",
                   _ablate_results, ("engine",)),
}


# ----------------------------------------------------------------------------- callgrind files

_NAME = re.compile(r"\((\d+)\)(?: (.*))?$")


def parse_callgrind(path: Path) -> dict[str, Any]:
    """Self instructions per (object, file, function), inclusive instructions of each hook
    trampoline, and the total (one event, Ir; line positions)."""
    tables: dict[str, dict[str, str]] = {"ob": {}, "fl": {}, "fn": {}}
    kinds = {"ob": "ob", "cob": "ob", "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl",
             "cfl": "fl", "fn": "fn", "cfn": "fn"}

    def name(kind: str, val: str) -> str:
        m = _NAME.match(val)
        if not m:
            return val
        tbl = tables[kinds[kind]]
        if m.group(2) is not None:
            tbl[m.group(1)] = m.group(2)
        return tbl.get(m.group(1), "?")

    self_cost: dict[tuple[str, str, str], int] = defaultdict(int)
    tramp: dict[str, int] = defaultdict(int)
    total = 0
    ob = fl = fi = fn = ""
    after_calls = False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if after_calls:
                    after_calls = False
                    if fn.startswith("fo_t"):
                        tramp[fn] += cost
                else:
                    total += cost
                    self_cost[(ob, fi or fl, fn)] += cost
                    if fn.startswith("fo_t"):
                        tramp[fn] += cost
                continue
            if not c or c == "#" or c == "\n":
                continue
            key, _, val = line.rstrip("\n").partition("=")
            if key not in kinds and key != "calls":
                continue
            if key == "calls":
                after_calls = True
            elif key == "ob":
                ob = name(key, val)
            elif key == "fl":
                fl, fi = name(key, val), ""
            elif key in ("fi", "fe"):
                fi = name(key, val)
                if fi == fl:
                    fi = ""
            elif key == "fn":
                fn, fi = name(key, val), ""
            else:
                name(key, val)
    return {"total": total, "self": self_cost, "tramp": tramp}


def exclusive(cg: dict[str, Any], stats: dict[str, Any]) -> dict[tuple, dict[str, float]]:
    """Per function (file, qualname, line): exclusive instructions, and evals per kind."""
    keys = [tuple(k) for k in stats["keys"]]
    excl = [0] * len(keys)
    excl[0] = cg["total"]
    for s, (callee, parent, _depth) in enumerate(stats["slots"]):
        incl = cg["tramp"].get(f"fo_t{s:05d}", 0)
        excl[callee] += incl
        excl[parent] -= incl
    out: dict[tuple, dict[str, float]] = {}
    for i, key in enumerate(keys):
        ev = stats["evals"][i] if i < len(stats["evals"]) else (0, 0, 0)
        row = out.setdefault(key, {"ir": 0, "inl": 0, "c": 0, "res": 0})
        row["ir"] += excl[i]
        row["inl"] += ev[0]
        row["c"] += ev[1]
        row["res"] += ev[2]
    return out


def c_group(ob: str, fl: str, fn: str) -> str:
    """The machine-code group of a self cost: which library, and within libpython what."""
    o = os.path.basename(ob)
    if "libssl" in o or "libcrypto" in o:
        return "OpenSSL (libssl, libcrypto): the cipher, record layer"
    if o.startswith("_ssl."):
        return "_ssl module (Python's glue to OpenSSL)"
    if o.startswith(("_socket.", "select.")):
        return "_socket, select modules (syscall stubs' callers)"
    if o.startswith("libc.") or o.startswith("libc-"):
        return "libc (memcpy, syscall stubs, malloc)"
    if "libpython" in o or o.startswith("python"):
        f = fl.replace("\\", "/")
        if f.endswith("Python/ceval.c"):
            return "interpreter: bytecode loop (ceval.c)"
        if f.endswith("Objects/obmalloc.c") or fn.endswith("_dealloc") or "Dealloc" in fn:
            return "interpreter: allocation, deallocation"
        if f.endswith(("Objects/dictobject.c", "Objects/typeobject.c", "Objects/object.c",
                       "Objects/descrobject.c")):
            return "interpreter: attribute and dict lookups"
        if f.endswith(("Objects/call.c", "Python/frame.c", "Objects/funcobject.c",
                       "Objects/frameobject.c", "Objects/genobject.c",
                       "Objects/methodobject.c", "Objects/classobject.c")):
            return "interpreter: calls, frames, generators"
        if f.endswith("Modules/gcmodule.c"):
            return "interpreter: garbage collector"
        return "interpreter: objects (int, bytes, str, tuple, list, ...)"
    if "msgspec" in o:
        return "msgspec (Result structs)"
    if o.startswith("_struct."):
        return "_struct (frame headers)"
    return "other native code"


# ----------------------------------------------------------------------------- parent

# what the workers run: a snapshot of fanout at a commit (other work may be going on in the
# working tree: the code measured must not change under the runs), or the working tree
TREE: dict[str, Any] = {"root": ROOT, "script": Path(__file__).resolve()}


def prepare_tree(ref: str) -> dict[str, Any]:
    """``git archive`` of ``ref``'s fanout/ and bench/common.py into a temporary directory,
    with this script beside them: the workers import that fanout (it comes first on sys.path,
    before the editable install's finder). ``ref`` "." measures the working tree as it is."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                              check=True).stdout.strip()

    if ref == ".":
        return {"root": ROOT, "script": Path(__file__).resolve(), "ref": "working tree",
                "commit": git("rev-parse", "HEAD"), "dirty": bool(git("diff", "--stat", "HEAD",
                                                                      "--", "fanout"))}
    import io
    import tarfile

    commit = git("rev-parse", ref)
    d = Path(tempfile.mkdtemp(prefix="fanout-breakdown-tree-"))
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "fanout",
                          "bench/common.py"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(d, filter="data")
    shutil.copy(Path(__file__).resolve(), d / "bench" / "breakdown.py")
    return {"root": d, "script": d / "bench" / "breakdown.py", "ref": ref, "commit": commit,
            "dirty": False, "temporary": True}


def _worker_cmd(args: argparse.Namespace, client: str, mode: str, n: int, port: int, pki: Any,
                key: Any, stats: Path | None = None, ablate: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, str(TREE["script"]), "--worker", client, "--mode", mode, "--n", str(n),
           "--port", str(port), "--ca", str(pki.ca_file), "--key", str(key.path),
           "--key-id", key.key_id, "--team-id", key.team_id]
    if stats is not None:
        cmd += ["--stats", str(stats)]
    for a in ablate or []:
        cmd += ["--ablate", a]
    return cmd


def _run_json(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         cwd=TREE["root"], env=env)
    if out.returncode != 0:
        err = [line for line in out.stderr.splitlines() if line and not line.startswith("==")]
        raise SystemExit(f"worker failed: {' | '.join(err[-4:]) or 'exit ' + str(out.returncode)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def callgrind(args: argparse.Namespace, work: Path, label: str, inner: list[str],
              hook_dir: Path, extra: list[str] | None = None) -> tuple[dict, Path]:
    """Run ``inner`` (a worker command) under callgrind, pinned to core 0."""
    out = work / f"cg.{label}.out"
    cmd = pin(0) + ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--collect-atstart=no", f"--callgrind-out-file={out}", *(extra or [])] + inner
    env = dict(os.environ, FANOUT_BREAKDOWN_HOOK=str(hook_dir))
    t0 = time.monotonic()
    res = _run_json(cmd, CG_TIMEOUT, env)
    if "ok" in res and res["ok"] != int(inner[inner.index("--n") + 1]):
        raise SystemExit(f"{label}: only {res['ok']} pushes delivered")
    print(f"  callgrind {label}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return res, out


_CALIBRATED: dict[str, float] = {}


def calibrate(args: argparse.Namespace, work: Path, hook_dir: Path) -> dict[str, float]:
    """Instructions the hook adds per frame: inlinable call, call from C, generator resume
    (once per invocation: the same hook and interpreter for every tree)."""
    if _CALIBRATED:
        return dict(_CALIBRATED)
    n = 20_000
    per: dict[str, float] = {}
    for which in CALIBRATION:
        ir = {}
        for mode in ("plain", "hook"):
            for k in (n, 2 * n):
                label = f"calib-{which}-{mode}-{k}"
                stats = work / f"{label}.json"
                inner = [sys.executable, str(TREE["script"]), "--calib", which, "--mode", mode,
                         "--n", str(k), "--stats", str(stats)]
                _, out = callgrind(args, work, label, inner, hook_dir)
                ir[(mode, k)] = parse_callgrind(out)["total"]
        per[which] = ((ir[("hook", 2 * n)] - ir[("hook", n)])
                      - (ir[("plain", 2 * n)] - ir[("plain", n)])) / n
    # the property and generator loops add one frame of their kind per iteration
    _CALIBRATED.update({"inl": per["call"], "c": per["prop"], "res": per["gen"]})
    return dict(_CALIBRATED)


def cache_totals(path: Path) -> dict[str, int]:
    """The event totals of a callgrind file (with --cache-sim: Ir Dr Dw I1mr D1mr ...)."""
    events: list[str] = []
    totals: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("totals:"):
                totals = [int(x) for x in line.split()[1:]]
    return dict(zip(events, totals, strict=False))


def cache_sim(args: argparse.Namespace, work: Path, hook_dir: Path, port: int, pki: Any,
              key: Any, n_big: int, n_small: int) -> dict[str, dict[str, float]]:
    """Simulated cache misses per push (callgrind --cache-sim=yes: valgrind's model of this
    CPU's L1 and last-level caches), marginal like the instructions."""
    out = {}
    for client in CLIENTS:
        t = {}
        for n in (n_big, n_small):
            _, path = callgrind(args, work, f"{client}-cache-{n}",
                                _worker_cmd(args, client, "plain", n, port, pki, key), hook_dir,
                                ["--cache-sim=yes"])
            t[n] = cache_totals(path)
        d = {k: (t[n_big].get(k, 0) - t[n_small].get(k, 0)) / (n_big - n_small)
             for k in t[n_big]}
        out[client] = {"I1_misses": round(d.get("I1mr", 0), 1),
                       "D1_misses": round(d.get("D1mr", 0) + d.get("D1mw", 0), 1),
                       "LL_misses": round(d.get("ILmr", 0) + d.get("DLmr", 0)
                                          + d.get("DLmw", 0), 1),
                       "data_refs": round(d.get("Dr", 0) + d.get("Dw", 0), 1)}
    return out


def has_hpackdec() -> bool:
    return (Path(TREE["root"]) / "fanout" / "_engine" / "hpackdec.py").exists()


#: ideas the engine took up at 9f91819: measured only on trees from before (on a later one
#: their sketches would replace the engine's own code with an older copy of it)
ADOPTED = ("h2-start", "h2-read", "h2-both", "prepare", "engine-200")


def has_adopted() -> bool:
    conn = Path(TREE["root"]) / "fanout" / "_engine" / "connection.py"
    return conn.exists() and "_PATH_PREFIX" in conn.read_text()


def hpack_shapes(args: argparse.Namespace, work: Path, hook_dir: Path) -> dict[str, float]:
    """Instructions per response header block decoded, by decoder and shape."""
    n = 2_000
    out = {}
    for decoder in ("hpack", "engine") if has_hpackdec() else ("hpack",):
        for shape in HPACK_SHAPES:
            ir = {}
            for k in (n, 2 * n):
                label = f"hpack-{decoder}-{shape}-{k}"
                _, path = callgrind(args, work, label, [
                    sys.executable, str(TREE["script"]), "--hpack", shape, "--decoder", decoder,
                    "--n", str(k)], hook_dir)
                ir[k] = parse_callgrind(path)["total"]
            out[f"{decoder}:{shape}"] = round((ir[2 * n] - ir[n]) / n, 1)
    return out


NATIVE_IDEAS = ("hpack-block-cache", "hpack-huffman-memo")  # big enough to see in CPU time


def native_rounds(args: argparse.Namespace, port: int, pki: Any, key: Any,
                  ideas: list[str]) -> dict[str, list]:
    """Interleaved rounds of CPU time: each client as it is, then with each idea in
    ``ideas`` applied (``client+idea``)."""
    variants = [(c, None) for c in CLIENTS] + [(c, i) for i in ideas for c in CLIENTS]
    runs: dict[str, list] = {c if i is None else f"{c}+{i}": [] for c, i in variants}
    for rnd in range(args.rounds):
        for client, idea in variants:
            name = client if idea is None else f"{client}+{idea}"
            res = _run_json(pin(0) + _worker_cmd(args, client, "native", args.n, port, pki, key,
                                                 ablate=[idea] if idea else None),
                            WORKER_TIMEOUT)
            if res["ok"] != args.n:
                raise SystemExit(f"{name}: only {res['ok']} of {args.n} pushes delivered")
            runs[name].append(res)
            print(f"round {rnd + 1} {name:26s} {args.n / res['seconds']:8.0f} pushes/s "
                  f"user {res['user'] / args.n * 1e6:5.1f} sys {res['sys'] / args.n * 1e6:5.1f} "
                  f"us/push  ok={res['ok']}  pushes/read "
                  f"{args.n / max(1, res['io']['reads']):.1f} /write "
                  f"{args.n / max(1, res['io']['writes']):.1f}", file=sys.stderr, flush=True)
    return runs


def marginal(big: float, small: float, extra: int) -> float:
    return (big - small) / extra


def analyse_client(client: str, cg: dict[str, dict], n_big: int, n_small: int,
                   calib: dict[str, float]) -> dict[str, Any]:
    """Marginal instructions per push: total (unhooked), per function and category
    (hooked, corrected for the hook), per machine-code group (unhooked)."""
    extra = n_big - n_small
    plain_b, plain_s = cg[f"{client}-plain-{n_big}"], cg[f"{client}-plain-{n_small}"]
    hook_b, hook_s = cg[f"{client}-hook-{n_big}"], cg[f"{client}-hook-{n_small}"]
    total = marginal(plain_b["parsed"]["total"], plain_s["parsed"]["total"], extra)
    hooked_total = marginal(hook_b["parsed"]["total"], hook_s["parsed"]["total"], extra)

    fb = exclusive(hook_b["parsed"], hook_b["stats"])
    fs = exclusive(hook_s["parsed"], hook_s["stats"])
    funcs = []
    for key in set(fb) | set(fs):
        b = fb.get(key, {"ir": 0, "inl": 0, "c": 0, "res": 0})
        s = fs.get(key, {"ir": 0, "inl": 0, "c": 0, "res": 0})
        row = {k: marginal(b[k], s[k], extra) for k in ("ir", "inl", "c", "res")}
        overhead = row["inl"] * calib["inl"] + row["c"] * calib["c"] + row["res"] * calib["res"]
        row["corrected"] = row["ir"] - overhead
        if key[0] == "<root>":
            cat = "sched"  # trio.run's own loop: the frame the hook was installed under
        else:
            cat = category(key[0], key[1])
        funcs.append({"file": key[0], "qualname": key[1], "line": key[2], "category": cat,
                      **{k: round(v, 2) for k, v in row.items()}})
    corrected_sum = sum(f["corrected"] for f in funcs)
    scale = total / corrected_sum if corrected_sum else 1.0
    cats = dict.fromkeys((c for c in CATEGORY_NAMES if c not in ("kernel", "beyond")), 0.0)
    for f in funcs:
        f["ir_per_push"] = round(f["corrected"] * scale, 1)
        cats[f["category"]] += f["corrected"] * scale
    funcs.sort(key=lambda f: -f["ir_per_push"])

    groups: dict[str, float] = defaultdict(float)
    for (ob, fl, fn), v in plain_b["parsed"]["self"].items():
        groups[c_group(ob, fl, fn)] += v
    for (ob, fl, fn), v in plain_s["parsed"]["self"].items():
        groups[c_group(ob, fl, fn)] -= v
    machine_code = {g: round(v / extra, 1) for g, v in sorted(groups.items(), key=lambda x: -x[1])}
    io_b, io_s = plain_b["result"]["io"], plain_s["result"]["io"]
    return {
        "instructions_per_push": round(total, 1),
        "hooked_instructions_per_push": round(hooked_total, 1),
        "hook_model_residual": round(corrected_sum / total - 1, 4) if total else None,
        "categories_ir": {k: round(v, 1) for k, v in cats.items()},
        "functions": funcs[:80],
        "machine_code_ir": machine_code,
        "overflow": hook_b["stats"]["overflow"],
        "cg_pushes_per_read": round(extra / max(1, io_b["reads"] - io_s["reads"]), 1),
        "cg_pushes_per_write": round(extra / max(1, io_b["writes"] - io_s["writes"]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="pushes per native run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cg-n", type=int, default=6_000,
                    help="pushes per callgrind run (and half as many)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ablations", default=",".join(ABLATIONS),
                    help="ideas to measure under callgrind (comma-separated; '' for none)")
    ap.add_argument("--keep", help="keep the callgrind files in this directory")
    ap.add_argument("--tree", default="HEAD",
                    help="measure fanout as committed at this ref (default HEAD), '.' for the "
                         "working tree as it is")
    ap.add_argument("--compare", help="also measure this ref (an earlier commit), reported "
                                      "beside")
    ap.add_argument("--name", default="breakdown")
    ap.add_argument("--render", action="store_true",
                    help="rewrite the .md from the existing results .json only")
    # worker side
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--calib", choices=list(CALIBRATION))
    ap.add_argument("--hpack", choices=HPACK_SHAPES)
    ap.add_argument("--decoder", choices=["hpack", "engine"], default="hpack")
    ap.add_argument("--mode", choices=["native", "plain", "hook"], default="native")
    ap.add_argument("--ablate", action="append")
    ap.add_argument("--stats")
    ap.add_argument("--port", type=int)
    ap.add_argument("--ca")
    ap.add_argument("--key")
    ap.add_argument("--key-id")
    ap.add_argument("--team-id")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.calib:
        print(json.dumps(run_calibration(args)))
        return
    if args.hpack:
        print(json.dumps(run_hpack_shape(args)))
        return
    if args.render:
        report = json.loads((RESULTS / f"{args.name}.json").read_text())
        lines = render(report)
        write_results(args.name, report, lines)
        print("\n".join(lines))
        return
    if args.quick:
        args.n, args.rounds, args.cg_n = 5_000, 2, 4_000
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind not installed (apt-get install valgrind)")
    hook_dir = build_hook()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fanout-breakdown-"))
    work.mkdir(parents=True, exist_ok=True)
    ablations = [a for a in args.ablations.split(",") if a]
    started = time.monotonic()
    reports = {}
    try:
        for label, ref in [("now", args.tree)] + ([("before", args.compare)] if args.compare
                                                  else []):
            TREE.clear()
            TREE.update(prepare_tree(ref))
            # the hpack ideas patch hpack's Decoder: only where the engine still uses it
            # (the earlier commit: those only, the rest is measured on the code as it is now)
            todo = [a for a in ablations if not (a.startswith("hpack-") and has_hpackdec())
                    and not (a in ADOPTED and has_adopted())
                    and (label == "now" or a.startswith("hpack-"))]
            print(f"== {label}: fanout at {TREE['commit'][:7]} ({ref}); ideas: "
                  f"{', '.join(todo) or 'none'}", file=sys.stderr, flush=True)
            (work / label).mkdir(parents=True, exist_ok=True)
            try:
                rep = measure(args, work / label, hook_dir, todo, repeat_check=label == "now")
            finally:
                if TREE.get("temporary"):
                    shutil.rmtree(TREE["root"], ignore_errors=True)
            rep["code"] = {"ref": TREE["ref"], "commit": TREE["commit"],
                           "working_tree_dirty": TREE["dirty"]}
            reports[label] = rep
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = reports["now"]
    if "before" in reports:
        report["before"] = reports["before"]
    report["elapsed_s"] = round(time.monotonic() - started)
    lines = render(report)
    md = write_results(args.name, report, lines)
    print("\n".join(lines))
    print(f"\nwrote {md} and {md.with_suffix('.json')}", file=sys.stderr)


def measure(args: argparse.Namespace, work: Path, hook_dir: Path, ablations: list[str],
            repeat_check: bool = True) -> dict[str, Any]:
    print("calibrating the hook's cost per frame ...", file=sys.stderr, flush=True)
    calib = calibrate(args, work, hook_dir)
    print(f"  per frame: inlinable call {calib['inl']:.0f}, call from C {calib['c']:.0f}, "
          f"resume {calib['res']:.0f} instructions", file=sys.stderr, flush=True)
    shapes = hpack_shapes(args, work, hook_dir)
    print(f"  HPACK per block: {shapes}", file=sys.stderr, flush=True)
    n_big, n_small = args.cg_n, args.cg_n // 2
    with sink_session("fanout-breakdown-", lambda d, p, k: start_sink("nginx", d, p, k)) \
            as (_tmp, pki, key, port, _sink):
        native = native_rounds(args, port, pki, key,
                               [i for i in NATIVE_IDEAS if i in ablations])
        cg: dict[str, dict] = {}
        for client in CLIENTS:
            for mode in ("plain", "hook"):
                for n in (n_big, n_small):
                    label = f"{client}-{mode}-{n}"
                    stats = work / f"{label}.json"
                    res, out = callgrind(args, work, label,
                                         _worker_cmd(args, client, mode, n, port, pki, key,
                                                     stats), hook_dir)
                    cg[label] = {"result": res, "parsed": parse_callgrind(out),
                                 "stats": json.loads(stats.read_text()) if mode == "hook"
                                 else None}
        caches = cache_sim(args, work, hook_dir, port, pki, key, n_big, n_small)
        repeat = None
        if repeat_check and not args.quick:  # the same run again: repeatable counts?
            res, out = callgrind(args, work, "floor-plain-repeat",
                                 _worker_cmd(args, "floor", "plain", n_big, port, pki, key),
                                 hook_dir)
            again = parse_callgrind(out)["total"]
            first = cg[f"floor-plain-{n_big}"]["parsed"]["total"]
            repeat = {"first": first, "again": again, "rel_diff": round(again / first - 1, 5)}
        ideas = {}
        for name in ablations:
            for client in ABLATIONS[name][2]:
                tot = {}
                for n in (n_big, n_small):
                    label = f"{client}-ablate-{name}-{n}"
                    _, out = callgrind(args, work, label,
                                       _worker_cmd(args, client, "plain", n, port, pki, key,
                                                   ablate=[name]), hook_dir)
                    tot[n] = parse_callgrind(out)["total"]
                ideas.setdefault(name, {"what": ABLATIONS[name][0]})[client] = round(
                    marginal(tot[n_big], tot[n_small], n_big - n_small), 1)

    clients: dict[str, Any] = {}
    for client in CLIENTS:
        a = analyse_client(client, cg, n_big, n_small, calib)
        good = native[client]
        user = statistics.median(r["user"] / args.n * 1e6 for r in good)
        sys_ = statistics.median(r["sys"] / args.n * 1e6 for r in good)
        a["native"] = {
            "user_us_per_push": round(user, 2), "sys_us_per_push": round(sys_, 2),
            "cpu_us_per_push": round(user + sys_, 2),
            "pushes_per_s": round(statistics.median(args.n / r["seconds"] for r in good)),
            "rounds_cpu_us": [round((r["user"] + r["sys"]) / args.n * 1e6, 1) for r in good],
            "pushes_per_read": round(statistics.median(
                args.n / max(1, r["io"]["reads"]) for r in good), 1),
            "pushes_per_write": round(statistics.median(
                args.n / max(1, r["io"]["writes"]) for r in good), 1),
            "ok": min(r["ok"] for r in good)}
        clients[client] = a
    for client in CLIENTS:
        clients[client]["cache_sim"] = caches[client]
    convert(clients)
    for name, idea in ideas.items():
        for client in CLIENTS:
            runs = native.get(f"{client}+{name}")
            if runs:
                idea[f"{client}_native_cpu_us"] = round(statistics.median(
                    (r["user"] + r["sys"]) / args.n * 1e6 for r in runs), 2)
            if client not in idea:
                continue
            base = clients[client]["instructions_per_push"]
            saved = base - idea[client]
            idea[f"{client}_saved_ir"] = round(saved, 1)
            idea[f"{client}_saved_us"] = round(saved * clients[client]["ns_per_instruction"]
                                               / 1000, 2)
    return {"when": now(), "machine": machine(), "n": args.n, "rounds": args.rounds,
            "cg_n": [n_big, n_small], "connections": CONNECTIONS, "server": "nginx",
            "hook_cost_per_frame": {k: round(v, 1) for k, v in calib.items()},
            "hpack_ir_per_block": shapes,
            "repeatability": repeat, "clients": clients, "ideas": ideas}


def convert(clients: dict[str, Any]) -> None:
    """Instructions to µs for both clients at one rate, the floor's (its user CPU per push
    over its instructions per push): engine − floor is then the difference in instructions;
    what the engine's CPU time holds beyond that (slower instructions, noise) is its own row."""
    f = clients["floor"]
    rate = f["native"]["user_us_per_push"] * 1000 / f["instructions_per_push"]
    for a in clients.values():
        a["ns_per_instruction"] = round(rate, 4)
        us = {c: round(v * rate / 1000, 2) for c, v in a["categories_ir"].items()}
        us["kernel"] = a["native"]["sys_us_per_push"]
        us["beyond"] = round(a["native"]["user_us_per_push"]
                             - a["instructions_per_push"] * rate / 1000, 2)
        a["categories_us"] = us
        a["own_ns_per_instruction"] = round(
            a["native"]["user_us_per_push"] * 1000 / a["instructions_per_push"], 4)
        for fn in a["functions"]:
            fn["us_per_push"] = round(fn["ir_per_push"] * rate / 1000, 2)


def render(r: dict[str, Any]) -> list[str]:
    """The .md: the run of the code as it is now, then the earlier commit's (--compare)."""
    for run in (r, r.get("before")):
        if run:
            convert(run["clients"])
    lines = [f"Client CPU per push by category, nginx sink, {r['connections']} connections, "
             f"client on core 0 and nginx on core 1 ({r['when']}).", ""]
    lines += render_run(r, "Now", full=True)
    if "before" in r:
        lines += ["", *render_run(r["before"], "Before", full=False)]
    m = r["machine"]
    lines += ["", f"Machine: {m['cpus']} vCPU {m['cpu_model']}, Python {m['python']}, kernel "
                  f"{m['kernel']}, load average {m['loadavg_1m_5m']} at the end; "
                  f"{r.get('elapsed_s', 0)} s in all."]
    return lines


def render_run(r: dict[str, Any], title: str, full: bool) -> list[str]:
    f, e = r["clients"]["floor"], r["clients"]["engine"]
    code = r.get("code") or {"commit": "?", "ref": "?", "working_tree_dirty": False}
    lines = [f"## {title}: fanout at {code['commit'][:7]} ({code['ref']}"
             f"{', with uncommitted changes' if code['working_tree_dirty'] else ''})", "",
             f"CPU time, {r['n']:,} pushes x {r['rounds']} rounds (median): floor "
             f"{f['native']['cpu_us_per_push']} µs/push (user {f['native']['user_us_per_push']}, "
             f"system {f['native']['sys_us_per_push']}), engine {e['native']['cpu_us_per_push']} "
             f"(user {e['native']['user_us_per_push']}, system {e['native']['sys_us_per_push']}). "
             f"Instructions (callgrind, marginal over pushes {r['cg_n'][1]:,}-{r['cg_n'][0]:,}): "
             f"floor {f['instructions_per_push']:,.0f} per push, engine "
             f"{e['instructions_per_push']:,.0f} ({e['instructions_per_push'] / f['instructions_per_push']:.2f}x). "
             f"µs = instructions x the floor's {f['ns_per_instruction']:.3f} ns per instruction "
             f"(its user CPU over its instructions; the engine's own: "
             f"{e['own_ns_per_instruction']:.3f}); kernel = system CPU per push.", "",
             *category_table(f, e)]
    if full:
        lines += ["", *machine_table(f, e)]
        for client, a in (("engine", e), ("floor", f)):
            lines += ["", *function_table(client, a)]
    lines += ideas_lines(r, f, e)
    lines += ["", *hpack_lines(r, f)]
    hc = r["hook_cost_per_frame"]
    lines += ["", f"Hook cost per frame (calibrated, subtracted): inlinable call {hc['inl']:.0f}, "
                  f"call from C {hc['c']:.0f}, generator resume {hc['res']:.0f} instructions; "
                  f"hooked runs {f['hooked_instructions_per_push'] / f['instructions_per_push']:.2f}x "
                  f"(floor) and {e['hooked_instructions_per_push'] / e['instructions_per_push']:.2f}x "
                  f"(engine) the unhooked instructions; residual after the correction "
                  f"{f['hook_model_residual']:+.1%} (floor), {e['hook_model_residual']:+.1%} "
                  f"(engine), spread over the categories.",
              f"Regime: pushes per TLS read / write, native {f['native']['pushes_per_read']} / "
              f"{f['native']['pushes_per_write']} (floor), {e['native']['pushes_per_read']} / "
              f"{e['native']['pushes_per_write']} (engine); under callgrind "
              f"{f['cg_pushes_per_read']} / {f['cg_pushes_per_write']} (floor), "
              f"{e['cg_pushes_per_read']} / {e['cg_pushes_per_write']} (engine)."]
    if "cache_sim" in f:
        fc, ec = f["cache_sim"], e["cache_sim"]
        lines.append(f"Simulated caches (callgrind --cache-sim=yes), per push: L1 data misses "
                     f"{fc['D1_misses']:,.0f} (floor) and {ec['D1_misses']:,.0f} (engine), L1 "
                     f"instruction misses {fc['I1_misses']:,.0f} and {ec['I1_misses']:,.0f}, "
                     f"last-level misses {fc['LL_misses']:,.0f} and {ec['LL_misses']:,.0f}; "
                     f"data references {fc['data_refs']:,.0f} and {ec['data_refs']:,.0f}.")
    if r.get("repeatability"):
        rp = r["repeatability"]
        lines.append(f"Repeatability: the floor's {r['cg_n'][0]:,}-push callgrind run twice: "
                     f"{rp['first']:,} and {rp['again']:,} instructions ({rp['rel_diff']:+.3%}).")
    return lines


def category_table(f: dict[str, Any], e: dict[str, Any]) -> list[str]:
    lines = table_head(["category", "floor µs", "floor %", "engine µs", "engine %",
                        "engine − floor µs", "floor instr", "engine instr"], "lrrrrrrr")
    ft = sum(f["categories_us"].values())
    et = sum(e["categories_us"].values())
    for cat, label in CATEGORIES:
        fu, eu = f["categories_us"][cat], e["categories_us"][cat]
        instr = "– | –" if cat not in f["categories_ir"] else \
            f"{f['categories_ir'][cat]:,.0f} | {e['categories_ir'][cat]:,.0f}"
        lines.append(f"| {label} | {fu:.2f} | {fu / ft:.0%} | {eu:.2f} | {eu / et:.0%} | "
                     f"{eu - fu:+.2f} | {instr} |")
    lines.append(f"| **total** | **{ft:.2f}** | | **{et:.2f}** | | **{et - ft:+.2f}** | "
                 f"{f['instructions_per_push']:,.0f} | {e['instructions_per_push']:,.0f} |")
    return lines


def machine_table(f: dict[str, Any], e: dict[str, Any]) -> list[str]:
    lines = ["Machine code (unhooked runs, self instructions per push):", "",
             *table_head(["where", "floor instr", "floor %", "engine instr", "engine %"],
                         "lrrrr")]
    for g in dict.fromkeys(list(e["machine_code_ir"]) + list(f["machine_code_ir"])):
        fv, ev = f["machine_code_ir"].get(g, 0.0), e["machine_code_ir"].get(g, 0.0)
        lines.append(f"| {g} | {fv:,.0f} | {fv / f['instructions_per_push']:.0%} | {ev:,.0f} | "
                     f"{ev / e['instructions_per_push']:.0%} |")
    return lines


def function_table(client: str, a: dict[str, Any], top: int = 25) -> list[str]:
    lines = [f"Top functions, {client} (exclusive: C calls included, Python callees not; "
             f"µs at {a['ns_per_instruction']:.3f} ns per instruction):", "",
             *table_head(["function", "category", "instr/push", "µs/push", "calls/push"],
                         "llrrr")]
    for fn in a["functions"][:top]:
        where = f"{_short(fn['file'])}:{fn['line']} {fn['qualname']}"
        calls = fn["inl"] + fn["c"] + fn["res"]
        lines.append(f"| `{where}` | {fn['category']} | {fn['ir_per_push']:,.0f} | "
                     f"{fn['us_per_push']:.2f} | {calls:.1f} |" if calls >= 0.95 else
                     f"| `{where}` | {fn['category']} | {fn['ir_per_push']:,.0f} | "
                     f"{fn['us_per_push']:.2f} | {calls:.4f} |")
    return lines


def ideas_lines(r: dict[str, Any], f: dict[str, Any], e: dict[str, Any]) -> list[str]:
    if not r["ideas"]:
        return []
    lines = ["", "Ideas measured (callgrind, unhooked; the change applied by monkeypatch in the "
                 "worker, results checked: every push delivered):", "",
             *table_head(["idea", "floor saves instr", "floor saves µs", "engine saves instr",
                          "engine saves µs"], "lrrrr")]
    for name, idea in r["ideas"].items():
        rate = f["ns_per_instruction"] / 1000
        cells = [f"{idea[f'{c}_saved_ir']:,.0f} | {idea[f'{c}_saved_ir'] * rate:.2f}"
                 if f"{c}_saved_ir" in idea else "– | –" for c in CLIENTS]
        lines.append(f"| {name}: {idea['what']} | {' | '.join(cells)} |")
    checked = [(name, idea) for name, idea in r["ideas"].items()
               if "floor_native_cpu_us" in idea]
    if checked:
        lines += ["", "In CPU time (the same interleaved rounds, median): " + "; ".join(
            f"{name}: floor {f['native']['cpu_us_per_push']} → {idea['floor_native_cpu_us']} "
            f"µs/push, engine {e['native']['cpu_us_per_push']} → {idea['engine_native_cpu_us']}"
            for name, idea in checked) + "."]
    return lines


def hpack_lines(r: dict[str, Any], f: dict[str, Any]) -> list[str]:
    hs = r["hpack_ir_per_block"]
    out = []
    for decoder, label in (("hpack", "hpack's Decoder"), ("engine", "the engine's hpackdec")):
        if f"{decoder}:nginx" not in hs:
            continue
        out.append(f"{label}: nginx's 200 {hs[f'{decoder}:nginx']:,.0f}, an APNs-like 200 "
                   f"{hs[f'{decoder}:apns-huffman']:,.0f} (Huffman) or "
                   f"{hs[f'{decoder}:apns-raw']:,.0f} (raw)")
    return [f"HPACK instructions per response block (callgrind, one decoder, blocks in a "
            f"row): {'; '.join(out)}. The APNs-like 200: :status from the static table and "
            f"apns-id, a fresh UUID each, as a literal without indexing."]


def _short(path: str) -> str:
    p = path.replace("\\", "/")
    for marker in ("/site-packages/", "/lib/python3.11/"):
        if marker in p:
            return p.split(marker, 1)[1]
    for marker in ("/fanout/", "/bench/"):
        if marker in p:
            return marker[1:] + p.rsplit(marker, 1)[1]
    return p


if __name__ == "__main__":
    main()
