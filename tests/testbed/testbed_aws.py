#!/usr/bin/env python3
"""Helpers for tests/testbed/moto.sh and rgw.sh, run with the testbed venv's python.

Subcommands:
  free-port                      print a free TCP port on 127.0.0.1
  wait-http URL SECONDS          wait until URL answers HTTP (any status)
  moto-bootstrap                 create the admin user/key, role and bucket on moto,
                                 write the env file, prove enforcement is on
  moto-check                     admin key works, unknown key and unsigned refused
  rgw-bootstrap                  create the STS role, its policy and the bucket on RGW,
                                 write the env file, prove STS prefix confinement
  rgw-check                      admin key works, STS session is confined

Credentials are passed in environment variables, never on the command line, and
written only to the env file (mode 0600). Nothing secret goes to stdout.
"""

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid

REGION = "us-east-1"
ROLE_NAME = "s3grant-sessions"
BUCKET = "s3grant-test"
MOTO_ADMIN = "s3grant-admin"


def compact(doc):
    # RGW rejects pretty-printed policy JSON as malformed: always send it compact.
    return json.dumps(doc, separators=(",", ":"))


def say(msg):
    print(f"  {msg}", flush=True)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def client(service, endpoint, key_id, secret, token=None):
    import boto3
    from botocore.config import Config

    cfg = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 2, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
    )
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=cfg,
    )


def error_code(exc):
    resp = getattr(exc, "response", None) or {}
    return resp.get("Error", {}).get("Code") or type(exc).__name__


def write_env(path, pairs):
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for name, value in pairs:
            f.write(f"export {name}={value}\n")
    os.replace(tmp, path)


