//! A grant's life after its first issue: one test per row of LIFECYCLE.md's table that no
//! other file covers, each asserting the end state against the servers (users and keys in
//! moto and in the second moto, the Secret's keys, what the credentials can do), not
//! against the operator's own status alone. The rows covered elsewhere: rotation requested
//! and Secret deleted (controller_iam.rs), class tightened and namespace unlabelled
//! (tenancy.rs), operator killed (controller_iam.rs and lifecycle_model.rs).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use s3grant::api::{S3Grant, S3GrantClass};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The keys of an IAM-user grant's Secret (one prefix, a custom endpoint).
const IAM_KEYS: [&str; 8] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_SECRET_ACCESS_KEY",
    "S3_BUCKET",
    "S3_PREFIX",
    "credential_process.json",
    "credentials",
];
/// The keys of an STS grant's Secret (one prefix, a custom endpoint).
const STS_KEYS: [&str; 10] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "S3_BUCKET",
    "S3_PREFIX",
    "credential_process.json",
    "credentials",
];

/// A namespace with a class on moto (`a`) and one on the second moto (`b`).
struct Bed {
    bed: Testbed,
    ns: String,
    a: String,
    b: String,
}

async fn bed(prefix: &str) -> Option<Bed> {
    let bed = testbed().await?;
    let ns = namespace(&bed.kube, prefix, &[]).await;
    let rules = "  allowWholeBucket: true\n";
    let a = class_on(&bed.kube, &bed.moto, &ns, "lc-a", rules).await;
    let b = class_on(&bed.kube, &bed.moto2, &ns, "lc-b", rules).await;
    Some(Bed { bed, ns, a, b })
}

impl Bed {
    fn kube(&self) -> &kube::Client {
        &self.bed.kube
    }

    fn grants(&self) -> Api<S3Grant> {
        Api::namespaced(self.kube().clone(), &self.ns)
    }

    /// Applies the grant `name` with `spec` (YAML lines under `spec:`), as one field manager.
    async fn apply(&self, name: &str, spec: &str) {
        let yaml = format!(
            "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {name}}}\nspec:\n  bucket: {}\n{spec}",
            self.bed.moto.bucket
        );
        apply_grant(self.kube(), &self.ns, &yaml).await;
    }

    async fn ready(&self, name: &str) -> S3Grant {
        wait_ready(self.kube(), &self.ns, name, "True", TIMEOUT).await
    }

    async fn not_ready(&self, name: &str, reason: &str) -> S3Grant {
        wait_for(
            TIMEOUT,
            &format!("grant {name} Ready=False with {reason}"),
            || async move {
                let grant = self.grants().get(name).await.ok()?;
                let (status, r, _) = ready_condition(&grant)?;
                (status == "False" && r == reason).then_some(grant)
            },
        )
        .await
    }

    async fn secret(&self, name: &str) -> BTreeMap<String, String> {
        secret_data(self.kube(), &self.ns, name)
            .await
            .unwrap_or_else(|| panic!("Secret {name}"))
    }

    async fn users_of(&self, target: &AwsTarget, class: &str) -> Vec<String> {
        iam_users_under(target, &format!("/s3grant/{class}/")).await
    }

    async fn finish(self) {
        let _ = self
            .grants()
            .delete_collection(&DeleteParams::default(), &Default::default())
            .await;
        delete_class(self.kube(), &self.a).await;
        delete_class(self.kube(), &self.b).await;
    }
}

fn keys(data: &BTreeMap<String, String>) -> Vec<&str> {
    data.keys().map(String::as_str).collect()
}

fn user(grant: &S3Grant) -> String {
    grant
        .status
        .as_ref()
        .and_then(|s| s.iam_user.clone())
        .expect("status names the user")
}

async fn field_managers(client: &kube::Client, ns: &str, name: &str) -> Vec<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    let mut managers: Vec<String> = secret
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    managers.sort();
    managers.dedup();
    managers
}

