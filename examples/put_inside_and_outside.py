"""Reads a grant's Secret (kubectl get secret -o json) on stdin and tries two puts with
its credentials: one inside the granted prefix, which must work, and one outside, which
must be denied. Exits non-zero when either does not happen. Prints no secret values."""

import base64
import json
import sys

import boto3
from botocore.exceptions import ClientError

endpoint, bucket, inside, outside = sys.argv[1:5]
data = {k: base64.b64decode(v).decode() for k, v in json.load(sys.stdin)["data"].items()}
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name=data["AWS_REGION"],
    aws_access_key_id=data["AWS_ACCESS_KEY_ID"],
    aws_secret_access_key=data["AWS_SECRET_ACCESS_KEY"],
    aws_session_token=data.get("AWS_SESSION_TOKEN"),
)


def put(key):
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"hello from s3grant")
        return "allowed"
    except ClientError as err:
        return "denied (%s)" % err.response["Error"]["Code"]


inside_result, outside_result = put(inside), put(outside)
print("  put s3://%s/%s: %s" % (bucket, inside, inside_result))
print("  put s3://%s/%s: %s" % (bucket, outside, outside_result))
if inside_result != "allowed" or not outside_result.startswith("denied"):
    sys.exit("unexpected: the inside put must be allowed and the outside put denied")
