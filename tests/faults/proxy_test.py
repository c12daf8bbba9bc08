#!/usr/bin/env python3
"""Self-test of tests/faults/proxy.py.

    python tests/faults/proxy_test.py        (any python 3.11: re-executes itself with the
                                              testbed's moto venv, which has boto3 and moto)

Starts its own moto server on a free port (no auth enforcement), its own proxies (aws
mode in front of moto, tcp mode in front of moto, aws mode in front of a tiny fake IAM
that answers chunked and keeps connections alive), runs the checks, prints one line per
check, stops everything it started (by pid) and exits non-zero if a check failed.
The venv: $S3GRANT_TESTBED_CACHE (default ~/.cache/s3grant-testbed)/venv-moto-*/bin/python.
"""

import glob
import os
import sys


def _ensure_venv():
    """Run under the testbed's moto venv (the moto version the testbed pins), if there is one."""
    cache = os.environ.get("S3GRANT_TESTBED_CACHE", os.path.expanduser("~/.cache/s3grant-testbed"))
    pythons = sorted(glob.glob(os.path.join(cache, "venv-moto-*", "bin", "python")))
    venvs = [os.path.dirname(os.path.dirname(p)) for p in pythons]
    if pythons and os.path.realpath(sys.prefix) not in map(os.path.realpath, venvs) \
            and not os.environ.get("PROXY_TEST_REEXEC"):
        os.environ["PROXY_TEST_REEXEC"] = "1"
        os.execv(pythons[-1], [pythons[-1], os.path.abspath(__file__)] + sys.argv[1:])
    try:
        import boto3  # noqa: F401
        import botocore  # noqa: F401
    except ImportError:
        sys.exit(f"proxy_test: boto3 is not importable and there is no moto venv under {cache} "
                 "(run tests/testbed/moto.sh install)")
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "moto_server")):
        sys.exit(f"proxy_test: no moto_server next to {sys.executable}")


_ensure_venv()

import http.client  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import urllib.parse  # noqa: E402

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402
from botocore.config import Config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = os.path.join(HERE, "proxy.py")
VENV_BIN = os.path.dirname(sys.executable)
FAKE_AUTH = ("AWS4-HMAC-SHA256 Credential=AKIAFAULTTEST000000/20240101/us-east-1/iam/aws4_request, "
             "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64)

RESULTS = []
PROCS = []  # (name, Popen) started by this test, stopped at the end
TMP = tempfile.mkdtemp(prefix="proxy-test-")


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok)))
    line = f"{'PASS' if ok else 'FAIL'}  {name}"
    if detail and not ok:
        line += f"  -- {detail}"
    elif detail:
        line += f"  ({detail})"
    print(line, flush=True)
    return ok


def run_check(name, fn):
    try:
        fn()
    except Exception as e:  # a crash in a check is a failed check, not an abort
        check(name, False, f"{type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stdout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not open after {timeout}s")