#[tokio::test]
async fn an_sts_grant_that_loses_its_duration_gets_one_user_one_key_and_no_session_keys() {
    let Some(t) = bed("lc-sts-iam").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &[]);
    let class = format!("  className: {}\n  prefix: app/\n", t.a);
    t.apply("app", &format!("{class}  duration: 15m\n")).await;
    t.ready("app").await;
    assert_eq!(keys(&t.secret("app-s3").await), STS_KEYS);

    t.apply("app", &class).await;
    let grant = wait_for(TIMEOUT, "the grant to be an IAM-user grant", || async {
        let grant = t.ready("app").await;
        (grant.status.as_ref()?.credential_kind.as_deref() == Some("IamUser")).then_some(grant)
    })
    .await;
    let user = user(&grant);
    let data = t.secret("app-s3").await;
    assert_eq!(keys(&data), IAM_KEYS, "no session keys are left behind");
    assert_eq!(
        t.users_of(&t.bed.moto, &t.a).await,
        std::slice::from_ref(&user)
    );
    let key = access_keys(&t.bed.moto, &user).await;
    assert_eq!(key, [data["AWS_ACCESS_KEY_ID"].clone()], "exactly one key");
    assert!(
        can_put(
            &s3_from_secret(&t.bed.moto, &data),
            &t.bed.moto.bucket,
            "app/x"
        )
        .await,
        "the key works"
    );
    // No churn: the next reconciles find the Secret intact and create nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    touch_grant(t.kube(), &t.ns, "app").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        access_keys(&t.bed.moto, &user).await,
        key,
        "still the one key"
    );
    assert_eq!(t.secret("app-s3").await, data, "the Secret did not change");
    assert_eq!(
        field_managers(t.kube(), &t.ns, "app-s3").await,
        ["s3grant"],
        "one field manager for the Secret's whole life"
    );
    t.finish().await;
}

#[tokio::test]
async fn an_iam_grant_that_gains_a_duration_gets_a_session_first_then_loses_its_user() {
    let Some(t) = bed("lc-iam-sts").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &[]);
    let class = format!("  className: {}\n  prefix: app/\n", t.a);
    t.apply("app", &class).await;
    let user = user(&t.ready("app").await);
    let old = t.secret("app-s3").await;

    t.apply("app", &format!("{class}  duration: 15m\n")).await;
    // Watched from outside: the user must never be gone while the Secret still holds its key.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let data = t.secret("app-s3").await;
        let user_gone = t.users_of(&t.bed.moto, &t.a).await.is_empty();
        let session = data.contains_key("AWS_SESSION_TOKEN");
        assert!(
            session || !user_gone,
            "the IAM user was deleted while the Secret still held its key"
        );
        if session && user_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no switch to STS after {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grant = t.ready("app").await;
    let status = grant.status.unwrap();
    assert_eq!(status.credential_kind.as_deref(), Some("StsSession"));
    assert!(
        status.held.is_empty(),
        "the ledger holds nothing: {:?}",
        status.held
    );
    assert_eq!(keys(&t.secret("app-s3").await), STS_KEYS);
    assert!(access_keys(&t.bed.moto, &user).await.is_empty());
    assert!(
        !can_put(
            &s3_from_secret(&t.bed.moto, &old),
            &t.bed.moto.bucket,
            "app/x"
        )
        .await,
        "the old key is dead"
    );
    t.finish().await;
}

