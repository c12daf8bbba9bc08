#!/usr/bin/env python3
"""Fault-injection proxy for s3grant's fault suite (Python 3.11, standard library only).

Two modes:

  aws  An HTTP/1.1 reverse proxy in front of an AWS-compatible server (moto, Ceph RGW).
       Every request is identified (SigV4 service, query-protocol Action or "s3:METHOD",
       UserName/AccessKeyId/RoleSessionName/PolicyName/PathPrefix, the SDK's app id) and
       logged; rules set through the control API answer with AWS errors, stall, reset,
       delay, or forward the request and then SIGKILL a process (the client never sees
       the committed answer). An eventual-consistency mode hides new IAM users and access
       keys for T seconds. The request is forwarded byte for byte (Host included: SigV4
       signs it); the response's hop-by-hop headers are the proxy's own.
  tcp  A plain TCP relay (for the Kubernetes API server's TLS): pass, stall, reset, refuse.

Usage:

  proxy.py --listen 127.0.0.1:0 --upstream 127.0.0.1:5000 --mode aws \\
           --control 127.0.0.1:0 --log /tmp/aws-faults.log --ready-file /tmp/proxy.ready

Once both ports are bound it writes one JSON line
  {"listen": "127.0.0.1:N", "control": "127.0.0.1:M", "pid": P}
to --ready-file (tmp file then rename) and to stdout, and runs until SIGTERM/SIGINT.

Control API (HTTP/1.1 + JSON on --control):
  GET  /state         {"rules": [...], "consistency_seconds": T, "tcp": "pass", "requests": n}
  GET  /rules         the rules, each with "fired"
  PUT  /rules         body [rule, ...]: replace;  POST /rules  body rule: append
  DELETE /rules       remove all rules
  PUT  /consistency   body {"consistency_seconds": T}   (0 = off, forgets hidden entities)
  PUT  /tcp           body {"tcp": "pass" | "stall" | "reset" | "refuse"}
  POST /reset         rules, consistency and tcp mode back to defaults (the log is kept)
  GET  /stats         {"iam/CreateUser/200": 3, "iam/GetUser/error": 1, ...}
A bad body gets 400 {"error": "..."}.

Rule: {"id": "r1", "action": "CreateAccessKey" | ["A", "B"] | "*", "service": "iam"|"sts"|"s3"|"*",
       "client": "app id" | "*", "params": {"UserName": "x"}, "fault": "error" | "stall" |
       "reset" | "delay" | "forward_then_kill", "probability": 1.0, "count": N,
       "status": 400, "code": "Throttling", "message": "Rate exceeded", "seconds": 30,
       "pid_file": "/path" | "pid": 123, "signal": "KILL"}

The log (--log, appended, one JSON object per line, flushed per line) never holds a secret
key, session token, Authorization header or any body; see tests/faults/README.md.
"""

import argparse
import asyncio
import http
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from email.utils import formatdate
from xml.sax.saxutils import escape as xml_escape

HEADER_LIMIT = 1 << 20  # max size of a request/response header block
LOGGED_PARAMS = ("UserName", "AccessKeyId", "RoleSessionName", "PolicyName", "PathPrefix")
FAULTS = ("error", "stall", "reset", "forward_then_kill", "delay")
TCP_MODES = ("pass", "stall", "reset", "refuse")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection"}

# Eventual consistency: actions naming a hidden user / a hidden access key get NoSuchEntity.
HIDDEN_USER_ACTIONS = {
    "GetUser", "ListUserTags", "ListUserPolicies", "ListAccessKeys", "DeleteUser",
    "PutUserPolicy", "CreateAccessKey",
    # also refused by AWS for a user it does not see yet:
    "GetUserPolicy", "DeleteUserPolicy", "TagUser", "UntagUser",
    "DeleteAccessKey", "UpdateAccessKey",
}
HIDDEN_KEY_ACTIONS = {"DeleteAccessKey", "UpdateAccessKey", "GetAccessKeyLastUsed"}

ERROR_NS = {
    "iam": "https://iam.amazonaws.com/doc/2010-05-08/",
    "sts": "https://sts.amazonaws.com/doc/2011-06-15/",
}
DEFAULT_STATUS = {
    "Throttling": 400, "ThrottlingException": 400, "RequestLimitExceeded": 400,
    "ServiceFailure": 500, "InternalFailure": 500, "InternalError": 500,
    "ServiceUnavailable": 503, "SlowDown": 503,
}

LINGER_RST = struct.pack("ii", 1, 0)


def eprint(*args):
    print("proxy:", *args, file=sys.stderr, flush=True)