def read_env(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("export ") and "=" in line:
                name, value = line[len("export "):].split("=", 1)
                values[name] = value
    return values


# --- generic -----------------------------------------------------------------


def cmd_free_port(_args):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def cmd_wait_http(args):
    deadline = time.monotonic() + float(args.seconds)
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(args.url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except Exception:
            time.sleep(0.1)
    sys.exit(1)


# --- moto ----------------------------------------------------------------------

ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def moto_expect_refused(endpoint, label, key_id, secret):
    """An STS call with these credentials must be refused."""
    sts = client("sts", endpoint, key_id, secret)
    try:
        sts.get_caller_identity()
    except Exception as exc:  # refused: the wanted outcome
        say(f"{label}: refused ({error_code(exc)})")
        return
    fail(f"moto accepted a request {label}: IAM enforcement is OFF")


def http_status(method, url, data=None):
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def moto_expect_unsigned_refused(endpoint, key_id, secret):
    """Unsigned requests must not succeed. moto 5.2.5 answers them with a 500 (it looks
    for an Authorization header that is not there): still a refusal, and the write
    must not have happened."""
    key = f"unsigned-{uuid.uuid4().hex[:8]}"
    put = http_status("PUT", f"{endpoint}/{BUCKET}/{key}", b"x")
    iam = http_status("POST", f"{endpoint}/", b"Action=ListUsers&Version=2010-05-08")
    if 200 <= put < 300 or 200 <= iam < 300:
        fail(f"moto accepted unsigned requests (PUT object {put}, ListUsers {iam}): IAM enforcement is OFF")
    try:
        client("s3", endpoint, key_id, secret).head_object(Bucket=BUCKET, Key=key)
    except Exception:
        say(f"unsigned: refused (PUT object HTTP {put}, IAM ListUsers HTTP {iam}; nothing written)")
        return
    fail("an unsigned PUT wrote an object: IAM enforcement is OFF")


def moto_prove_enforcement(endpoint, key_id, secret):
    sts = client("sts", endpoint, key_id, secret)
    arn = sts.get_caller_identity()["Arn"]
    say(f"admin key accepted ({arn})")
    iam = client("iam", endpoint, key_id, secret)
    moto_expect_refused(endpoint, "with an unknown key", "AKIA" + "X" * 16, "not-a-secret")
    moto_expect_unsigned_refused(endpoint, key_id, secret)
    # An IAM call (not only STS) must also be refused with a bad key.
    bad_iam = client("iam", endpoint, "AKIA" + "Y" * 16, "not-a-secret")
    try:
        bad_iam.list_users()
    except Exception as exc:
        say(f"IAM ListUsers with an unknown key: refused ({error_code(exc)})")
    else:
        fail("moto accepted IAM ListUsers with an unknown key: IAM enforcement is OFF")
    iam.get_role(RoleName=ROLE_NAME)
    return arn


def cmd_moto_bootstrap(args):
    endpoint = args.endpoint
    # The free (unauthenticated) requests: exactly FREE_REQUESTS in moto.sh.
    iam = client("iam", endpoint, "bootstrap", "bootstrap")
    user = iam.create_user(UserName=MOTO_ADMIN)["User"]
    iam.put_user_policy(UserName=MOTO_ADMIN, PolicyName="allow-all", PolicyDocument=compact(ALLOW_ALL))
    key = iam.create_access_key(UserName=MOTO_ADMIN)["AccessKey"]
    key_id, secret = key["AccessKeyId"], key["SecretAccessKey"]
    admin_arn = user["Arn"]

    # From here on every request is signed by the admin.
    admin_iam = client("iam", endpoint, key_id, secret)
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": admin_arn}, "Action": "sts:AssumeRole"}],
    }
    role = admin_iam.create_role(
        RoleName=ROLE_NAME, AssumeRolePolicyDocument=compact(trust), MaxSessionDuration=43200
    )["Role"]
    admin_iam.put_role_policy(
        RoleName=ROLE_NAME,
        PolicyName="s3-all",
        PolicyDocument=compact({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}),
    )
    client("s3", endpoint, key_id, secret).create_bucket(Bucket=BUCKET)
    say(f"admin {admin_arn}, role {role['Arn']}, bucket {BUCKET}")

    moto_prove_enforcement(endpoint, key_id, secret)
    assumed = client("sts", endpoint, key_id, secret).assume_role(
        RoleArn=role["Arn"], RoleSessionName="testbed-check", DurationSeconds=900
    )
    say(f"AssumeRole on {role['Arn']} works ({assumed['AssumedRoleUser']['Arn']})")

    p = args.var_prefix
    write_env(args.env_file, [
        (f"{p}_ENDPOINT", endpoint),
        (f"{p}_ACCESS_KEY_ID", key_id),
        (f"{p}_SECRET_ACCESS_KEY", secret),
        (f"{p}_ADMIN_ARN", admin_arn),
        (f"{p}_ROLE_ARN", role["Arn"]),
        (f"{p}_BUCKET", BUCKET),
        (f"{p}_REGION", REGION),
    ])


def cmd_moto_check(args):
    env = read_env(args.env_file)
    p = args.var_prefix
    moto_prove_enforcement(
        env[f"{p}_ENDPOINT"],
        env[f"{p}_ACCESS_KEY_ID"],
        env[f"{p}_SECRET_ACCESS_KEY"],
    )


# --- RGW -----------------------------------------------------------------------


def rgw_ensure_role(iam, admin_uid):
    trust = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"AWS": [f"arn:aws:iam:::user/{admin_uid}"]},
            "Action": ["sts:AssumeRole"],
        }],
    }
    try:
        arn = iam.create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=compact(trust))["Role"]["Arn"]
    except Exception as exc:
        # RGW wraps IAM errors in an envelope botocore cannot parse: look the role up.
        try:
            arn = iam.get_role(RoleName=ROLE_NAME)["Role"]["Arn"]
        except Exception:
            raise exc
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}]}
    iam.put_role_policy(RoleName=ROLE_NAME, PolicyName="s3-all", PolicyDocument=compact(policy))
    return arn