#[tokio::test]
async fn an_edited_prefix_or_mode_replaces_the_policy_in_place() {
    let Some(t) = bed("lc-edit").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &[]);
    t.apply("app", &format!("  className: {}\n  prefix: one/\n", t.a))
        .await;
    let user = user(&t.ready("app").await);
    let before = t.secret("app-s3").await;
    let tenant = s3_from_secret(&t.bed.moto, &before);
    let bucket = t.bed.moto.bucket.clone();
    assert!(can_put(&tenant, &bucket, "one/x").await);

    t.apply(
        "app",
        &format!("  className: {}\n  prefix: two/\n  mode: ReadOnly\n", t.a),
    )
    .await;
    wait_for(TIMEOUT, "the edit to reach the Secret", || async {
        let data = t.secret("app-s3").await;
        (data["S3_PREFIX"] == "two/").then_some(())
    })
    .await;
    t.ready("app").await;
    let after = t.secret("app-s3").await;
    assert_eq!(
        after["AWS_ACCESS_KEY_ID"], before["AWS_ACCESS_KEY_ID"],
        "same key: the policy changed, not the credential"
    );
    assert_eq!(
        t.users_of(&t.bed.moto, &t.a).await,
        std::slice::from_ref(&user)
    );
    assert_eq!(access_keys(&t.bed.moto, &user).await.len(), 1);
    let policy = iam_admin(&t.bed.moto)
        .get_user_policy()
        .user_name(&user)
        .policy_name("s3grant")
        .send()
        .await
        .unwrap();
    let document = percent_encoding::percent_decode_str(policy.policy_document())
        .decode_utf8_lossy()
        .into_owned();
    assert!(
        document.contains("two/") && !document.contains("one/"),
        "{document}"
    );
    assert!(!document.contains("s3:PutObject"), "ReadOnly: {document}");
    // moto judges object calls by the policy: the old prefix and writes are refused now.
    assert!(!can_put(&tenant, &bucket, "one/y").await, "old prefix");
    assert!(!can_put(&tenant, &bucket, "two/y").await, "read-only");
    t.finish().await;
}

#[tokio::test]
async fn a_grant_moved_to_a_class_on_another_backend_leaves_nothing_behind() {
    let Some(t) = bed("lc-move").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &[]);
    t.apply("app", &format!("  className: {}\n  prefix: app/\n", t.a))
        .await;
    let old_user = user(&t.ready("app").await);
    let old = t.secret("app-s3").await;

    t.apply("app", &format!("  className: {}\n  prefix: app/\n", t.b))
        .await;
    let grant = wait_for(TIMEOUT, "the grant to move to class b", || async {
        let grant = t.ready("app").await;
        let status = grant.status.as_ref()?;
        (status.class_name.as_deref() == Some(t.b.as_str()) && status.held.len() == 1)
            .then_some(grant)
    })
    .await;
    let new_user = user(&grant);
    let data = t.secret("app-s3").await;
    assert_eq!(keys(&data), IAM_KEYS);
    assert_eq!(
        data["AWS_ENDPOINT_URL_S3"], t.bed.moto2.endpoint,
        "no stale endpoint"
    );
    assert_eq!(
        t.users_of(&t.bed.moto2, &t.b).await,
        std::slice::from_ref(&new_user)
    );
    assert_eq!(access_keys(&t.bed.moto2, &new_user).await.len(), 1);
    assert!(
        t.users_of(&t.bed.moto, &t.a).await.is_empty(),
        "the old backend keeps no user"
    );
    assert!(access_keys(&t.bed.moto, &old_user).await.is_empty());
    assert!(
        !can_put(
            &s3_from_secret(&t.bed.moto, &old),
            &t.bed.moto.bucket,
            "app/x"
        )
        .await,
        "the old key is dead on the old backend"
    );
    assert!(
        can_put(
            &s3_from_secret(&t.bed.moto2, &data),
            &t.bed.moto2.bucket,
            "app/x"
        )
        .await,
        "the new key works on the new backend"
    );
    t.finish().await;
}