def parse_hostport(s, what):
    s = s.strip()
    for prefix in ("http://", "tcp://"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    s = s.rstrip("/")
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"{what}: expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def rst(transport):
    """Close a transport with a TCP RST (SO_LINGER (1, 0), then close)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        except OSError:
            pass
    transport.abort()


def local(tag):
    return tag.rsplit("}", 1)[-1]


# --------------------------------------------------------------------------- HTTP bits

class BadMessage(Exception):
    pass


class Headers:
    """Ordered header list with case-insensitive lookup."""

    def __init__(self, items):
        self.items = items  # list of (name, value) as str

    def get(self, name, default=None):
        name = name.lower()
        vals = [v for k, v in self.items if k.lower() == name]
        return ", ".join(vals) if vals else default

    def tokens(self, name):
        v = self.get(name, "")
        return {t.strip().lower() for t in v.split(",") if t.strip()}


def parse_head(block):
    try:
        text = block.decode("latin-1")
    except Exception as e:  # pragma: no cover
        raise BadMessage(str(e))
    lines = text.split("\r\n")
    start = lines[0]
    items = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and items:  # obsolete folding
            k, v = items[-1]
            items[-1] = (k, v + " " + line.strip())
            continue
        k, sep, v = line.partition(":")
        if not sep or not k or k != k.strip():
            raise BadMessage(f"bad header line {line[:60]!r}")
        items.append((k, v.strip()))
    return start, Headers(items)


async def read_chunked(reader):
    raw = bytearray()
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadMessage("bad chunk size")
        if size == 0:
            while True:  # trailers
                t = await reader.readuntil(b"\r\n")
                raw += t
                if t == b"\r\n":
                    return bytes(raw), bytes(body)
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise BadMessage("bad chunk terminator")
        raw += data
        body += data[:-2]


async def read_body(reader, headers, is_request):
    """Returns (raw bytes as framed on the wire, decoded body, framing)."""
    if "chunked" in headers.tokens("transfer-encoding"):
        raw, body = await read_chunked(reader)
        return raw, body, "chunked"
    cl = headers.get("content-length")
    if cl is not None:
        try:
            vals = {int(x.strip()) for x in cl.split(",")}
        except ValueError:
            raise BadMessage("bad content-length")
        if len(vals) != 1 or min(vals) < 0:
            raise BadMessage("bad content-length")
        n = vals.pop()
        data = await reader.readexactly(n) if n else b""
        return data, data, "length"
    if is_request:
        return b"", b"", "none"
    data = await reader.read()  # close-delimited response
    return data, data, "eof"


def reason_phrase(status):
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status"


class Request:
    def __init__(self, head, method, target, version, headers):
        self.head = head
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.raw_body = b""
        self.body = b""

    def wants_close(self):
        conn = self.headers.tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" not in conn
        return "close" in conn


class Response:
    def __init__(self, version, status, reason, headers, raw_body, body, framing):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.raw_body = raw_body
        self.body = body
        self.framing = framing
        self.modified = False

    def serialize(self, close, head_only=False):
        """The response for the client: our own hop-by-hop headers, and Content-Length
        whenever the body was edited or the upstream delimited it by closing."""
        drop = set(HOP_BY_HOP) | self.headers.tokens("connection")
        rewrite_len = self.modified or self.framing == "eof"
        if rewrite_len:
            drop |= {"content-length", "transfer-encoding"}
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        for k, v in self.headers.items:
            if k.lower() not in drop:
                lines.append(f"{k}: {v}")
        if rewrite_len:
            lines.append(f"Content-Length: {len(self.body)}")
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head_only or self.framing == "none":
            return head
        return head + (self.body if rewrite_len else self.raw_body)


def make_response(status, body, ctype, extra=()):
    items = [("Content-Type", ctype), ("Date", formatdate(usegmt=True))] + list(extra)
    items.append(("Content-Length", str(len(body))))
    return Response("HTTP/1.1", status, reason_phrase(status), Headers(items), body, body, "length")


def error_response(service, action, status, code, message):
    rid = str(uuid.uuid4())
    if service == "s3" or action.startswith("s3:"):
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{xml_escape(code)}</Code>'
                f"<Message>{xml_escape(message)}</Message><RequestId>{rid}</RequestId></Error>")
        return make_response(status, body.encode(), "application/xml",
                             [("x-amz-request-id", rid), ("x-amzn-RequestId", rid)])
    ns = ERROR_NS.get(service, ERROR_NS["iam"])
    typ = "Receiver" if status >= 500 else "Sender"
    body = (f'<ErrorResponse xmlns="{ns}"><Error><Type>{typ}</Type><Code>{xml_escape(code)}</Code>'
            f"<Message>{xml_escape(message)}</Message></Error><RequestId>{rid}</RequestId>"
            f"</ErrorResponse>")
    return make_response(status, body.encode(), "text/xml", [("x-amzn-RequestId", rid)])


# ---------------------------------------------------------------------- identification

CRED_RE = re.compile(r"Credential=([^,\s]+)")
APP_RE = re.compile(r"(?:^|\s)app/([^\s]+)")


def first(d, k):
    v = d.get(k)
    return v[0] if v else None


class Info:
    __slots__ = ("service", "action", "params", "client")


def identify(req):
    info = Info()
    h = req.headers
    split = urllib.parse.urlsplit(req.target)
    query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
    cred = None
    m = CRED_RE.search(h.get("authorization", ""))
    if m:
        cred = m.group(1)
    else:
        cred = first(query, "X-Amz-Credential")
    parts = cred.split("/") if cred else []
    info.service = parts[3] if len(parts) >= 5 and parts[-1] == "aws4_request" else "unknown"
    form = {}
    ctype = h.get("content-type", "").lower()
    if info.service != "s3" and req.body and ctype.startswith("application/x-www-form-urlencoded"):
        form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)
    action = first(form, "Action") or first(query, "Action")
    if not action:
        target = h.get("x-amz-target")
        action = target.rsplit(".", 1)[-1] if target else "s3:" + req.method
    info.action = action
    params = {}
    for k in LOGGED_PARAMS:
        v = first(form, k) or first(query, k)
        if v is not None:
            params[k] = v
    info.params = params
    info.client = None
    for name in ("x-amz-user-agent", "user-agent"):
        m = APP_RE.search(h.get(name, ""))
        if m:
            info.client = m.group(1)
            break
    return info


# --------------------------------------------------------------------- response parsing

def xml_root(body):
    try:
        return ET.fromstring(body)
    except ET.ParseError:
        return None


def find_el(root, name):
    for el in root.iter():
        if local(el.tag) == name:
            return el
    return None


def child_text(el, name):
    if el is None:
        return None
    for c in el:
        if local(c.tag) == name:
            return (c.text or "").strip()
    return None


def members_text(container, name):
    if container is None:
        return []
    return [child_text(m, name) for m in container if local(m.tag) == "member"]


def error_code(body):
    root = xml_root(body)
    if root is None:
        return None
    el = find_el(root, "Code")
    return (el.text or "").strip() if el is not None else None


def parse_result(action, body):
    """NON-SECRET identifiers from a successful response (never keys' secrets or tokens)."""
    if action in ("DeleteAccessKey", "DeleteUser"):
        return {}
    if action not in ("CreateUser", "GetUser", "CreateAccessKey", "ListAccessKeys", "ListUsers") \
            and not action.startswith("AssumeRole") and action not in ("GetSessionToken", "GetFederationToken"):
        return None
    root = xml_root(body)
    if root is None:
        return {"unparsed": True}
    if action in ("CreateUser", "GetUser"):
        u = find_el(root, "User")
        return {"UserName": child_text(u, "UserName"), "UserId": child_text(u, "UserId")}
    if action == "CreateAccessKey":
        k = find_el(root, "AccessKey")
        return {"UserName": child_text(k, "UserName"), "AccessKeyId": child_text(k, "AccessKeyId"),
                "CreateDate": child_text(k, "CreateDate")}
    if action == "ListAccessKeys":
        return {"AccessKeyIds": members_text(find_el(root, "AccessKeyMetadata"), "AccessKeyId")}
    if action == "ListUsers":
        return {"UserNames": members_text(find_el(root, "Users"), "UserName")}
    c = find_el(root, "Credentials")
    return {"AccessKeyId": child_text(c, "AccessKeyId"), "Expiration": child_text(c, "Expiration")}


MEMBER_TAG_RE = re.compile(rb"<(/?)member(?:\s[^>]*)?(/?)>")


def filter_members(body, container, child, hide):
    """Removes the top-level <member> elements of <container> whose <child> is in `hide`.
    Text-level edit (the rest of the document is kept byte for byte)."""
    start = body.find(b"<" + container + b">")
    if start < 0:
        return body, []
    end = body.find(b"</" + container + b">", start)
    if end < 0:
        return body, []
    spans = []
    depth = 0
    mstart = 0
    for m in MEMBER_TAG_RE.finditer(body, start, end):
        if m.group(2):  # <member/>
            continue
        if not m.group(1):
            if depth == 0:
                mstart = m.start()
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                spans.append((mstart, m.end()))
    removed = []
    out = bytearray()
    pos = 0
    for s, e in spans:
        el = xml_root(body[s:e])
        value = child_text(el, child) if el is not None else None
        if value is None:
            m = re.search(rb"<" + child.encode() + rb">([^<]*)</", body[s:e])
            value = m.group(1).decode("utf-8", "replace").strip() if m else None
        if value in hide:
            out += body[pos:s]
            pos = e
            removed.append(value)
    out += body[pos:]
    return bytes(out), removed


# ------------------------------------------------------------------------------ state

class Rule:
    FIELDS = {"id", "action", "service", "client", "params", "fault", "probability", "count",
              "status", "code", "message", "seconds", "pid_file", "pid", "signal", "fired"}

    def __init__(self, d, index):
        if not isinstance(d, dict):
            raise ValueError("a rule must be a JSON object")
        unknown = set(d) - self.FIELDS
        if unknown:
            raise ValueError(f"unknown rule field(s): {sorted(unknown)}")
        self.id = d.get("id", f"rule{index}")
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("id must be a non-empty string")
        action = d.get("action", "*")
        if isinstance(action, str):
            action = [action]
        if not isinstance(action, list) or not action or not all(isinstance(a, str) and a for a in action):
            raise ValueError("action must be a string or a list of strings")
        self.actions = action
        self.service = d.get("service", "*")
        self.client = d.get("client", "*")
        for name in ("service", "client"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        self.params = d.get("params", {})
        if not isinstance(self.params, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.params.items()):
            raise ValueError("params must be an object of strings")
        self.fault = d.get("fault")
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {list(FAULTS)}")
        self.probability = d.get("probability", 1.0)
        if isinstance(self.probability, bool) or not isinstance(self.probability, (int, float)) \
                or not 0 <= self.probability <= 1:
            raise ValueError("probability must be a number in [0, 1]")
        self.count = d.get("count")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)
                                       or self.count < 0):
            raise ValueError("count must be a non-negative integer")
        self.code = d.get("code", "ServiceFailure")
        self.status = d.get("status", DEFAULT_STATUS.get(self.code, 400))
        if isinstance(self.status, bool) or not isinstance(self.status, int) or not 200 <= self.status <= 599:
            raise ValueError("status must be an integer in [200, 599]")
        self.message = d.get("message", f"Injected fault ({self.id})")
        if not isinstance(self.code, str) or not isinstance(self.message, str):
            raise ValueError("code and message must be strings")
        default_seconds = {"stall": 30, "delay": 1}.get(self.fault, 0)
        self.seconds = d.get("seconds", default_seconds)
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or self.seconds < 0:
            raise ValueError("seconds must be a non-negative number")
        self.pid_file = d.get("pid_file")
        self.pid = d.get("pid")
        if self.pid_file is not None and not isinstance(self.pid_file, str):
            raise ValueError("pid_file must be a string")
        if self.pid is not None and (isinstance(self.pid, bool) or not isinstance(self.pid, int) or self.pid <= 1):
            raise ValueError("pid must be an integer > 1")
        if self.fault == "forward_then_kill" and self.pid_file is None and self.pid is None:
            raise ValueError("forward_then_kill needs pid_file or pid")
        sig = d.get("signal", "KILL")
        try:
            self.signal = signal.Signals["SIG" + str(sig).upper().removeprefix("SIG")]
        except KeyError:
            raise ValueError(f"unknown signal {sig!r}")
        self.fired = 0

    def spent(self):
        return self.count is not None and self.fired >= self.count

    def matches(self, info):
        if self.spent():
            return False
        if "*" not in self.actions and info.action not in self.actions:
            return False
        if self.service != "*" and info.service != self.service:
            return False
        if self.client != "*" and info.client != self.client:
            return False
        return all(info.params.get(k) == v for k, v in self.params.items())

    def to_json(self):
        d = {"id": self.id, "action": self.actions[0] if len(self.actions) == 1 else self.actions,
             "service": self.service, "fault": self.fault, "probability": self.probability,
             "count": self.count, "fired": self.fired}
        if self.client != "*":
            d["client"] = self.client
        if self.params:
            d["params"] = self.params
        if self.fault == "error":
            d.update(status=self.status, code=self.code, message=self.message)
        if self.fault in ("stall", "delay"):
            d["seconds"] = self.seconds
        if self.fault == "forward_then_kill":
            d.update(pid_file=self.pid_file, pid=self.pid, signal=self.signal.name)
        return d


class State:
    def __init__(self, mode, log_path, seed):
        self.mode = mode
        self.rules = []
        self.consistency = 0.0
        self.hidden_users = {}  # UserName -> time.time() when visible
        self.hidden_keys = {}  # AccessKeyId -> time.time() when visible
        self.tcp = "pass"
        self.flow = asyncio.Event()
        self.flow.set()
        self.requests = 0
        self.stats = {}
        self.seq = 0
        self.next_conn = 0
        self.conns = {}  # conn id -> object with .reset()
        self.rng = random.Random(seed)
        self.log = open(log_path, "a", buffering=1, encoding="utf-8")

    def write_log(self, entry):
        self.seq += 1
        entry["seq"] = self.seq
        self.log.write(json.dumps(entry, separators=(", ", ": ")) + "\n")
        self.log.flush()

    def new_conn_id(self):
        self.next_conn += 1
        return self.next_conn

    def pick_rule(self, info):
        for r in self.rules:
            if not r.matches(info):
                continue
            if self.rng.random() >= r.probability:
                continue
            r.fired += 1
            return r
        return None

    def is_hidden(self, table, key):
        until = table.get(key)
        if until is None:
            return False
        if until > time.time():
            return True
        del table[key]
        return False

    def hidden_now(self, table):
        now = time.time()
        for k in [k for k, until in table.items() if until <= now]:
            del table[k]
        return set(table)

    def set_tcp(self, mode):
        old = self.tcp
        if mode == "reset":
            n = len(self.conns)
            for c in list(self.conns.values()):
                c.reset()
            self.tcp = "pass"
            eprint(f"tcp reset: {n} connection(s) reset")
        else:
            self.tcp = mode
        if self.tcp == "stall":
            self.flow.clear()
        else:
            self.flow.set()
        for c in list(self.conns.values()):
            c.mode_changed()
        if self.mode == "tcp":
            self.write_log({"t": time.time(), "event": "mode", "conn": None, "mode": mode,
                            "previous": old})
        eprint(f"tcp mode {old} -> {mode}")

    def state_json(self):
        return {"rules": [r.to_json() for r in self.rules], "consistency_seconds": self.consistency,
                "tcp": self.tcp, "requests": self.requests,
                "hidden": {"users": sorted(self.hidden_now(self.hidden_users)),
                           "access_keys": sorted(self.hidden_now(self.hidden_keys))}}


# --------------------------------------------------------------------------- aws mode

class Upstream:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    def close(self):
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def roundtrip(self, req):
        for attempt in (0, 1):
            reused = self.writer is not None
            if not reused:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, limit=HEADER_LIMIT)
            got_bytes = False
            try:
                self.writer.write(req.head + req.raw_body)
                await self.writer.drain()
                while True:
                    try:
                        head = await self.reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as e:
                        got_bytes = got_bytes or bool(e.partial)
                        raise
                    got_bytes = True
                    start, headers = parse_head(head)
                    parts = start.split(" ", 2)
                    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                        raise BadMessage(f"bad status line {start[:60]!r}")
                    status = int(parts[1])
                    if 100 <= status < 200 and status != 101:
                        continue  # interim (100 Continue): we sent our own to the client
                    break
                version, reason = parts[0], parts[2] if len(parts) > 2 else reason_phrase(status)
                if req.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                    raw, body, framing = b"", b"", "none"
                else:
                    raw, body, framing = await read_body(self.reader, headers, False)
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                self.close()
                if reused and not got_bytes and attempt == 0:
                    continue  # stale pooled connection: retry once on a fresh one
                raise
            except BaseException:
                self.close()
                raise
            conn = headers.tokens("connection")
            if framing == "eof" or "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn):
                self.close()
            return Response(version, status, reason, headers, raw, body, framing)