def start_moto():
    port = free_port()
    env = dict(os.environ)
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    log = open(os.path.join(TMP, "moto.log"), "w")
    p = subprocess.Popen([os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    PROCS.append(("moto", p))
    wait_port(port, 60, p)
    return port


class Proxy:
    def __init__(self, name, mode, upstream_port, extra=()):
        self.name = name
        self.log = os.path.join(TMP, f"{name}.log")
        self.ready = os.path.join(TMP, f"{name}.ready")
        self.stdout = os.path.join(TMP, f"{name}.stdout")
        self.stderr = os.path.join(TMP, f"{name}.stderr")
        self.proc = subprocess.Popen(
            [sys.executable, PROXY, "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}",
             "--mode", mode, "--control", "127.0.0.1:0", "--log", self.log, "--ready-file", self.ready,
             *extra],
            stdout=open(self.stdout, "w"), stderr=open(self.stderr, "w"), stdin=subprocess.DEVNULL,
            start_new_session=True)
        PROCS.append((name, self.proc))
        deadline = time.time() + 10
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"proxy {name} did not start: {open(self.stderr).read()[-2000:]}")
            time.sleep(0.05)
        self.info = json.loads(open(self.ready).read())
        self.port = int(self.info["listen"].rsplit(":", 1)[1])
        self.cport = int(self.info["control"].rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def ctl(self, method, path, body=None, raw=None):
        c = http.client.HTTPConnection("127.0.0.1", self.cport, timeout=10)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        out = json.loads(r.read() or b"null")
        c.close()
        return r.status, out

    def put_rules(self, rules):
        status, out = self.ctl("PUT", "/rules", rules)
        assert status == 200, out
        return out

    def entries(self):
        with open(self.log, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def new_entries(self, since):
        return [e for e in self.entries() if e["seq"] > since]

    def last_seq(self):
        es = self.entries()
        return es[-1]["seq"] if es else 0


def client(service, endpoint, read_timeout=10, app="test-client", **kw):
    # NB: botocore's retries "max_attempts" counts RETRIES (max_attempts=1 means 2 attempts);
    # "total_max_attempts": 1 is what turns retries off.
    cfg = Config(user_agent_appid=app, retries={"total_max_attempts": 1, "mode": "standard"},
                 read_timeout=read_timeout, connect_timeout=3, **kw)
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="AKIAFAULTTEST000000", aws_secret_access_key="fault-test-secret",
                        config=cfg)


def error_code(e):
    return e.response.get("Error", {}).get("Code"), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class Raw:
    """A raw HTTP/1.1 client connection (keep-alive), for what boto3 cannot show."""

    def __init__(self, port, timeout=5):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _until(self, marker):
        while marker not in self.buf:
            self._fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send_iam(self, action, extra_headers=(), chunks=None, **params):
        body = urllib.parse.urlencode({"Action": action, "Version": "2010-05-08", **params}).encode()
        headers = [("Host", f"127.0.0.1:{self.port}"), ("Authorization", FAKE_AUTH),
                   ("X-Amz-Date", "20240101T000000Z"), ("User-Agent", "raw-test app/raw-client"),
                   ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"), *extra_headers]
        if chunks is None:
            headers.append(("Content-Length", str(len(body))))
        else:
            headers.append(("Transfer-Encoding", "chunked"))
        head = f"POST / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.sock.sendall(head.encode())
        return body

    def send_chunked_body(self, body, n):
        step = max(1, len(body) // n)
        for i in range(0, len(body), step):
            part = body[i:i + step]
            self.sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        self.sock.sendall(b"0\r\n\r\n")

    def request_iam(self, action, **params):
        body = self.send_iam(action, **params)
        self.sock.sendall(body)
        return self.response()

    def response(self, head_only=False):
        head = self._until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200:
            return status, headers, b""
        if head_only:
            return status, headers, b""
        if "chunked" in headers.get("transfer-encoding", ""):
            body = b""
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._until(b"\r\n")
                    break
                body += self._exact(size + 2)[:-2]
        else:
            body = self._exact(int(headers.get("content-length", "0")))
        return status, headers, body


def expect_reset(fn):
    """Runs fn, returns 'rst' if it raised ECONNRESET, 'eof' on a clean close, else what it got."""
    try:
        out = fn()
        return f"no error: {out!r}"[:200]
    except ConnectionResetError:
        return "rst"
    except (EOFError, BrokenPipeError):
        return "eof"
    except socket.timeout:
        return "timeout"


# ------------------------------------------------------------------------------ fake IAM
class FakeIam(http.server.BaseHTTPRequestHandler):
    """Answers chunked, HTTP/1.1 keep-alive: exercises the proxy's other response path."""
    protocol_version = "HTTP/1.1"
    users = ["visible-user"]
    peers = set()

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.peers.add(self.client_address[1])
        n = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(n).decode())
        action = form.get("Action", [""])[0]
        name = form.get("UserName", [""])[0]
        ns = 'xmlns="https://iam.amazonaws.com/doc/2010-05-08/"'
        if action == "CreateUser":
            self.users.append(name)
            body = (f"<CreateUserResponse {ns}><CreateUserResult><User><Path>/</Path><UserName>{name}"
                    f"</UserName><UserId>AIDA{name.upper()}</UserId></User></CreateUserResult>"
                    f"</CreateUserResponse>")
        elif action == "ListUsers":
            members = "".join(f"<member><Path>/</Path><UserName>{u}</UserName><UserId>AIDA{u.upper()}"
                              f"</UserId><Tags><member><Key>k</Key><Value>v</Value></member></Tags></member>"
                              for u in self.users)
            body = (f"<ListUsersResponse {ns}><ListUsersResult><Users>{members}</Users>"
                    f"<IsTruncated>false</IsTruncated></ListUsersResult></ListUsersResponse>")
        else:
            body = f"<{action}Response {ns}><{action}Result/></{action}Response>"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(data), 50):
            part = data[i:i + 50]
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


# ---------------------------------------------------------------------------------- checks
def main():
    import botocore
    import moto
    print(f"python {sys.executable}, botocore {botocore.__version__}, moto {moto.__version__}", flush=True)
    moto_port = start_moto()
    moto_url = f"http://127.0.0.1:{moto_port}"
    aws = Proxy("aws", "aws", moto_port, ["--seed", "1"])
    tcp = Proxy("tcp", "tcp", moto_port)
    fake_srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeIam)
    fake_srv.daemon_threads = True
    fake_srv.handle_error = lambda request, address: None  # resets are what we test
    threading.Thread(target=fake_srv.serve_forever, daemon=True).start()
    fake = Proxy("fake", "aws", fake_srv.server_address[1])
    tcpfake = Proxy("tcpfake", "tcp", fake_srv.server_address[1])

    iam = client("iam", aws.url)
    direct = client("iam", moto_url)
    secrets = []

    def ready_line():
        info = aws.info
        stdout_line = open(aws.stdout).readline().strip()
        check("ready file and stdout carry listen/control/pid",
              set(info) == {"listen", "control", "pid"} and info["pid"] == aws.proc.pid
              and json.loads(stdout_line) == info, f"{info} / {stdout_line}")
    run_check("ready line", ready_line)

    def user_agent():
        seen = {}

        def grab(request, **_):
            seen.update({k: v for k, v in request.headers.items()
                         if k.lower() in ("user-agent", "x-amz-user-agent")})
        c = client("iam", aws.url)
        c.meta.events.register("before-send.iam", grab)
        c.list_users()
        hdr = [f"{k}" for k, v in seen.items() if "app/test-client" in str(v)]
        check("botocore sends app/<appid> in a user-agent header", hdr, f"{hdr} of {sorted(seen)}")
    run_check("user agent", user_agent)

    def lifecycle():
        since = aws.last_seq()
        iam.create_user(UserName="u1", Path="/s3grant/")
        key = iam.create_access_key(UserName="u1")["AccessKey"]
        secrets.append(key["SecretAccessKey"])
        listed = [k["AccessKeyId"] for k in iam.list_access_keys(UserName="u1")["AccessKeyMetadata"]]
        iam.delete_access_key(UserName="u1", AccessKeyId=key["AccessKeyId"])
        iam.delete_user(UserName="u1")
        check("IAM lifecycle through the proxy (boto3)", listed == [key["AccessKeyId"]], str(listed))
        es = {e["action"]: e for e in aws.new_entries(since)}
        want = ["CreateUser", "CreateAccessKey", "ListAccessKeys", "DeleteAccessKey", "DeleteUser"]
        ok = all(a in es for a in want)
        ok = ok and all(es[a]["service"] == "iam" and es[a]["client"] == "test-client"
                        and es[a]["status"] == 200 and es[a]["fault"] is None
                        and es[a]["params"].get("UserName") == "u1" for a in want)
        cu, ck = es.get("CreateUser", {}), es.get("CreateAccessKey", {})
        ok = ok and cu["result"]["UserName"] == "u1" and cu["result"]["UserId"]
        ok = ok and ck["result"] == {"UserName": "u1", "AccessKeyId": key["AccessKeyId"],
                                     "CreateDate": ck["result"]["CreateDate"]} and ck["result"]["CreateDate"]
        ok = ok and es["DeleteAccessKey"]["params"]["AccessKeyId"] == key["AccessKeyId"]
        ok = ok and es["DeleteUser"]["result"] == {} and es["DeleteAccessKey"]["result"] == {}
        check("log: service, action, params, result, client per call", ok,
              json.dumps([es.get(a) for a in want])[:1500])
        text = open(aws.log).read()
        check("log holds no secret key, no Authorization", key["SecretAccessKey"] not in text
              and "SecretAccessKey" not in text and "Signature=" not in text
              and "AWS4-HMAC" not in text)
    run_check("lifecycle", lifecycle)

    iam.create_user(UserName="keeper")  # a user that exists for the fault checks

    def error_rule():
        since = aws.last_seq()
        aws.put_rules([{"id": "t1", "action": "GetUser", "service": "iam", "fault": "error",
                        "status": 400, "code": "Throttling", "message": "Rate exceeded"}])
        try:
            iam.get_user(UserName="keeper")
            got = "no error"
        except botocore.exceptions.ClientError as e:
            got = error_code(e) + (e.response["Error"].get("Message"),)
        e = [x for x in aws.new_entries(since) if x["action"] == "GetUser"]
        check("error rule: boto3 sees Throttling/400", got == ("Throttling", 400, "Rate exceeded"), str(got))
        check("error rule logged (fault=error, rule=t1, status 400)",
              e and e[-1]["fault"] == "error" and e[-1]["rule"] == "t1" and e[-1]["status"] == 400, str(e))
        aws.put_rules([{"id": "t5", "action": "*", "service": "iam", "fault": "error",
                        "status": 503, "code": "ServiceUnavailable", "message": "down"}])
        try:
            iam.list_users()
            got = "no error"
        except botocore.exceptions.ClientError as e:
            got = error_code(e) + (e.response["Error"].get("Type"),)
        check("error rule 503: ServiceUnavailable, Type Receiver", got == ("ServiceUnavailable", 503, "Receiver"),
              str(got))
        aws.put_rules([{"id": "sts-only", "action": "*", "service": "sts", "fault": "error"}])
        iam.get_user(UserName="keeper")
        check("service filter: an sts rule leaves iam alone", True)
    run_check("error rule", error_rule)

    def count_rule():
        aws.put_rules([{"id": "c2", "action": "GetUser", "fault": "error", "code": "Throttling", "count": 2}])
        outcomes = []
        for _ in range(4):
            try:
                iam.get_user(UserName="keeper")
                outcomes.append("ok")
            except botocore.exceptions.ClientError as e:
                outcomes.append(error_code(e)[0])
        _, rules = aws.ctl("GET", "/rules")
        check("count: a rule fires N times, then is spent",
              outcomes == ["Throttling", "Throttling", "ok", "ok"] and rules[0]["fired"] == 2,
              f"{outcomes} {rules}")
    run_check("count", count_rule)

    def probability_rule():
        aws.put_rules([{"id": "p0", "action": "*", "fault": "error", "probability": 0},
                       {"id": "p1", "action": "*", "fault": "error", "probability": 0.5, "code": "Throttling"}])
        outcomes = []
        for _ in range(40):
            try:
                iam.get_user(UserName="keeper")
                outcomes.append("ok")
            except botocore.exceptions.ClientError:
                outcomes.append("err")
        _, st = aws.ctl("GET", "/state")
        fired = {r["id"]: r["fired"] for r in st["rules"]}
        check("probability 0 never fires", fired["p0"] == 0, str(fired))
        check("probability 0.5 fires sometimes", 5 <= fired["p1"] <= 35 and outcomes.count("err") == fired["p1"],
              str(fired))
    run_check("probability", probability_rule)

    def stall_rule():
        aws.put_rules([{"id": "s1", "action": "GetUser", "fault": "stall", "seconds": 5, "count": 1}])
        slow = client("iam", aws.url, read_timeout=2)
        out = {}

        def victim():
            t0 = time.time()
            try:
                slow.get_user(UserName="keeper")
                out["r"] = "answered"
            except botocore.exceptions.ReadTimeoutError:
                out["r"] = "timeout"
            except Exception as e:
                out["r"] = type(e).__name__
            out["t"] = time.time() - t0
        th = threading.Thread(target=victim)
        th.start()
        time.sleep(0.3)
        t0 = time.time()
        others = 0
        while th.is_alive() and others < 10:
            iam.list_users()
            others += 1
        others_t = time.time() - t0
        th.join()
        check("stall: the stalled client times out (2 s read timeout)",
              out["r"] == "timeout" and 1.8 <= out["t"] < 4, str(out))
        check("stall: other connections keep working meanwhile", others == 10 and others_t < 2,
              f"{others} calls in {others_t:.2f}s")
        iam.get_user(UserName="keeper")
    run_check("stall", stall_rule)

    def reset_rule():
        since = aws.last_seq()
        aws.put_rules([{"id": "x1", "action": "GetUser", "fault": "reset", "count": 2}])
        try:
            iam.get_user(UserName="keeper")
            got = "no error"
        except (botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.HTTPClientError) as e:
            got = type(e).__name__
        check("reset: boto3 gets a connection error", got != "no error", got)
        r = Raw(aws.port)
        got = expect_reset(lambda: r.request_iam("GetUser", UserName="keeper"))
        r.close()
        check("reset: the client sees a TCP RST (ECONNRESET)", got == "rst", got)
        e = [x for x in aws.new_entries(since) if x["fault"] == "reset"]
        check("reset logged", len(e) == 2 and e[0]["rule"] == "x1", str(e))
        iam.get_user(UserName="keeper")
    run_check("reset", reset_rule)

    def delay_rule():
        aws.put_rules([{"id": "d1", "action": "GetUser", "fault": "delay", "seconds": 1, "count": 1}])
        t0 = time.time()
        iam.get_user(UserName="keeper")
        dt = time.time() - t0
        e = aws.entries()[-1]
        check("delay: forwarded after the delay", 1 <= dt < 3 and e["fault"] == "delay" and e["status"] == 200,
              f"{dt:.2f}s {e}")
    run_check("delay", delay_rule)

    def forward_then_kill():
        since = aws.last_seq()
        child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        PROCS.append(("sleep", child))
        pid_file = os.path.join(TMP, "victim.pid")
        with open(pid_file, "w") as f:
            f.write(f"{child.pid}\n")
        aws.put_rules([{"id": "k1", "action": "CreateUser", "fault": "forward_then_kill",
                        "pid_file": pid_file, "count": 1}])
        try:
            iam.create_user(UserName="committed-user")
            got = "answered"
        except (botocore.exceptions.ConnectionClosedError, botocore.exceptions.HTTPClientError) as e:
            got = type(e).__name__
        try:
            rc = child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = "still running"
        exists = direct.get_user(UserName="committed-user")["User"]["UserName"]
        e = [x for x in aws.new_entries(since) if x["action"] == "CreateUser"]
        check("forward_then_kill: the client gets no answer", got != "answered", got)
        check("forward_then_kill: the child was SIGKILLed", rc == -signal.SIGKILL, str(rc))
        check("forward_then_kill: the change is committed upstream", exists == "committed-user")
        check("forward_then_kill logged with upstream status and result",
              e and e[-1]["fault"] == "forward_then_kill" and e[-1]["status"] == 200
              and e[-1]["result"]["UserName"] == "committed-user" and e[-1]["killed"] == child.pid, str(e))
    run_check("forward_then_kill", forward_then_kill)

    def consistency():
        aws.ctl("POST", "/reset")
        since = aws.last_seq()
        st, _ = aws.ctl("PUT", "/consistency", {"consistency_seconds": 2})
        iam.create_user(UserName="ghost")
        t_created = time.time()
        try:
            iam.get_user(UserName="ghost")
            got = "visible"
        except botocore.exceptions.ClientError as e:
            got = error_code(e) + (e.response["Error"]["Message"],)
        listed = [u["UserName"] for u in iam.list_users()["Users"]]
        direct_listed = [u["UserName"] for u in direct.list_users()["Users"]]
        try:
            iam.create_access_key(UserName="ghost")
            ck = "created"
        except botocore.exceptions.ClientError as e:
            ck = error_code(e)[0]
        hidden_window = time.time() - t_created < 2
        check("consistency: GetUser of a new user is NoSuchEntity/404",
              got == ("NoSuchEntity", 404, "The user with name ghost cannot be found."), str(got))
        check("consistency: ListUsers omits it (moto has it)",
              "ghost" not in listed and "keeper" in listed and "ghost" in direct_listed,
              f"{listed} / {direct_listed}")
        check("consistency: CreateAccessKey for it is NoSuchEntity", ck == "NoSuchEntity" and hidden_window, ck)
        # a key of a visible user
        key = iam.create_access_key(UserName="keeper")["AccessKey"]
        secrets.append(key["SecretAccessKey"])
        t_key = time.time()
        keys = [k["AccessKeyId"] for k in iam.list_access_keys(UserName="keeper")["AccessKeyMetadata"]]
        try:
            iam.delete_access_key(UserName="keeper", AccessKeyId=key["AccessKeyId"])
            dk = "deleted"
        except botocore.exceptions.ClientError as e:
            dk = error_code(e)[0]
        check("consistency: a new key is missing from ListAccessKeys, DeleteAccessKey is NoSuchEntity",
              key["AccessKeyId"] not in keys and dk == "NoSuchEntity" and time.time() - t_key < 2, f"{keys} {dk}")
        time.sleep(max(0, t_key + 2.1 - time.time()))
        user = iam.get_user(UserName="ghost")["User"]["UserName"]
        listed = [u["UserName"] for u in iam.list_users()["Users"]]
        keys = [k["AccessKeyId"] for k in iam.list_access_keys(UserName="keeper")["AccessKeyMetadata"]]
        iam.delete_access_key(UserName="keeper", AccessKeyId=key["AccessKeyId"])
        check("consistency: visible after T seconds", user == "ghost" and "ghost" in listed
              and key["AccessKeyId"] in keys, f"{listed} {keys}")
        hidden = [e for e in aws.new_entries(since) if e["fault"] == "hidden"]
        check("consistency: hidden answers logged as fault=hidden",
              {e["action"] for e in hidden} >= {"GetUser", "CreateAccessKey", "DeleteAccessKey"}, str(hidden))
        aws.ctl("PUT", "/consistency", {"consistency_seconds": 0})
    run_check("consistency", consistency)

    def fake_upstream():
        # chunked responses, keep-alive upstream, rewrite of a chunked ListUsers body
        fake.ctl("PUT", "/consistency", {"consistency_seconds": 30})
        r = Raw(fake.port)
        s1, h1, b1 = r.request_iam("GetUser", UserName="visible-user")
        s2, h2, b2 = r.request_iam("CreateUser", UserName="shadow")
        s3, h3, b3 = r.request_iam("ListUsers")
        r.close()
        check("chunked response relayed as is", s1 == 200 and "chunked" in h1.get("transfer-encoding", "")
              and b1.startswith(b"<GetUserResponse"), f"{s1} {h1}")
        check("rewritten chunked body: re-framed with Content-Length, hidden member gone",
              s3 == 200 and "transfer-encoding" not in h3 and int(h3["content-length"]) == len(b3)
              and b"shadow" not in b3 and b3.count(b"<UserName>visible-user</UserName>") == 1
              and b3.count(b"<Key>k</Key>") == 1 and b3.endswith(b"</ListUsersResponse>"), f"{h3} {b3[:400]}")
        e = fake.entries()
        check("rewrite logged (hidden_removed) and keep-alive upstream reused",
              e[-1].get("hidden_removed") == ["shadow"] and e[-1]["result"] == {"UserNames": ["visible-user"]}
              and len({x["conn"] for x in e}) == 1 and len(FakeIam.peers) == 1,
              f"{e[-1]} upstream connections {len(FakeIam.peers)}")
    run_check("fake upstream", fake_upstream)

    def chunked_expect():
        since = aws.last_seq()
        r = Raw(aws.port)
        body = r.send_iam("GetUser", extra_headers=[("Expect", "100-continue")], chunks=True,
                          UserName="keeper")
        s0, _, _ = r.response()
        r.send_chunked_body(body, 4)
        s1, h1, b1 = r.response()
        # HEAD on the same connection: no body may follow
        r.sock.sendall(f"HEAD /keeper-bucket HTTP/1.1\r\nHost: 127.0.0.1:{aws.port}\r\n\r\n".encode())
        s2, h2, _ = r.response(head_only=True)
        s3, _, b3 = r.request_iam("GetUser", UserName="keeper")
        r.close()
        e = aws.new_entries(since)
        check("Expect: 100-continue answered, chunked request body parsed and forwarded",
              s0 == 100 and s1 == 200 and b"<UserName>keeper</UserName>" in b1
              and e[0]["action"] == "GetUser" and e[0]["params"] == {"UserName": "keeper"}
              and e[0]["client"] == "raw-client", f"{s0} {s1} {e[:1]}")
        check("HEAD response without body, connection still usable", s2 < 600 and s3 == 200
              and b"keeper" in b3 and e[1]["action"] == "s3:HEAD", f"{s2} {s3}")
    run_check("chunked/expect/head", chunked_expect)

    def s3_calls():
        since = aws.last_seq()
        s3 = client("s3", aws.url, s3={"addressing_style": "path"})
        s3.create_bucket(Bucket="fault-bucket")
        s3.put_object(Bucket="fault-bucket", Key="a/b.txt", Body=b"x" * 100000)
        head = s3.head_object(Bucket="fault-bucket", Key="a/b.txt")
        got = s3.get_object(Bucket="fault-bucket", Key="a/b.txt")["Body"].read()
        e = aws.new_entries(since)
        check("S3 REST through the proxy (put 100 kB, head, get)",
              len(got) == 100000 and head["ContentLength"] == 100000
              and [x["action"] for x in e] == ["s3:PUT", "s3:PUT", "s3:HEAD", "s3:GET"]
              and all(x["service"] == "s3" for x in e), str([(x["action"], x["status"]) for x in e]))
        aws.put_rules([{"id": "s3e", "action": "s3:GET", "service": "s3", "fault": "error",
                        "status": 503, "code": "SlowDown", "message": "slow"}])
        try:
            s3.get_object(Bucket="fault-bucket", Key="a/b.txt")
            code = "none"
        except botocore.exceptions.ClientError as ex:
            code = error_code(ex)
        check("S3 error rule: S3-style error body", code == ("SlowDown", 503), str(code))
        aws.ctl("DELETE", "/rules")
    run_check("s3", s3_calls)

    def aws_tcp_modes():
        aws.ctl("PUT", "/tcp", {"tcp": "stall"})
        slow = client("iam", aws.url, read_timeout=2)
        try:
            slow.get_user(UserName="keeper")
            got = "answered"
        except botocore.exceptions.ReadTimeoutError:
            got = "timeout"
        aws.ctl("PUT", "/tcp", {"tcp": "pass"})
        iam.get_user(UserName="keeper")
        check("aws mode, tcp stall: no answer; pass: works again", got == "timeout", got)
        r = Raw(aws.port)
        s, _, _ = r.request_iam("GetUser", UserName="keeper")
        aws.ctl("PUT", "/tcp", {"tcp": "reset"})
        got = expect_reset(lambda: r.request_iam("GetUser", UserName="keeper"))
        r.close()
        _, st = aws.ctl("GET", "/state")
        check("aws mode, tcp reset: open connection gets RST, mode back to pass",
              s == 200 and got == "rst" and st["tcp"] == "pass", f"{got} {st['tcp']}")
    run_check("aws tcp modes", aws_tcp_modes)

    def tcp_mode():
        since = tcp.last_seq()
        r = Raw(tcp.port, timeout=2)
        s, h, b = r.request_iam("GetUser", UserName="keeper")
        check("tcp mode relays HTTP to moto", s == 200 and b"<UserName>keeper</UserName>" in b, f"{s}")
        r.close()
        # request, then FIN at once (before the proxy has its upstream connection): held, relayed
        r = Raw(tcp.port, timeout=5)
        r.sock.sendall(r.send_iam("GetUser", UserName="keeper"))
        r.sock.shutdown(socket.SHUT_WR)
        s, _, b = r.response()
        r.close()
        check("tcp mode: half-close right after the request still gets the answer",
              s == 200 and b"keeper" in b, f"{s}")
        s3 = client("s3", f"http://127.0.0.1:{tcp.port}", s3={"addressing_style": "path"})
        s3.create_bucket(Bucket="tcp-bucket")
        blob = os.urandom(8 << 20)
        s3.put_object(Bucket="tcp-bucket", Key="big", Body=blob)
        back = s3.get_object(Bucket="tcp-bucket", Key="big")["Body"].read()
        check("tcp mode: 8 MiB up and down intact", back == blob, f"{len(back)} bytes")
        # moto closes after each response, so hold a fresh connection across the stall
        tcp.ctl("PUT", "/tcp", {"tcp": "stall"})
        r = Raw(tcp.port, timeout=2)  # accepted while stalled
        body = r.send_iam("GetUser", UserName="keeper")
        r.sock.sendall(body)
        got = expect_reset(lambda: r.response())
        tcp.ctl("PUT", "/tcp", {"tcp": "pass"})
        r.sock.settimeout(5)
        s, _, b = r.response()
        r.close()
        check("tcp stall: no answer (client timeout); pass: the held request is answered",
              got == "timeout" and s == 200 and b"keeper" in b, f"{got} {s}")
        # stall an existing keep-alive connection (the fake IAM keeps it open), then pass
        r = Raw(tcpfake.port, timeout=2)
        s1, _, _ = r.request_iam("GetUser", UserName="visible-user")
        tcpfake.ctl("PUT", "/tcp", {"tcp": "stall"})
        r.sock.sendall(r.send_iam("GetUser", UserName="visible-user"))
        got = expect_reset(lambda: r.response())
        tcpfake.ctl("PUT", "/tcp", {"tcp": "pass"})
        r.sock.settimeout(5)
        s2, _, _ = r.response()
        s3, _, _ = r.request_iam("GetUser", UserName="visible-user")
        r.close()
        check("tcp stall on an open keep-alive connection: held, then relayed on pass",
              s1 == 200 and got == "timeout" and s2 == 200 and s3 == 200, f"{s1} {got} {s2} {s3}")
        # reset an open keep-alive connection (through a tcp proxy in front of the fake IAM,
        # which keeps connections open; moto closes after each response)
        r = Raw(tcpfake.port, timeout=3)
        s1, _, _ = r.request_iam("GetUser", UserName="visible-user")
        tcpfake.ctl("PUT", "/tcp", {"tcp": "reset"})
        got = expect_reset(lambda: r.request_iam("GetUser", UserName="visible-user"))
        r.close()
        _, st = tcpfake.ctl("GET", "/state")
        r = Raw(tcp.port)
        s, _, _ = r.request_iam("GetUser", UserName="keeper")
        r.close()
        r = Raw(tcpfake.port)
        s2, _, _ = r.request_iam("GetUser", UserName="visible-user")
        r.close()
        check("tcp reset: open keep-alive connection gets RST; one-shot, back to pass",
              s1 == 200 and got == "rst" and st["tcp"] == "pass" and s == 200 and s2 == 200,
              f"{s1} {got} {st['tcp']} {s} {s2}")
        tcp.ctl("PUT", "/tcp", {"tcp": "refuse"})
        r = Raw(tcp.port)
        got = expect_reset(lambda: (r.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                                    time.sleep(0.2), r.response()))
        r.close()
        tcp.ctl("PUT", "/tcp", {"tcp": "pass"})
        r = Raw(tcp.port)
        s, _, _ = r.request_iam("GetUser", UserName="keeper")
        r.close()
        check("tcp refuse: new connections reset; pass: accepted again", got == "rst" and s == 200,
              f"{got} {s}")
        e = tcp.new_entries(since)
        events = {x["event"] for x in e}
        modes = [x["mode"] for x in e if x["event"] == "mode"]
        check("tcp log: open/close/mode events", events == {"open", "close", "mode"}
              and modes == ["stall", "pass", "refuse", "pass"]
              and all(set(x) >= {"t", "event", "conn", "mode", "seq"} for x in e), str(modes))
        fe = tcpfake.entries()
        check("tcp log: the reset connection logged as closed by reset",
              any(x["event"] == "close" and x["reason"] == "reset" for x in fe), str(fe)[:800])
    run_check("tcp", tcp_mode)

    def reset_endpoint():
        aws.put_rules([{"id": "z", "action": "*", "fault": "error"}])
        aws.ctl("PUT", "/consistency", {"consistency_seconds": 5})
        aws.ctl("PUT", "/tcp", {"tcp": "stall"})
        size = os.path.getsize(aws.log)
        status, st = aws.ctl("POST", "/reset")
        iam.get_user(UserName="keeper")
        check("POST /reset clears rules, consistency, tcp mode; keeps the log",
              status == 200 and st["rules"] == [] and st["consistency_seconds"] == 0 and st["tcp"] == "pass"
              and os.path.getsize(aws.log) >= size, str(st))
    run_check("/reset", reset_endpoint)

    def control_errors():
        bad = [("PUT", "/rules", b"{not json"), ("PUT", "/rules", b'{"fault": "error"}'),
               ("POST", "/rules", b'{"fault": "explode"}'), ("POST", "/rules", b'{"fault": "error", "probabilty": 1}'),
               ("POST", "/rules", b'{"fault": "forward_then_kill"}'),
               ("PUT", "/consistency", b'{"consistency_seconds": -1}'), ("PUT", "/tcp", b'{"tcp": "maybe"}')]
        out = [aws.ctl(m, p, raw=b) for m, p, b in bad]
        ok = all(s == 400 and isinstance(o, dict) and o.get("error") for s, o in out)
        s_tcp, _ = tcp.ctl("PUT", "/rules", [{"fault": "error"}])
        _, stats = aws.ctl("GET", "/stats")
        check("control: bad bodies get 400 {\"error\"}", ok and s_tcp == 400, str(out))
        check("GET /stats counts service/action/outcome",
              stats.get("iam/CreateUser/200", 0) >= 2 and stats.get("iam/GetUser/error", 0) >= 3
              and stats.get("iam/GetUser/hidden", 0) >= 1, json.dumps(stats)[:600])
    run_check("control errors", control_errors)

    def throughput():
        def run(port, n):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            body = urllib.parse.urlencode({"Action": "GetUser", "Version": "2010-05-08",
                                           "UserName": "keeper"}).encode()
            headers = {"Authorization": FAKE_AUTH, "X-Amz-Date": "20240101T000000Z",
                       "Content-Type": "application/x-www-form-urlencoded"}
            ok = 0
            t0 = time.time()
            for _ in range(n):
                c.request("POST", "/", body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                ok += r.status == 200 and b"keeper" in data
            dt = time.time() - t0
            c.close()
            return ok, n / dt
        since = aws.last_seq()
        ok, rps_proxy = run(aws.port, 500)
        conns = {e["conn"] for e in aws.new_entries(since)}
        ok_d, rps_direct = run(moto_port, 500)
        check("500 sequential requests over one keep-alive connection",
              ok == 500 and len(conns) == 1, f"{ok} ok, conns {conns}")
        check("throughput >= 200 req/s through the proxy", rps_proxy >= 200 or rps_proxy >= 0.8 * rps_direct,
              f"proxy {rps_proxy:.0f} req/s, direct to moto {rps_direct:.0f} req/s ({ok_d} ok)")
    run_check("throughput", throughput)

    def no_secrets_anywhere():
        proxies = (aws, tcp, fake, tcpfake)
        for p in proxies:
            p.proc.send_signal(signal.SIGTERM)
        rcs = []
        for p in proxies:
            try:
                rcs.append(p.proc.wait(timeout=5))
            except subprocess.TimeoutExpired:
                rcs.append("hung")
        check("SIGTERM: proxies exit cleanly (0)", rcs == [0] * len(proxies), str(rcs))
        texts = "".join(open(f).read() for p in proxies for f in (p.log, p.stdout, p.stderr))
        check("no secret key in any log, stdout or stderr",
              secrets and not any(s in texts for s in secrets) and "fault-test-secret" not in texts,
              f"{len(secrets)} secrets checked")
        bad = [line for line in open(aws.log) if line.strip() and not isinstance(json.loads(line), dict)]
        check("log is one JSON object per line", not bad)
    run_check("shutdown", no_secrets_anywhere)
    fake_srv.shutdown()


def stop_all():
    for name, p in reversed(PROCS):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        check("setup", False, f"{type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stdout)
    finally:
        stop_all()
    failed = [n for n, ok in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; files in {TMP}" if failed else ""))
    if not failed:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if failed else 0)