#[tokio::test]
async fn a_class_whose_backend_changes_leaves_nothing_on_the_old_backend() {
    let Some(t) = bed("lc-backend").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &[]);
    t.apply("app", &format!("  className: {}\n  prefix: app/\n", t.a))
        .await;
    let user = user(&t.ready("app").await);
    let old = t.secret("app-s3").await;

    // The platform team points class a at the second moto (another account).
    let credentials = backend_credentials_secret(t.kube(), &t.ns, &t.bed.moto2).await;
    let patch = serde_json::json!({"spec": {"backend": {
        "endpoint": t.bed.moto2.endpoint,
        "roleArn": t.bed.moto2.role_arn,
        "credentialsSecretRef": {"namespace": t.ns, "name": credentials},
    }}});
    Api::<S3GrantClass>::all(t.kube().clone())
        .patch(&t.a, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for(TIMEOUT, "new credentials from the new backend", || async {
        let data = t.secret("app-s3").await;
        (data["AWS_ENDPOINT_URL_S3"] == t.bed.moto2.endpoint).then_some(())
    })
    .await;
    let grant = t.ready("app").await;
    assert_eq!(grant.status.as_ref().unwrap().held.len(), 1);
    let data = t.secret("app-s3").await;
    assert_eq!(
        t.users_of(&t.bed.moto2, &t.a).await,
        std::slice::from_ref(&user)
    );
    wait_for(TIMEOUT, "the user on the old backend to go", || async {
        t.users_of(&t.bed.moto, &t.a).await.is_empty().then_some(())
    })
    .await;
    assert!(
        !can_put(
            &s3_from_secret(&t.bed.moto, &old),
            &t.bed.moto.bucket,
            "app/x"
        )
        .await,
        "the old key is dead"
    );
    assert!(
        can_put(
            &s3_from_secret(&t.bed.moto2, &data),
            &t.bed.moto2.bucket,
            "app/x"
        )
        .await
    );
    let class = Api::<S3GrantClass>::all(t.kube().clone())
        .get(&t.a)
        .await
        .unwrap();
    assert!(
        !class.status.unwrap().backends.is_empty(),
        "the class remembers the backends its grants held users on"
    );
    t.finish().await;
}