class AwsConn:
    def __init__(self, state, cid, writer):
        self.state, self.id, self.writer = state, cid, writer
        self.dead = False

    def reset(self):
        self.dead = True
        rst(self.writer.transport)

    def mode_changed(self):
        pass


class AwsProxy:
    def __init__(self, state, upstream):
        self.state = state
        self.upstream = upstream

    async def gate(self, conn):
        await self.state.flow.wait()
        if conn.dead:
            raise ConnectionResetError("reset by tcp mode")

    async def handle(self, reader, writer):
        st = self.state
        cid = st.new_conn_id()
        conn = AwsConn(st, cid, writer)
        if st.tcp == "refuse":
            rst(writer.transport)
            return
        st.conns[cid] = conn
        up = Upstream(*self.upstream)
        try:
            while not conn.dead:
                await self.gate(conn)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break  # client closed between requests
                except asyncio.LimitOverrunError:
                    await self.send(conn, make_response(431, b"", "text/plain"), True)
                    break
                try:
                    req = self.parse_request(head)
                except BadMessage as e:
                    await self.send(conn, make_response(400, str(e).encode(), "text/plain"), True)
                    break
                has_body = ("chunked" in req.headers.tokens("transfer-encoding")
                            or req.headers.get("content-length", "0").strip() not in ("", "0"))
                if has_body and "100-continue" in req.headers.tokens("expect"):
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                try:
                    req.raw_body, req.body, _ = await read_body(reader, req.headers, True)
                except BadMessage as e:
                    await self.send(conn, make_response(400, str(e).encode(), "text/plain"), True)
                    break
                if not await self.handle_request(conn, up, req):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, OSError, BadMessage):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never let a bug kill the proxy
            eprint(f"conn {cid}: internal error {type(e).__name__}: {e}")
        finally:
            st.conns.pop(cid, None)
            up.close()
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    def parse_request(head):
        start, headers = parse_head(head)
        parts = start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadMessage(f"bad request line {start[:60]!r}")
        return Request(head, parts[0], parts[1], parts[2], headers)

    async def send(self, conn, resp, close, head_only=False):
        await self.gate(conn)
        conn.writer.write(resp.serialize(close, head_only))
        await conn.writer.drain()

    def log_request(self, conn, info, t0, start_wall, status, fault, rule, result=None, extra=None,
                    code=None):
        st = self.state
        entry = {"t": start_wall, "seq": 0, "conn": conn.id, "client": info.client,
                 "service": info.service, "action": info.action, "params": info.params,
                 "status": status, "fault": fault, "rule": rule.id if rule else None,
                 "ms": round((time.monotonic() - t0) * 1000, 1), "result": result}
        if code:
            entry["code"] = code
        if extra:
            entry.update(extra)
        st.write_log(entry)
        key = f"{info.service}/{info.action}/{fault or status}"
        st.stats[key] = st.stats.get(key, 0) + 1

    async def handle_request(self, conn, up, req):
        """Handles one request; returns whether the client connection stays open."""
        st = self.state
        t0 = time.monotonic()
        start_wall = time.time()
        st.requests += 1
        info = identify(req)
        close = req.wants_close()
        head_only = req.method == "HEAD"
        rule = st.pick_rule(info)
        fault = rule.fault if rule else None

        if fault == "error":
            resp = error_response(info.service, info.action, rule.status, rule.code, rule.message)
            self.log_request(conn, info, t0, start_wall, rule.status, fault, rule, code=rule.code)
            await self.send(conn, resp, close, head_only)
            return not close
        if fault == "stall":
            self.log_request(conn, info, t0, start_wall, None, fault, rule,
                             extra={"seconds": rule.seconds})
            await asyncio.sleep(rule.seconds)
            return False
        if fault == "reset":
            self.log_request(conn, info, t0, start_wall, None, fault, rule)
            conn.dead = True
            rst(conn.writer.transport)
            return False
        if fault == "delay":
            await asyncio.sleep(rule.seconds)

        if fault != "forward_then_kill":
            hidden = self.hidden_answer(info)
            if hidden is not None:
                resp = error_response("iam", info.action, 404, "NoSuchEntity", hidden)
                self.log_request(conn, info, t0, start_wall, 404, "hidden", None, code="NoSuchEntity")
                await self.send(conn, resp, close, head_only)
                return not close

        await self.gate(conn)
        try:
            resp = await up.roundtrip(req)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, BadMessage) as e:
            msg = f"upstream {self.upstream[0]}:{self.upstream[1]} failed: {type(e).__name__}"
            resp = error_response(info.service, info.action, 502, "BadGateway", msg)
            self.log_request(conn, info, t0, start_wall, 502, fault, rule, code="BadGateway",
                             extra={"upstream_error": type(e).__name__})
            if fault == "forward_then_kill":
                conn.dead = True
                rst(conn.writer.transport)
                return False
            await self.send(conn, resp, True, head_only)
            return False

        result, code, removed = None, None, []
        if 200 <= resp.status < 300:
            result = parse_result(info.action, resp.body) if resp.body or info.action.startswith("Delete") \
                else None
            removed = self.after_success(info, resp, result)
            if removed and result is not None:
                result = parse_result(info.action, resp.body)
        elif resp.status >= 300 and resp.body and not head_only:
            code = error_code(resp.body)
        extra = {"hidden_removed": removed} if removed else {}

        if fault == "forward_then_kill":
            extra.update(self.kill(rule))
            self.log_request(conn, info, t0, start_wall, resp.status, fault, rule, result, extra, code)
            conn.dead = True
            rst(conn.writer.transport)
            return False

        self.log_request(conn, info, t0, start_wall, resp.status, fault, rule, result, extra, code)
        await self.send(conn, resp, close, head_only)
        return not close

    def kill(self, rule):
        pid = rule.pid
        try:
            if rule.pid_file is not None:
                with open(rule.pid_file, encoding="utf-8") as f:
                    pid = int(f.read().split()[0])
            os.kill(pid, rule.signal)
            eprint(f"rule {rule.id}: sent {rule.signal.name} to pid {pid}")
            return {"killed": pid, "signal": rule.signal.name}
        except (OSError, ValueError, IndexError) as e:
            eprint(f"rule {rule.id}: kill failed: {type(e).__name__}: {e}")
            return {"killed": None, "kill_error": f"{type(e).__name__}: {e}"}

    def hidden_answer(self, info):
        st = self.state
        if info.service != "iam" or (not st.hidden_users and not st.hidden_keys):
            return None
        user = info.params.get("UserName")
        if user and info.action in HIDDEN_USER_ACTIONS and st.is_hidden(st.hidden_users, user):
            return f"The user with name {user} cannot be found."
        key = info.params.get("AccessKeyId")
        if key and info.action in HIDDEN_KEY_ACTIONS and st.is_hidden(st.hidden_keys, key):
            return f"The Access Key with id {key} cannot be found."
        return None

    def after_success(self, info, resp, result):
        """Eventual consistency bookkeeping and response edits. Returns removed ids."""
        st = self.state
        if info.service != "iam":
            return []
        a = info.action
        if st.consistency > 0:
            until = time.time() + st.consistency
            if a == "CreateUser":
                name = (result or {}).get("UserName") or info.params.get("UserName")
                if name:
                    st.hidden_users[name] = until
            elif a == "CreateAccessKey":
                key = (result or {}).get("AccessKeyId")
                if key:
                    st.hidden_keys[key] = until
        if a == "DeleteUser":
            st.hidden_users.pop(info.params.get("UserName"), None)
        elif a == "DeleteAccessKey":
            st.hidden_keys.pop(info.params.get("AccessKeyId"), None)
        removed = []
        enc = resp.headers.tokens("content-encoding") - {"identity"}
        if enc or not resp.body:
            return []
        if a == "ListUsers" and st.hidden_users:
            hide = st.hidden_now(st.hidden_users)
            if hide:
                resp.body, removed = filter_members(resp.body, b"Users", "UserName", hide)
        elif a == "ListAccessKeys" and st.hidden_keys:
            hide = st.hidden_now(st.hidden_keys)
            if hide:
                resp.body, removed = filter_members(resp.body, b"AccessKeyMetadata", "AccessKeyId", hide)
        if removed:
            resp.modified = True
        return removed