def rgw_prove_sts_confinement(endpoint, key_id, secret, role_arn, bucket):
    """AssumeRole with a session policy confined to a prefix: in works, out is AccessDenied."""
    prefix = f"confined-{uuid.uuid4().hex[:8]}/"
    session_policy = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
            "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"],
        }],
    }
    creds = client("sts", endpoint, key_id, secret).assume_role(
        RoleArn=role_arn, RoleSessionName="testbed-check", DurationSeconds=900,
        Policy=compact(session_policy),
    )["Credentials"]
    s3 = client("s3", endpoint, creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"])
    s3.put_object(Bucket=bucket, Key=f"{prefix}inside.txt", Body=b"in")
    say(f"STS session: put {bucket}/{prefix}inside.txt allowed")
    try:
        s3.put_object(Bucket=bucket, Key="outside.txt", Body=b"out")
    except Exception as exc:
        code = error_code(exc)
        if code != "AccessDenied":
            fail(f"STS session: put outside the prefix failed with {code}, expected AccessDenied")
        say(f"STS session: put {bucket}/outside.txt refused ({code})")
    else:
        fail("STS session: put outside the prefix was ALLOWED: session policy not enforced")
    admin_s3 = client("s3", endpoint, key_id, secret)
    admin_s3.delete_object(Bucket=bucket, Key=f"{prefix}inside.txt")


def cmd_rgw_bootstrap(args):
    endpoint = args.endpoint
    key_id = os.environ["RGW_ADMIN_ACCESS_KEY"]
    secret = os.environ["RGW_ADMIN_SECRET_KEY"]
    uid = args.admin_uid
    s3 = client("s3", endpoint, key_id, secret)
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception as exc:
        if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    role_arn = rgw_ensure_role(client("iam", endpoint, key_id, secret), uid)
    say(f"admin user {uid}, role {role_arn}, bucket {BUCKET}")
    rgw_prove_sts_confinement(endpoint, key_id, secret, role_arn, BUCKET)
    write_env(args.env_file, [
        ("S3GRANT_TEST_RGW_ENDPOINT", endpoint),
        ("S3GRANT_TEST_RGW_ACCESS_KEY_ID", key_id),
        ("S3GRANT_TEST_RGW_SECRET_ACCESS_KEY", secret),
        ("S3GRANT_TEST_RGW_ADMIN_UID", uid),
        ("S3GRANT_TEST_RGW_ROLE_ARN", role_arn),
        ("S3GRANT_TEST_RGW_BUCKET", BUCKET),
        ("S3GRANT_TEST_RGW_REGION", REGION),
        ("S3GRANT_TEST_CEPH_CONF", args.ceph_conf),
    ])


def cmd_rgw_check(args):
    env = read_env(args.env_file)
    endpoint = env["S3GRANT_TEST_RGW_ENDPOINT"]
    key_id = env["S3GRANT_TEST_RGW_ACCESS_KEY_ID"]
    secret = env["S3GRANT_TEST_RGW_SECRET_ACCESS_KEY"]
    client("s3", endpoint, key_id, secret).head_bucket(Bucket=env["S3GRANT_TEST_RGW_BUCKET"])
    say("admin key accepted")
    rgw_prove_sts_confinement(endpoint, key_id, secret, env["S3GRANT_TEST_RGW_ROLE_ARN"], env["S3GRANT_TEST_RGW_BUCKET"])


def cmd_keys_from_user_json(args):
    """Read `radosgw-admin user create|info` JSON on stdin, write the first S3 key pair
    as shell assignments to a 0600 file (never to stdout)."""
    info = json.load(sys.stdin)
    keys = info.get("keys") or []
    if not keys:
        fail("radosgw-admin returned a user without S3 keys")
    write_env(args.out, [
        ("RGW_ADMIN_ACCESS_KEY", keys[0]["access_key"]),
        ("RGW_ADMIN_SECRET_KEY", keys[0]["secret_key"]),
    ])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("free-port").set_defaults(func=cmd_free_port)
    w = sub.add_parser("wait-http")
    w.add_argument("url")
    w.add_argument("seconds")
    w.set_defaults(func=cmd_wait_http)
    mb = sub.add_parser("moto-bootstrap")
    mb.add_argument("--endpoint", required=True)
    mb.add_argument("--env-file", required=True)
    mb.add_argument("--var-prefix", default="S3GRANT_TEST_MOTO")
    mb.set_defaults(func=cmd_moto_bootstrap)
    mc = sub.add_parser("moto-check")
    mc.add_argument("--env-file", required=True)
    mc.add_argument("--var-prefix", default="S3GRANT_TEST_MOTO")
    mc.set_defaults(func=cmd_moto_check)
    rb = sub.add_parser("rgw-bootstrap")
    rb.add_argument("--endpoint", required=True)
    rb.add_argument("--admin-uid", required=True)
    rb.add_argument("--ceph-conf", required=True)
    rb.add_argument("--env-file", required=True)
    rb.set_defaults(func=cmd_rgw_bootstrap)
    rc = sub.add_parser("rgw-check")
    rc.add_argument("--env-file", required=True)
    rc.set_defaults(func=cmd_rgw_check)
    k = sub.add_parser("keys-from-user-json")
    k.add_argument("--out", required=True)
    k.set_defaults(func=cmd_keys_from_user_json)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