async fn set_default(client: &kube::Client, class: &str, default: bool) {
    let value = default.then_some("true");
    let patch =
        serde_json::json!({"metadata": {"annotations": {"s3grant.io/is-default-class": value}}});
    Api::<S3GrantClass>::all(client.clone())
        .patch(class, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The only test that marks classes default (they are cluster-wide): keep it alone in
/// this file, and lifecycle_model.rs (which moves the default too) in its own binary.
#[tokio::test]
async fn moving_the_default_class_in_two_steps_revokes_nothing_the_final_state_permits() {
    let Some(t) = bed("lc-default").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &[]);
    set_default(t.kube(), &t.a, true).await;
    t.apply("app", "  prefix: app/\n").await;
    let on_a = user(&t.ready("app").await);
    let works = |target: AwsTarget, data: BTreeMap<String, String>| async move {
        can_put(&s3_from_secret(&target, &data), &target.bucket, "app/x").await
    };

    // Order 1: mark b default too (ambiguous), then unmark a.
    set_default(t.kube(), &t.b, true).await;
    t.not_ready("app", "AmbiguousDefaultClass").await;
    assert_eq!(
        t.users_of(&t.bed.moto, &t.a).await,
        std::slice::from_ref(&on_a),
        "nothing revoked"
    );
    assert!(works(t.bed.moto.clone(), t.secret("app-s3").await).await);
    set_default(t.kube(), &t.a, false).await;
    let grant = wait_for(TIMEOUT, "the grant on class b", || async {
        let grant = t.ready("app").await;
        (grant.status.as_ref()?.class_name.as_deref() == Some(t.b.as_str())).then_some(grant)
    })
    .await;
    let on_b = user(&grant);
    assert_eq!(t.users_of(&t.bed.moto2, &t.b).await, [on_b]);
    wait_for(TIMEOUT, "no user left on a's backend", || async {
        t.users_of(&t.bed.moto, &t.a).await.is_empty().then_some(())
    })
    .await;

    // Order 2: unmark b first (no default for a moment), then mark a.
    set_default(t.kube(), &t.b, false).await;
    t.not_ready("app", "NoDefaultClass").await;
    assert_eq!(
        t.users_of(&t.bed.moto2, &t.b).await.len(),
        1,
        "nothing revoked"
    );
    assert!(works(t.bed.moto2.clone(), t.secret("app-s3").await).await);
    set_default(t.kube(), &t.a, true).await;
    wait_for(TIMEOUT, "the grant back on class a", || async {
        let grant = t.ready("app").await;
        (grant.status.as_ref()?.class_name.as_deref() == Some(t.a.as_str())).then_some(())
    })
    .await;
    assert_eq!(t.users_of(&t.bed.moto, &t.a).await.len(), 1);
    wait_for(TIMEOUT, "no user left on b's backend", || async {
        t.users_of(&t.bed.moto2, &t.b)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(works(t.bed.moto.clone(), t.secret("app-s3").await).await);
    set_default(t.kube(), &t.a, false).await;
    t.finish().await;
}

#[tokio::test]
async fn a_deleted_class_revokes_every_grant_that_used_it_then_goes() {
    let Some(t) = bed("lc-class-del").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &[]);
    t.apply("user", &format!("  className: {}\n  prefix: u/\n", t.a))
        .await;
    t.apply(
        "session",
        &format!("  className: {}\n  prefix: s/\n  duration: 15m\n", t.a),
    )
    .await;
    t.apply("other", &format!("  className: {}\n  prefix: o/\n", t.b))
        .await;
    let user_a = user(&t.ready("user").await);
    t.ready("session").await;
    t.ready("other").await;
    let key = t.secret("user-s3").await;

    Api::<S3GrantClass>::all(t.kube().clone())
        .delete(&t.a, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(TIMEOUT, "class a to go", || async {
        Api::<S3GrantClass>::all(t.kube().clone())
            .get_opt(&t.a)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    for name in ["user", "session"] {
        let grant = t.not_ready(name, "ClassNotFound").await;
        assert!(grant.status.unwrap().held.is_empty());
        assert!(secret_data(t.kube(), &t.ns, &format!("{name}-s3"))
            .await
            .is_none());
    }
    assert!(
        t.users_of(&t.bed.moto, &t.a).await.is_empty(),
        "no user outlives its class"
    );
    assert!(access_keys(&t.bed.moto, &user_a).await.is_empty());
    assert!(
        !can_put(
            &s3_from_secret(&t.bed.moto, &key),
            &t.bed.moto.bucket,
            "u/x"
        )
        .await
    );
    t.ready("other").await;
    assert_eq!(
        t.users_of(&t.bed.moto2, &t.b).await.len(),
        1,
        "other classes untouched"
    );
    t.finish().await;
}

#[tokio::test]
async fn a_rotation_interrupted_after_the_secret_write_still_gives_the_old_key_its_grace() {
    let Some(t) = bed("lc-rot-crash").await else {
        return;
    };
    let grace = "20s";
    let mut operator = Operator::start(&t.ns, &["--key-grace-period", grace]);
    t.apply("app", &format!("  className: {}\n  prefix: app/\n", t.a))
        .await;
    let user = user(&t.ready("app").await);
    let first = t.secret("app-s3").await;
    operator.kill();

    // This operator aborts right after writing the rotated key into the Secret, before
    // the status says the request was handled.
    let mut crashing = Operator::start_with_env(
        &t.ns,
        &["--key-grace-period", grace],
        &[("S3GRANT_CRASH_AT", "after-secret-write")],
    );
    let request =
        serde_json::json!({"metadata": {"annotations": {"s3grant.io/rotate-requested-at": "r1"}}});
    t.grants()
        .patch("app", &PatchParams::default(), &Patch::Merge(&request))
        .await
        .unwrap();
    wait_for(
        TIMEOUT,
        "the operator to crash after the Secret write",
        || {
            let running = crashing.is_running();
            async move { (!running).then_some(()) }
        },
    )
    .await;
    let rotated = t.secret("app-s3").await;
    assert_ne!(rotated["AWS_ACCESS_KEY_ID"], first["AWS_ACCESS_KEY_ID"]);
    let status = t.grants().get("app").await.unwrap().status.unwrap();
    assert_ne!(
        status.handled_rotation_request.as_deref(),
        Some("r1"),
        "the crash came before the status write"
    );

    let _operator = Operator::start(&t.ns, &["--key-grace-period", grace]);
    wait_for(TIMEOUT, "the status to record the rotation", || async {
        let grant = t.ready("app").await;
        (grant.status?.handled_rotation_request.as_deref() == Some("r1")).then_some(())
    })
    .await;
    let keys_now = access_keys(&t.bed.moto, &user).await;
    assert_eq!(
        keys_now.len(),
        2,
        "the old key is in its grace: {keys_now:?}"
    );
    assert_eq!(
        t.secret("app-s3").await["AWS_ACCESS_KEY_ID"],
        rotated["AWS_ACCESS_KEY_ID"],
        "not rotated a second time"
    );
    let bucket = &t.bed.moto.bucket;
    assert!(
        can_put(&s3_from_secret(&t.bed.moto, &first), bucket, "app/old").await,
        "the old key still works inside its grace"
    );
    wait_for(Duration::from_secs(90), "the old key to retire", || async {
        let keys = access_keys(&t.bed.moto, &user).await;
        assert!(keys.len() <= 2, "never a third key: {keys:?}");
        (keys == [rotated["AWS_ACCESS_KEY_ID"].clone()]).then_some(())
    })
    .await;
    t.finish().await;
}

#[tokio::test]
async fn an_edited_secret_is_rewritten_and_an_edited_credential_replaced() {
    let Some(t) = bed("lc-secret-edit").await else {
        return;
    };
    let _operator = Operator::start(&t.ns, &["--key-grace-period", "30s"]);
    t.apply("app", &format!("  className: {}\n  prefix: app/\n", t.a))
        .await;
    let user = user(&t.ready("app").await);
    let issued = t.secret("app-s3").await;
    let secrets = Api::<Secret>::namespaced(t.kube().clone(), &t.ns);

    // A key added and a value changed by hand: rewritten, with the same credential.
    let edit = serde_json::json!({"stringData": {"EXTRA": "x", "S3_PREFIX": "elsewhere/"}});
    secrets
        .patch("app-s3", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    wait_for(TIMEOUT, "the Secret to be rewritten", || async {
        (t.secret("app-s3").await == issued).then_some(())
    })
    .await;
    assert_eq!(access_keys(&t.bed.moto, &user).await.len(), 1, "no new key");

    // An edited credential is replaced with a new key; the old one keeps its grace.
    let tamper = serde_json::json!({"stringData": {"AWS_SECRET_ACCESS_KEY": "tampered"}});
    secrets
        .patch("app-s3", &PatchParams::default(), &Patch::Merge(&tamper))
        .await
        .unwrap();
    let replaced = wait_for(TIMEOUT, "a new key in the Secret", || async {
        let data = t.secret("app-s3").await;
        (data["AWS_ACCESS_KEY_ID"] != issued["AWS_ACCESS_KEY_ID"]).then_some(data)
    })
    .await;
    assert_eq!(keys(&replaced), IAM_KEYS);
    assert!(
        can_put(
            &s3_from_secret(&t.bed.moto, &replaced),
            &t.bed.moto.bucket,
            "app/x"
        )
        .await
    );
    let keys_now = access_keys(&t.bed.moto, &user).await;
    assert_eq!(
        keys_now.len(),
        2,
        "the old key is kept for pods that read it: {keys_now:?}"
    );
    t.finish().await;
}

#[tokio::test]
async fn a_secret_that_cannot_be_written_costs_no_access_key() {
    let Some(t) = bed("lc-unwritable").await else {
        return;
    };
    let operator = Operator::start(&t.ns, &[]);

    // A grant name that makes `<name>-s3` longer than 253 characters: refused up front.
    let long = "g".repeat(251);
    t.apply(&long, &format!("  className: {}\n  prefix: long/\n", t.a))
        .await;
    let grant = t.not_ready(&long, "InvalidSpec").await;
    let (_, _, message) = ready_condition(&grant).unwrap();
    assert!(message.contains("254 characters"), "{message}");
    assert!(
        t.users_of(&t.bed.moto, &t.a).await.is_empty(),
        "no user, no key"
    );

    // A Secret the API server refuses to change (made immutable), with a rotation asked for.
    t.apply("app", &format!("  className: {}\n  prefix: app/\n", t.a))
        .await;
    let user = user(&t.ready("app").await);
    let secrets = Api::<Secret>::namespaced(t.kube().clone(), &t.ns);
    secrets
        .patch(
            "app-s3",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"immutable": true})),
        )
        .await
        .unwrap();
    let reconciles_before = operator.counter("s3grant_reconciles_total").await;
    let request =
        serde_json::json!({"metadata": {"annotations": {"s3grant.io/rotate-requested-at": "r1"}}});
    t.grants()
        .patch("app", &PatchParams::default(), &Patch::Merge(&request))
        .await
        .unwrap();
    let grant = t.not_ready("app", "SecretUnwritable").await;
    let (_, _, message) = ready_condition(&grant).unwrap();
    assert!(
        message.contains("immutable"),
        "the API server's reason: {message}"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        access_keys(&t.bed.moto, &user).await.len(),
        1,
        "no access key was created for a Secret that cannot take it"
    );
    let attempts = operator.counter("s3grant_reconciles_total").await - reconciles_before;
    assert!(
        attempts <= 4,
        "backs off instead of looping: {attempts} reconciles in 20 s"
    );

    // Deleting the immutable Secret lets the grant converge at once.
    secrets
        .delete("app-s3", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(TIMEOUT, "a new Secret", || async {
        let grant = t.ready("app").await;
        (grant.status?.handled_rotation_request.as_deref() == Some("r1")).then_some(())
    })
    .await;
    assert!(access_keys(&t.bed.moto, &user).await.len() <= 2);
    t.finish().await;
}

#[tokio::test]
async fn a_grant_deleted_while_the_operator_is_down_is_cleaned_up_when_it_returns() {
    let Some(t) = bed("lc-down").await else {
        return;
    };
    let mut operator = Operator::start(&t.ns, &[]);
    t.apply("app", &format!("  className: {}\n  prefix: app/\n", t.a))
        .await;
    let user = user(&t.ready("app").await);
    operator.kill();
    t.grants()
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        t.grants().get_opt("app").await.unwrap().is_some(),
        "the finalizer holds the grant"
    );
    assert_eq!(
        t.users_of(&t.bed.moto, &t.a).await,
        std::slice::from_ref(&user)
    );
    let _operator = Operator::start(&t.ns, &[]);
    wait_gone(t.kube(), &t.ns, "app").await;
    assert!(t.users_of(&t.bed.moto, &t.a).await.is_empty());
    assert!(secret_data(t.kube(), &t.ns, "app-s3").await.is_none());
    t.finish().await;
}

#[tokio::test]
async fn a_user_whose_grant_vanished_without_cleanup_is_swept() {
    let Some(t) = bed("lc-sweep").await else {
        return;
    };
    let mut operator = Operator::start(&t.ns, &[]);
    t.apply("gone", &format!("  className: {}\n  prefix: g/\n", t.a))
        .await;
    t.apply("kept", &format!("  className: {}\n  prefix: k/\n", t.a))
        .await;
    let orphan = user(&t.ready("gone").await);
    let kept = user(&t.ready("kept").await);
    operator.kill();

    // Someone strips the finalizer and deletes the grant: nothing cleans up.
    let strip = serde_json::json!({"metadata": {"finalizers": null}});
    t.grants()
        .patch("gone", &PatchParams::default(), &Patch::Merge(&strip))
        .await
        .unwrap();
    t.grants()
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(t.kube(), &t.ns, "gone").await;
    let mut users = t.users_of(&t.bed.moto, &t.a).await;
    users.sort();
    let mut both = vec![orphan.clone(), kept.clone()];
    both.sort();
    assert_eq!(users, both, "the orphan is still there");

    let operator = Operator::start(&t.ns, &["--sweep-min-age", "1s"]);
    operator.wait_swept().await;
    assert_eq!(
        t.users_of(&t.bed.moto, &t.a).await,
        [kept],
        "the sweep deleted the orphan and only the orphan"
    );
    assert!(access_keys(&t.bed.moto, &orphan).await.is_empty());
    assert!(operator.counter("s3grant_swept_users_total").await >= 1);
    t.finish().await;
}