# --------------------------------------------------------------------------- tcp mode

class Side(asyncio.Protocol):
    def __init__(self, pair, name):
        self.pair, self.name = pair, name
        self.transport = None
        self.pending = []  # read while the peer was not connected or the relay stalled
        self.write_blocked = False  # our send buffer is full: stop reading from the peer
        self.eof = False
        self.eof_sent = False
        self.lost = False

    @property
    def peer(self):
        return self.pair.up if self.name == "client" else self.pair.client

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.pair.bytes[self.name] += len(data)
        if self.pair.can_relay(self):
            self.peer.transport.write(data)
        else:  # at most what was in flight when reading was paused
            self.pending.append(data)

    def eof_received(self):
        self.eof = True
        if self.pair.can_relay(self) and not self.pending:
            self.pair.forward_eof(self)
        return True  # half-close: keep the transport open for the other direction

    def connection_lost(self, exc):
        self.lost = True
        self.pair.side_lost(self, exc)

    def pause_writing(self):
        self.write_blocked = True
        self.pair.update_reading()

    def resume_writing(self):
        self.write_blocked = False
        self.pair.update_reading()


class Pair:
    def __init__(self, relay, cid, peername):
        self.relay, self.id, self.peername = relay, cid, peername
        self.client = Side(self, "client")
        self.up = None
        self.bytes = {"client": 0, "up": 0}
        self.closed = False
        self.reason = None

    @property
    def state(self):
        return self.relay.state

    def can_relay(self, side):
        peer = side.peer
        return (self.state.tcp != "stall" and peer is not None and peer.transport is not None
                and not peer.lost)

    def update_reading(self):
        """Reads from a side only while its bytes can go on (peer connected, relay not
        stalled, peer's send buffer not full); pause/resume_reading are idempotent."""
        for side in (self.client, self.up):
            if side is None or side.transport is None or side.lost:
                continue
            if self.can_relay(side):
                if side.pending:
                    side.peer.transport.write(b"".join(side.pending))
                    side.pending = []
                if side.eof and not side.eof_sent:
                    self.forward_eof(side)
                    continue
                want = not side.peer.write_blocked
            else:
                want = False
            try:
                if want:
                    side.transport.resume_reading()
                else:
                    side.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def forward_eof(self, side):
        side.eof_sent = True
        peer = side.peer
        if peer.eof_sent:  # both directions finished
            self.close("eof")
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()
        else:
            self.close("eof")

    def mode_changed(self):
        self.update_reading()

    def reset(self):
        self.reason = "reset"
        for side in (self.client, self.up):
            if side is not None and side.transport is not None:
                rst(side.transport)

    def side_lost(self, side, exc):
        if self.reason is None:
            self.reason = f"{side.name} {'error ' + type(exc).__name__ if exc else 'closed'}"
        peer = side.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if exc is not None:
                rst(peer.transport)  # propagate a reset
            else:
                peer.transport.close()
        if peer is None or peer.transport is None or peer.lost:
            self.finish()

    def close(self, reason):
        if self.reason is None:
            self.reason = reason
        for side in (self.client, self.up):
            if side is not None and side.transport is not None and not side.lost:
                side.transport.close()
        if self.up is None or self.up.transport is None:
            self.finish()

    def finish(self):
        if self.closed:
            return
        self.closed = True
        self.state.conns.pop(self.id, None)
        self.state.write_log({"t": time.time(), "event": "close", "conn": self.id,
                              "mode": self.state.tcp, "reason": self.reason,
                              "bytes_in": self.bytes["client"], "bytes_out": self.bytes["up"]})


