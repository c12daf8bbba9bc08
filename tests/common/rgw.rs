//! Helpers for tests that need Ceph RGW users and buckets of their own.
//!
//! RGW (16.2) has no IAM CreateUser or CreateAccessKey: users come from
//! `radosgw-admin user create`, with S3 keys of their own. Policies are attached with
//! the IAM API (`PutUserPolicy`, signed by the testbed's admin) and evaluated by RGW's
//! real policy engine. Measured on the testbed: a user policy alone lets a user reach a
//! bucket another user (the admin) owns, no bucket policy needed; and a bucket policy
//! granting the user `s3:*` would be *added* to the user policy (allow wins), so tests of
//! confinement must not create one. RGW also falls back to ACLs when no policy statement
//! matches, and an object belongs to the user who wrote it: a user reads its own objects
//! whatever its policy, and even the bucket's owner cannot read them (see [`exists`]).
//!
//! Users and buckets are removed by `Drop` (synchronous `radosgw-admin`), so a failing
//! test leaves nothing behind either.

use std::process::Command;
use std::time::Duration;

use super::{s3, target, wait_for, AwsTarget};

/// The RGW part of the testbed: enough for tests that do not need Kubernetes.
#[derive(Clone, Debug)]
pub struct Rgw {
    pub target: AwsTarget,
    pub ceph_conf: String,
}

/// The RGW server of the testbed, or `None` (with a message) when the environment names
/// no testbed. Unlike [`super::testbed`] it does not need the Kubernetes API server.
pub fn rgw() -> Option<Rgw> {
    if std::env::var("S3GRANT_TESTBED").is_err() {
        eprintln!(
            "skipped: no testbed in the environment; run `tests/testbed.sh test` (README.md)"
        );
        return None;
    }
    Some(Rgw {
        target: target("RGW"),
        ceph_conf: super::required("S3GRANT_TEST_CEPH_CONF"),
    })
}

fn radosgw_admin(ceph_conf: &str, args: &[&str]) -> std::process::Output {
    Command::new("radosgw-admin")
        .arg("-c")
        .arg(ceph_conf)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run radosgw-admin {args:?}: {e} (is the testbed up?)"))
}

/// An RGW user of the test's own, with S3 keys; removed (with its data) when dropped.
pub struct RgwUser {
    pub uid: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    ceph_conf: String,
}

