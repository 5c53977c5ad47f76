#!/usr/bin/env python3
"""Instructions per transaction by kind of work, from two callgrind dumps.

    bench/callgrind_split.py SHORT_DUMP LONG_DUMP TRANSACTIONS

SHORT_DUMP and LONG_DUMP are the two counted dumps that bench/callgrind.sh
takes for one protocol (SPLIT=1 there runs this script on them);
TRANSACTIONS is how many more transactions the long run made. Each
function's self cost in the long dump minus the short one, divided by
TRANSACTIONS, is put in one bucket:

- by the source file its instructions come from when that is a crate
  (tokio code inlined into a shardgate function counts as tokio), a
  shardgate module, or a C library;
- by the function's name when the file is Rust's standard library (the
  caller's crate: `core::slice` code in the classifier counts as
  classification) or unknown (a stripped binary such as Debian's
  pgbouncer: its own code, libevent and libc are told apart by symbol).

Buckets are coarse on purpose: they say where a proxy's per-transaction
work goes (event loop, protocol handling, routing, pooling, ...) so that
two proxies or two builds can be compared, not which line to change.
"""

import collections
import re
import subprocess
import sys

# (bucket, regular expression), first match wins. Matched against
# "file:function [object]" of callgrind_annotate's output (the object is
# not always shown).
RULES = [
    ("clock reads", r"Timespec|clock_gettime|Instant|/time/\.\./.*clock"),
    ("async runtime (tokio, mio)", r"/(tokio|tokio-util|mio|tokio-macros)-[0-9][^/]*/"),
    ("async runtime (tokio, mio)", r":<?(tokio|tokio_util|mio)::"),
    ("syscall wrappers (libc)", r":(recv|send|read|write|epoll_wait|epoll_ctl|__pthread_\w*cancel|syscall)\b"),
    ("event loop (libevent)", r"\[[^]]*libevent[^]]*\]$"),
    ("statement classification", r"/src/router/classify\.rs:|shardgate::router::classify"),
    ("hotspot counting", r"/src/hotspot/|shardgate::hotspot"),
    ("metrics", r"/prometheus-[0-9][^/]*/|/src/metrics|shardgate::metrics"),
    ("pool checkout and return", r"/deadpool-[0-9][^/]*/|/src/backend/pool\.rs:|/src/frontend/spare\.rs:"
     r"|shardgate::backend::pool|frontend::spare::|Session::attach|Session::keep_spare"),
    ("routing and sharding", r"/src/frontend/(routing|sharding)\.rs:|/src/router/"
     r"|frontend::(routing|sharding)::|shardgate::router::"),
    ("protocol and session (shardgate)", r"/work/[^:]*/src/|shardgate::"),
    ("byte and memory helpers (bytes, memchr, libc memcpy/malloc)",
     r"/(bytes|memchr)-[0-9][^/]*/|mem(cpy|move|set|cmp)|malloc|free|realloc|:_?int_|:cfree|:bytes::|:memchr::"),
    ("std and core (other)", r"/rustc/|/library/(core|std|alloc)/"),
    ("proxy's own code (stripped binary)", r"^\?\?\?:0x"),
    ("libc (other)", r"\[[^]]*libc\.so[^]]*\]$"),
]
RULES = [(name, re.compile(rx)) for name, rx in RULES]
LINE = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$")


def self_costs(path):
    out = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", path],
        capture_output=True, text=True, check=True,
    ).stdout
    costs, total = collections.Counter(), None
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        n, what = int(m.group(1).replace(",", "")), m.group(2)
        if what.startswith("PROGRAM TOTALS"):
            total = n
        elif n != total:  # entry points that callgrind charges the whole run to
            costs[what] += n
    return costs


def bucket(what):
    for name, rx in RULES:
        if rx.search(what):
            return name
    return "other"


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    short, long_, txns = self_costs(sys.argv[1]), self_costs(sys.argv[2]), float(sys.argv[3])
    buckets = collections.Counter()
    for what in set(short) | set(long_):
        buckets[bucket(what)] += long_[what] - short[what]
    total = sum(buckets.values())
    print("| kind of work | instructions per transaction | share |")
    print("|---|---:|---:|")
    for name, n in buckets.most_common():
        if abs(n) < txns / 2:  # rounds to 0 per transaction
            continue
        print(f"| {name} | {n / txns:,.0f} | {100 * n / total:.0f} % |")
    print(f"| total | {total / txns:,.0f} | |")


if __name__ == "__main__":
    main()