class TcpRelay:
    def __init__(self, state, upstream):
        self.state = state
        self.upstream = upstream
        self.tasks = set()

    def protocol(self):
        return ClientProtocol(self)


class ClientProtocol(Side):
    """The client side of a relayed connection; owns the Pair."""

    def __init__(self, relay):
        self.relay = relay
        pair = Pair(relay, relay.state.new_conn_id(), None)
        super().__init__(pair, "client")
        pair.client = self

    def connection_made(self, transport):
        super().connection_made(transport)
        st = self.relay.state
        pair = self.pair
        pair.peername = transport.get_extra_info("peername")
        peer = f"{pair.peername[0]}:{pair.peername[1]}" if pair.peername else None
        st.write_log({"t": time.time(), "event": "open", "conn": pair.id, "mode": st.tcp, "peer": peer})
        if st.tcp == "refuse":
            pair.reason = "refused"
            rst(transport)
            return
        # Not transport.pause_reading() here: on Python < 3.11.? the transport starts its
        # reader after connection_made regardless. update_reading runs after that.
        asyncio.get_running_loop().call_soon(pair.update_reading)
        st.conns[pair.id] = pair
        task = asyncio.get_running_loop().create_task(self.connect())
        self.relay.tasks.add(task)
        task.add_done_callback(self.relay.tasks.discard)

    async def connect(self):
        st = self.relay.state
        pair = self.pair
        await st.flow.wait()  # while stalled, not even the upstream sees a SYN
        if self.lost:
            return
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: Side(pair, "up"), *self.relay.upstream)
        except OSError as e:
            pair.reason = f"upstream connect failed: {type(e).__name__}"
            rst(self.transport)
            return
        pair.up = up
        if self.lost or pair.reason == "reset":
            rst(up.transport)
            return
        pair.update_reading()