impl RgwUser {
    /// `radosgw-admin user create` with a unique uid starting with `prefix`.
    pub fn create(rgw: &Rgw, prefix: &str) -> RgwUser {
        let uid = super::unique(prefix);
        let out = radosgw_admin(
            &rgw.ceph_conf,
            &[
                "user",
                "create",
                &format!("--uid={uid}"),
                "--display-name=s3grant test user",
            ],
        );
        assert!(
            out.status.success(),
            "radosgw-admin user create {uid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("radosgw-admin prints the user as JSON");
        let key = &info["keys"][0];
        RgwUser {
            uid,
            access_key_id: key["access_key"].as_str().expect("access_key").into(),
            secret_access_key: key["secret_key"].as_str().expect("secret_key").into(),
            ceph_conf: rgw.ceph_conf.clone(),
        }
    }

    /// The principal RGW policies name this user by.
    pub fn arn(&self) -> String {
        format!("arn:aws:iam:::user/{}", self.uid)
    }

    /// An S3 client signing with this user's keys.
    pub fn s3(&self, rgw: &Rgw) -> aws_sdk_s3::Client {
        s3(
            &rgw.target,
            &self.access_key_id,
            &self.secret_access_key,
            None,
        )
    }
}

impl Drop for RgwUser {
    fn drop(&mut self) {
        let _ = radosgw_admin(
            &self.ceph_conf,
            &["user", "rm", &format!("--uid={}", self.uid), "--purge-data"],
        );
    }
}

/// A bucket of the test's own, owned by the testbed's admin; removed with its objects
/// when dropped.
pub struct RgwBucket {
    pub name: String,
    ceph_conf: String,
}

impl RgwBucket {
    pub async fn create(rgw: &Rgw, prefix: &str) -> RgwBucket {
        let name = super::unique(prefix);
        admin_s3(rgw)
            .create_bucket()
            .bucket(&name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("admin creates bucket {name}: {e:?}"));
        RgwBucket {
            name,
            ceph_conf: rgw.ceph_conf.clone(),
        }
    }
}

impl Drop for RgwBucket {
    fn drop(&mut self) {
        let _ = radosgw_admin(
            &self.ceph_conf,
            &[
                "bucket",
                "rm",
                &format!("--bucket={}", self.name),
                "--purge-objects",
            ],
        );
    }
}

/// The admin's S3 client (owner of the testbed's buckets).
pub fn admin_s3(rgw: &Rgw) -> aws_sdk_s3::Client {
    s3(
        &rgw.target,
        &rgw.target.access_key_id,
        &rgw.target.secret_access_key,
        None,
    )
}

/// Writes an object as the admin (for gets that need an existing object).
pub async fn seed(rgw: &Rgw, bucket: &str, key: &str) {
    admin_s3(rgw)
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(b"seeded by the admin".to_vec().into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin seeds {bucket}/{key}: {e:?}"));
}

/// Whether an object exists, asked as the admin by listing (a HeadObject would not do:
/// on RGW an object belongs to the user who wrote it, and its ACL shuts out even the
/// bucket's owner, while the owner can always list the bucket).
pub async fn exists(rgw: &Rgw, bucket: &str, key: &str) -> bool {
    let listed = admin_s3(rgw)
        .list_objects_v2()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin lists {bucket}/{key}: {e:?}"));
    listed.contents().iter().any(|o| o.key() == Some(key))
}

/// Attaches (or replaces) an inline user policy through RGW's IAM API, as the admin.
/// RGW wants compact JSON. Its IAM error bodies do not parse, so a failure is reported
/// with the raw response rather than a code.
pub async fn put_user_policy(rgw: &Rgw, uid: &str, policy_name: &str, document: &str) {
    super::iam_admin(&rgw.target)
        .put_user_policy()
        .user_name(uid)
        .policy_name(policy_name)
        .policy_document(document)
        .send()
        .await
        .unwrap_or_else(|e| panic!("PutUserPolicy {policy_name} on {uid}: {e:?}\n{document}"));
}

/// Whether a delete of `key` succeeds (403 is `false`).
pub async fn can_delete(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> bool {
    match s3.delete_object().bucket(bucket).key(key).send().await {
        Ok(_) => true,
        Err(err) => super::denied(err, "DeleteObject", key),
    }
}

/// Whether GetBucketLocation succeeds (403 is `false`).
pub async fn can_get_location(s3: &aws_sdk_s3::Client, bucket: &str) -> bool {
    match s3.get_bucket_location().bucket(bucket).send().await {
        Ok(_) => true,
        Err(err) => super::denied(err, "GetBucketLocation", bucket),
    }
}

/// Polls until `probe` gives `want` (a policy change is normally visible at once on the
/// one-radosgw testbed; this only keeps a slow machine from failing the test).
pub async fn wait_until<F, Fut>(what: &str, want: bool, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(Duration::from_secs(15), what, || {
        let result = probe();
        async move { (result.await == want).then_some(()) }
    })
    .await
}

/// An STS client signing with the given keys, for the RGW endpoint.
pub fn sts(rgw: &Rgw, access_key_id: &str, secret_access_key: &str) -> aws_sdk_sts::Client {
    let credentials = aws_credential_types::Credentials::new(
        access_key_id,
        secret_access_key,
        None,
        None,
        "test",
    );
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new(rgw.target.region.clone()))
        .endpoint_url(&rgw.target.endpoint)
        .credentials_provider(credentials)
        .build();
    aws_sdk_sts::Client::from_conf(config)
}

/// The admin assumes the testbed's role (`s3:*` on `*`) for 900 s, with `session_policy`
/// when given; returns an S3 client on the session's credentials.
pub async fn assume_role(rgw: &Rgw, session_policy: Option<&str>) -> aws_sdk_s3::Client {
    let out = sts(
        rgw,
        &rgw.target.access_key_id,
        &rgw.target.secret_access_key,
    )
    .assume_role()
    .role_arn(&rgw.target.role_arn)
    .role_session_name(super::unique("s3grant-test"))
    .duration_seconds(900)
    .set_policy(session_policy.map(str::to_string))
    .send()
    .await
    .unwrap_or_else(|e| panic!("AssumeRole {}: {e:?}", rgw.target.role_arn));
    let c = out.credentials().expect("AssumeRole returns credentials");
    s3(
        &rgw.target,
        c.access_key_id(),
        c.secret_access_key(),
        Some(c.session_token()),
    )
}
