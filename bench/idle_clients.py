#!/usr/bin/env python3
"""Opens N authenticated, idle Postgres client connections and holds them.

Python 3 standard library only: the startup packet and the client side of
SCRAM-SHA-256 (also MD5 and cleartext) are done by hand, so nothing needs
installing. Used by bench/idle_clients.sh.

Protocol with the caller, on stdout (one line each):
  READY ok=<n> failed=<n> seconds=<s> first_error=<text>
      once every connection attempt has finished (succeeded or failed);
      the successful connections are then held open, idle.
The caller may write "check" lines to stdin, each answered with
  OPEN <n>
(how many held connections the server has not closed). Any other line, or
end of input, closes the connections with a Terminate message and prints
  CLOSED <n>
and exits. Progress goes to stderr.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import resource
import struct
import sys
import time


class PgError(Exception):
    pass


def msg(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


async def read_msg(reader):
    head = await reader.readexactly(5)
    kind, length = head[:1], struct.unpack("!I", head[1:])[0]
    if length < 4 or length > 1 << 20:
        raise PgError(f"bad message length {length} for {kind!r}")
    return kind, await reader.readexactly(length - 4)


def error_text(payload: bytes) -> str:
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode("utf-8", "replace")
    return f"{fields.get(b'S', 'ERROR')}: {fields.get(b'M', '?')} ({fields.get(b'C', '?')})"


# PBKDF2 is the expensive part of SCRAM; the salt is usually the same for
# every connection of a user, so remember it.
_salted = {}


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    key = (password, salt, iterations)
    if key not in _salted:
        _salted[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return _salted[key]


async def scram_sha_256(reader, writer, password: str, mechanisms):
    if "SCRAM-SHA-256" not in mechanisms:
        raise PgError(f"server offers SASL mechanisms {mechanisms}, not SCRAM-SHA-256")
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    first = ("n,," + first_bare).encode()
    writer.write(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
    await writer.drain()

    kind, body = await read_msg(reader)
    if kind == b"E":
        raise PgError(error_text(body))
    if kind != b"R" or struct.unpack("!I", body[:4])[0] != 11:
        raise PgError(f"expected SASLContinue, got {kind!r}")
    server_first = body[4:].decode()
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise PgError("server nonce does not extend the client nonce")
    salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])

    salted = salted_password(password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    writer.write(msg(b"p", final))
    await writer.drain()

    kind, body = await read_msg(reader)
    if kind == b"E":
        raise PgError(error_text(body))
    if kind != b"R" or struct.unpack("!I", body[:4])[0] != 12:
        raise PgError(f"expected SASLFinal, got {kind!r}")
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest()).decode()
    verifier = dict(a.split("=", 1) for a in body[4:].decode().split(","))
    if verifier.get("v") != expected:
        raise PgError("server signature mismatch")


async def connect(args):
    reader, writer = await asyncio.open_connection(args.host, args.port)
    try:
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (("user", args.user), ("database", args.database),
                         ("application_name", "idle_clients"))
        ) + b"\0"
        body = struct.pack("!I", 196608) + params
        writer.write(struct.pack("!I", len(body) + 4) + body)
        await writer.drain()
        while True:
            kind, body = await read_msg(reader)
            if kind == b"E":
                raise PgError(error_text(body))
            if kind == b"R":
                code = struct.unpack("!I", body[:4])[0]
                if code == 0:
                    continue
                if code == 3:
                    writer.write(msg(b"p", args.password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5((args.password + args.user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                    writer.write(msg(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
                    await scram_sha_256(reader, writer, args.password, mechanisms)
                    continue
                else:
                    raise PgError(f"unsupported authentication request {code}")
                await writer.drain()
            elif kind == b"Z":
                return reader, writer
            # S (ParameterStatus), K (BackendKeyData), N (notice): skip.
    except BaseException:
        writer.close()
        raise


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10000, help="connections to open")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6432)
    ap.add_argument("--user", default="app")
    ap.add_argument("--password", default=os.environ.get("PGPASSWORD", "app"))
    ap.add_argument("--database", default="app")
    ap.add_argument("--concurrency", type=int, default=100,
                    help="connection attempts in flight at once (the listen backlog is finite)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per connection attempt")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < args.n + 50:
        print(f"idle_clients: warning: open-file limit {soft} < {args.n} connections", file=sys.stderr)

    held, errors = [], []
    sem = asyncio.Semaphore(args.concurrency)
    start = time.monotonic()

    async def one():
        async with sem:
            try:
                held.append(await asyncio.wait_for(connect(args), args.timeout))
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(f"{type(e).__name__}: {e}")
            done = len(held) + len(errors)
            if done % 1000 == 0:
                print(f"idle_clients: {done}/{args.n} attempted, {len(errors)} failed", file=sys.stderr)

    await asyncio.gather(*(one() for _ in range(args.n)))
    elapsed = time.monotonic() - start
    first_error = errors[0].replace("\n", " ") if errors else ""
    print(f"READY ok={len(held)} failed={len(errors)} seconds={elapsed:.1f} first_error={first_error}", flush=True)

    # Hold the connections, idle, until told to close them. "check" asks
    # how many the server has not closed meanwhile.
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "check":
            break
        still_open = sum(1 for reader, _ in held if not reader.at_eof())
        print(f"OPEN {still_open}", flush=True)
    for _, writer in held:
        try:
            writer.write(msg(b"X", b""))
            writer.close()
        except Exception:  # noqa: BLE001 - already gone: nothing to close
            pass
    for _, writer in held:
        try:
            await writer.wait_closed()
        except Exception:  # noqa: BLE001
            pass
    print(f"CLOSED {len(held)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