# ------------------------------------------------------------------------ control API

class Control:
    def __init__(self, state):
        self.state = state

    async def handle(self, reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                try:
                    start, headers = parse_head(head)
                    method, target, version = start.split(" ")
                    body = b""
                    n = int(headers.get("content-length", "0") or 0)
                    if n:
                        body = await reader.readexactly(n)
                    status, obj = self.route(method, urllib.parse.urlsplit(target).path, body)
                    close = "close" in headers.tokens("connection") or version == "HTTP/1.0"
                except (BadMessage, ValueError):
                    status, obj, close = 400, {"error": "malformed request"}, True
                data = json.dumps(obj).encode()
                writer.write((f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
                              f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                              + ("Connection: close\r\n" if close else "") + "\r\n").encode() + data)
                await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception as e:
            eprint(f"control: internal error {type(e).__name__}: {e}")
        finally:
            writer.close()

    def route(self, method, path, body):
        st = self.state
        path = path.rstrip("/") or "/"
        try:
            obj = json.loads(body) if body.strip() else None
        except ValueError as e:
            return 400, {"error": f"bad JSON: {e}"}
        try:
            if path == "/state" and method == "GET":
                return 200, st.state_json()
            if path == "/stats" and method == "GET":
                return 200, dict(sorted(st.stats.items()))
            if path == "/rules":
                if method == "GET":
                    return 200, [r.to_json() for r in st.rules]
                if method in ("PUT", "POST") and st.mode != "aws":
                    raise ValueError("rules apply only in aws mode")
                if method == "PUT":
                    if not isinstance(obj, list):
                        raise ValueError("PUT /rules takes a JSON array of rules")
                    rules = [Rule(d, i + 1) for i, d in enumerate(obj)]
                    self.check_ids(rules)
                    st.rules = rules
                    eprint(f"rules replaced: {[r.id for r in rules]}")
                    return 200, st.state_json()
                if method == "POST":
                    rule = Rule(obj, len(st.rules) + 1)
                    self.check_ids(st.rules + [rule])
                    st.rules.append(rule)
                    eprint(f"rule added: {rule.id}")
                    return 200, st.state_json()
                if method == "DELETE":
                    st.rules = []
                    return 200, st.state_json()
            if path == "/consistency" and method in ("PUT", "POST"):
                if st.mode != "aws":
                    raise ValueError("consistency applies only in aws mode")
                if not isinstance(obj, dict) or set(obj) != {"consistency_seconds"}:
                    raise ValueError('body must be {"consistency_seconds": T}')
                t = obj["consistency_seconds"]
                if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
                    raise ValueError("consistency_seconds must be a non-negative number")
                st.consistency = float(t)
                if not t:
                    st.hidden_users.clear()
                    st.hidden_keys.clear()
                eprint(f"consistency_seconds = {t}")
                return 200, st.state_json()
            if path == "/tcp" and method in ("PUT", "POST"):
                if not isinstance(obj, dict) or set(obj) != {"tcp"} or obj["tcp"] not in TCP_MODES:
                    raise ValueError(f'body must be {{"tcp": one of {list(TCP_MODES)}}}')
                st.set_tcp(obj["tcp"])
                return 200, st.state_json()
            if path == "/reset" and method == "POST":
                st.rules = []
                st.consistency = 0.0
                st.hidden_users.clear()
                st.hidden_keys.clear()
                if st.tcp != "pass":
                    st.set_tcp("pass")
                eprint("reset")
                return 200, st.state_json()
        except ValueError as e:
            return 400, {"error": str(e)}
        if path in ("/state", "/stats", "/rules", "/consistency", "/tcp", "/reset"):
            return 405, {"error": f"method {method} not allowed on {path}"}
        return 404, {"error": f"no such endpoint {path}"}

    @staticmethod
    def check_ids(rules):
        ids = [r.id for r in rules]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate rule ids in {ids}")


# ------------------------------------------------------------------------------- main

async def main(args):
    listen = parse_hostport(args.listen, "--listen")
    control_addr = parse_hostport(args.control, "--control")
    upstream = parse_hostport(args.upstream, "--upstream")
    state = State(args.mode, args.log, args.seed)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.mode == "aws":
        proxy = AwsProxy(state, upstream)
        server = await asyncio.start_server(proxy.handle, *listen, limit=HEADER_LIMIT, backlog=256)
        relay = None
    else:
        relay = TcpRelay(state, upstream)
        server = await loop.create_server(relay.protocol, *listen, backlog=256)
    control = Control(state)
    cserver = await asyncio.start_server(control.handle, *control_addr, limit=HEADER_LIMIT)

    def addr(srv):
        h, p = srv.sockets[0].getsockname()[:2]
        return f"{h}:{p}"

    ready = json.dumps({"listen": addr(server), "control": addr(cserver), "pid": os.getpid()})
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(ready + "\n")
        os.replace(tmp, args.ready_file)
    print(ready, flush=True)
    eprint(f"mode {args.mode}, upstream {upstream[0]}:{upstream[1]}, log {args.log}")

    await stop.wait()
    eprint("stopping")
    server.close()
    cserver.close()
    for c in list(state.conns.values()):
        if isinstance(c, Pair):
            for side in (c.client, c.up):
                if side is not None and side.transport is not None:
                    side.transport.abort()
        else:
            c.writer.transport.abort()
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    state.log.close()


def cli():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="127.0.0.1:PORT (0 = pick a free port)")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    p.add_argument("--mode", required=True, choices=("aws", "tcp"))
    p.add_argument("--control", required=True, help="127.0.0.1:PORT (0 = pick a free port)")
    p.add_argument("--log", required=True, help="JSON-lines log, appended")
    p.add_argument("--ready-file", help="where to write the ready line (atomically)")
    p.add_argument("--seed", type=int, default=None, help="seed for the probability draws")
    args = p.parse_args()
    try:
        asyncio.run(main(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(cli())
