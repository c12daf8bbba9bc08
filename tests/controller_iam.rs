//! IAM-user grants end to end: the real Kubernetes API machinery and moto's enforced IAM.
//! moto checks actions and resources (so prefix isolation of object calls is real here)
//! but ignores policy Conditions: the `s3:prefix` condition on listings is checked on
//! Ceph RGW instead (tests/policy_enforcement.rs).

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use s3grant::api::S3Grant;

const READY_TIMEOUT: Duration = Duration::from_secs(60);

struct Setup {
    bed: Testbed,
    namespace: String,
    class: String,
    iam_path: String,
}

async fn setup(prefix: &str) -> Option<Setup> {
    let bed = testbed().await?;
    let namespace = namespace(&bed.kube, prefix, &[]).await;
    let class = class_on(
        &bed.kube,
        &bed.moto,
        &namespace,
        "moto",
        "  allowWholeBucket: true\n",
    )
    .await;
    let iam_path = format!("/s3grant/{class}/");
    Some(Setup {
        bed,
        namespace,
        class,
        iam_path,
    })
}

impl Setup {
    fn grant_yaml(&self, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {name}}}\nspec:\n  bucket: {}\n  className: {}\n{extra}",
            self.bed.moto.bucket, self.class
        )
    }

    async fn users(&self) -> Vec<String> {
        iam_users_under(&self.bed.moto, &self.iam_path).await
    }

    async fn key_count(&self, user: &str) -> usize {
        iam_admin(&self.bed.moto)
            .list_access_keys()
            .user_name(user)
            .send()
            .await
            .map(|o| o.access_key_metadata().len())
            .unwrap_or(0)
    }

    async fn finish(self) {
        delete_class(&self.bed.kube, &self.class).await;
    }
}

#[tokio::test]
async fn iam_user_grant_works_inside_its_prefix_and_is_removed_on_delete() {
    let Some(s) = setup("iam-basic").await else {
        return;
    };
    let mut operator = Operator::start(&s.namespace, &[]);
    operator.wait_swept().await; // the sweep at start makes IAM calls of its own
    let iam_before = operator.aws_calls_to("IAM").await;
    let started = std::time::Instant::now();
    apply_grant(
        &s.bed.kube,
        &s.namespace,
        &s.grant_yaml("reports", "  prefix: tenant-a\n"),
    )
    .await;
    let grant = wait_ready(&s.bed.kube, &s.namespace, "reports", "True", READY_TIMEOUT).await;
    eprintln!("apply to Ready: {:?}", started.elapsed());

    let status = grant.status.clone().unwrap();
    let user = status.iam_user.clone().expect("status names the IAM user");
    assert_eq!(status.credential_kind.as_deref(), Some("IamUser"));
    assert_eq!(s.users().await, vec![user.clone()]);
    let data = secret_data(&s.bed.kube, &s.namespace, "reports-s3")
        .await
        .expect("Secret written");
    assert_eq!(
        status.access_key_id.as_deref(),
        Some(data["AWS_ACCESS_KEY_ID"].as_str())
    );
    assert_eq!(data["S3_PREFIX"], "tenant-a/");
    assert!(
        !serde_json::to_string(&status)
            .unwrap()
            .contains(&data["AWS_SECRET_ACCESS_KEY"]),
        "no secret in status"
    );

    // Issuing took GetUser, CreateUser, PutUserPolicy, CreateAccessKey; the reconcile that
    // its own Secret write triggers costs nothing more.
    wait_for(
        READY_TIMEOUT,
        "the reconcile the Secret write triggers",
        || {
            let operator = &operator;
            async move { (operator.counter("s3grant_reconciles_total").await >= 2).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        operator.aws_calls_to("IAM").await - iam_before,
        4,
        "IAM calls to issue"
    );

    let issued = events(&s.bed.kube, &s.namespace).await;
    assert!(
        issued
            .iter()
            .any(|(reason, note)| reason == "Issued" && note.contains("reports-s3")),
        "{issued:?}"
    );
    assert!(
        !issued
            .iter()
            .any(|(_, note)| note.contains(&data["AWS_SECRET_ACCESS_KEY"])),
        "no secret in Events"
    );

    // A reconcile with nothing to change: the AWS calls it costs.
    operator.wait_ready().await; // its startup probe of the backends is done
    let calls_before = operator.aws_calls().await;
    operator
        .reconcile_after(touch_grant(&s.bed.kube, &s.namespace, "reports"))
        .await;
    let steady_calls = operator.aws_calls().await - calls_before;
    eprintln!("AWS calls for an unchanged IAM-user grant: {steady_calls}");
    assert_eq!(
        steady_calls, 5,
        "GetUser, ListUserPolicies, ListAttachedUserPolicies, GetUserPolicy, ListAccessKeys"
    );

    let tenant = s3_from_secret(&s.bed.moto, &data);
    let bucket = &s.bed.moto.bucket;
    assert!(
        can_put(&tenant, bucket, "tenant-a/report.csv").await,
        "put inside the prefix"
    );
    assert!(
        can_get(&tenant, bucket, "tenant-a/report.csv").await,
        "get inside the prefix"
    );
    assert!(
        !can_put(&tenant, bucket, "tenant-ab/report.csv").await,
        "sibling prefix is denied"
    );
    assert!(
        !can_put(&tenant, bucket, "other/report.csv").await,
        "other prefix is denied"
    );
    assert!(
        !can_put(&tenant, "another-bucket", "tenant-a/x").await,
        "other bucket is denied"
    );

    Api::<S3Grant>::namespaced(s.bed.kube.clone(), &s.namespace)
        .delete("reports", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&s.bed.kube, &s.namespace, "reports").await;
    assert!(
        s.users().await.is_empty(),
        "IAM user removed with the grant"
    );
    assert!(
        secret_data(&s.bed.kube, &s.namespace, "reports-s3")
            .await
            .is_none(),
        "Secret removed"
    );
    assert!(
        !can_put(&tenant, bucket, "tenant-a/after-delete").await,
        "deleted key no longer works"
    );
    let log = operator.log_text();
    assert!(
        log.contains("credentials written"),
        "the log says what happened"
    );
    assert!(
        !log.contains(&data["AWS_SECRET_ACCESS_KEY"]),
        "no secret in the log"
    );
    let exit = operator.terminate();
    assert!(exit.success(), "SIGTERM shuts down cleanly: {exit:?}");
    assert!(operator.log_text().contains("controller stopped"));
    s.finish().await;
}

#[tokio::test]
async fn on_demand_rotation_replaces_the_key_and_the_old_one_dies_after_the_grace() {
    let Some(s) = setup("iam-rotate").await else {
        return;
    };
    let _operator = Operator::start(&s.namespace, &["--key-grace-period", "15s"]);
    apply_grant(
        &s.bed.kube,
        &s.namespace,
        &s.grant_yaml("app", "  prefix: app/\n"),
    )
    .await;
    let grant = wait_ready(&s.bed.kube, &s.namespace, "app", "True", READY_TIMEOUT).await;
    let user = grant.status.unwrap().iam_user.unwrap();
    let old = secret_data(&s.bed.kube, &s.namespace, "app-s3")
        .await
        .unwrap();
    let bucket = s.bed.moto.bucket.clone();

    let api = Api::<S3Grant>::namespaced(s.bed.kube.clone(), &s.namespace);
    let annotate = serde_json::json!({"metadata": {"annotations": {"s3grant.io/rotate-requested-at": "2026-11-28T04:00:00Z"}}});
    api.patch("app", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();

    let new = wait_for(READY_TIMEOUT, "a new key in the Secret", || {
        let client = s.bed.kube.clone();
        let namespace = s.namespace.clone();
        let old_id = old["AWS_ACCESS_KEY_ID"].clone();
        async move {
            let data = secret_data(&client, &namespace, "app-s3").await?;
            (data["AWS_ACCESS_KEY_ID"] != old_id).then_some(data)
        }
    })
    .await;
    let old_client = s3_from_secret(&s.bed.moto, &old);
    let new_client = s3_from_secret(&s.bed.moto, &new);
    assert!(
        can_put(&new_client, &bucket, "app/new-key").await,
        "new key works"
    );
    assert!(
        can_put(&old_client, &bucket, "app/old-key-in-grace").await,
        "old key works during the grace"
    );
    assert_eq!(s.key_count(&user).await, 2);

    let deadline = std::time::Instant::now() + Duration::from_secs(75);
    while s.key_count(&user).await > 1 {
        assert!(s.key_count(&user).await <= 2, "never a third key");
        assert!(
            std::time::Instant::now() < deadline,
            "old key not deleted after the grace"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        !can_put(&old_client, &bucket, "app/old-key-after-grace").await,
        "old key dead after the grace"
    );
    assert!(
        can_put(&new_client, &bucket, "app/new-key-after-grace").await,
        "new key still works"
    );
    let status = api.get("app").await.unwrap().status.unwrap();
    assert_eq!(
        status.handled_rotation_request.as_deref(),
        Some("2026-11-28T04:00:00Z")
    );
    assert_eq!(
        status.access_key_id.as_deref(),
        Some(new["AWS_ACCESS_KEY_ID"].as_str())
    );
    s.finish().await;
}

#[tokio::test]
async fn hand_deleted_secret_comes_back_and_a_foreign_secret_is_left_alone() {
    let Some(s) = setup("iam-drift").await else {
        return;
    };
    let _operator = Operator::start(&s.namespace, &["--key-grace-period", "2s"]);
    let secrets = Api::<Secret>::namespaced(s.bed.kube.clone(), &s.namespace);

    apply_grant(
        &s.bed.kube,
        &s.namespace,
        &s.grant_yaml("app", "  prefix: app/\n"),
    )
    .await;
    wait_ready(&s.bed.kube, &s.namespace, "app", "True", READY_TIMEOUT).await;
    secrets
        .delete("app-s3", &DeleteParams::default())
        .await
        .unwrap();
    let restored = wait_for(READY_TIMEOUT, "the Secret to come back", || {
        let client = s.bed.kube.clone();
        let namespace = s.namespace.clone();
        async move { secret_data(&client, &namespace, "app-s3").await }
    })
    .await;
    assert!(
        can_put(
            &s3_from_secret(&s.bed.moto, &restored),
            &s.bed.moto.bucket,
            "app/restored"
        )
        .await
    );

    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("taken".into()),
            ..Default::default()
        },
        string_data: Some([("owner".to_string(), "someone else".to_string())].into()),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    apply_grant(
        &s.bed.kube,
        &s.namespace,
        &s.grant_yaml("intruder", "  prefix: other/\n  secretName: taken\n"),
    )
    .await;
    let grant = wait_ready(
        &s.bed.kube,
        &s.namespace,
        "intruder",
        "False",
        READY_TIMEOUT,
    )
    .await;
    let (_, reason, message) = ready_condition(&grant).unwrap();
    assert_eq!(reason, "SecretConflict", "{message}");
    let untouched = secret_data(&s.bed.kube, &s.namespace, "taken")
        .await
        .unwrap();
    assert_eq!(
        untouched,
        [("owner".to_string(), "someone else".to_string())].into()
    );
    assert_eq!(
        s.users().await.len(),
        1,
        "no IAM user for the conflicting grant"
    );
    s.finish().await;
}

#[tokio::test]
async fn invalid_grant_reports_why_and_creates_nothing_in_aws() {
    let Some(s) = setup("iam-invalid").await else {
        return;
    };
    let operator = Operator::start(&s.namespace, &[]);
    operator.wait_ready().await;
    let calls_before = operator.aws_calls().await;
    // Passes every rule the API server can check, but the compiled policy is over IAM's
    // 2,048-character limit for a user's inline policies: only the operator can tell.
    let prefixes: Vec<String> = (0..24)
        .map(|i| format!("team-{i:02}/{}", "x".repeat(60)))
        .collect();
    let yaml = format!(
        "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: bad}}\nspec:\n  bucket: {}\n  className: {}\n  prefixes: {:?}\n",
        s.bed.moto.bucket, s.class, prefixes
    );
    apply_grant(&s.bed.kube, &s.namespace, &yaml).await;
    let grant = wait_ready(&s.bed.kube, &s.namespace, "bad", "False", READY_TIMEOUT).await;
    let (_, reason, message) = ready_condition(&grant).unwrap();
    assert_eq!(reason, "PolicyTooLarge");
    assert!(
        message.contains("over the 2048-character limit of a user's inline policies"),
        "{message}"
    );
    // The API server refuses what it can check itself, before the operator sees it.
    let api = Api::<S3Grant>::namespaced(s.bed.kube.clone(), &s.namespace);
    let ip_bucket: S3Grant = serde_yaml::from_str("apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {name: ip}\nspec: {bucket: 192.168.10.1, prefix: a/}\n").unwrap();
    let refused = api
        .create(&PostParams::default(), &ip_bucket)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("must not be formatted as an IP address"),
        "{refused}"
    );
    assert!(s.users().await.is_empty());
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains("s3grant_reconciles_total"),
        "the operator's /metrics answers: {metrics}"
    );
    assert_eq!(
        operator.aws_calls().await - calls_before,
        0,
        "no AWS call for an invalid grant"
    );
    // Deleting a grant whose AWS side never existed works, again without AWS.
    api.delete("bad", &DeleteParams::default()).await.unwrap();
    wait_gone(&s.bed.kube, &s.namespace, "bad").await;
    assert_eq!(operator.aws_calls().await - calls_before, 0);
    s.finish().await;
}

#[tokio::test]
async fn operator_killed_mid_reconcile_converges_without_orphans() {
    let Some(s) = setup("iam-crash").await else {
        return;
    };
    const GRANTS: usize = 12;
    let mut operator = Operator::start(
        &s.namespace,
        &["--key-grace-period", "3s", "--concurrency", "4"],
    );
    for i in 0..GRANTS {
        apply_grant(
            &s.bed.kube,
            &s.namespace,
            &s.grant_yaml(&format!("g{i}"), &format!("  prefix: g{i}/\n")),
        )
        .await;
    }
    // Kill it while it is part-way through: some grants done, others not.
    wait_for(
        Duration::from_secs(60),
        "a first grant to be issued",
        || {
            let s = &s;
            async move { (!s.users().await.is_empty()).then_some(()) }
        },
    )
    .await;
    operator.kill();
    let users_at_kill = s.users().await.len();
    eprintln!("killed with {users_at_kill} of {GRANTS} users created");

    let _operator = Operator::start(
        &s.namespace,
        &["--key-grace-period", "3s", "--concurrency", "4"],
    );
    for i in 0..GRANTS {
        wait_ready(
            &s.bed.kube,
            &s.namespace,
            &format!("g{i}"),
            "True",
            Duration::from_secs(90),
        )
        .await;
    }
    let users = s.users().await;
    assert_eq!(
        users.len(),
        GRANTS,
        "one IAM user per grant, no orphans: {users:?}"
    );
    let api = Api::<S3Grant>::namespaced(s.bed.kube.clone(), &s.namespace);
    for i in 0..GRANTS {
        let name = format!("g{i}");
        let status = api.get(&name).await.unwrap().status.unwrap();
        let user = status.iam_user.unwrap();
        assert!(users.contains(&user));
        let data = secret_data(&s.bed.kube, &s.namespace, &format!("{name}-s3"))
            .await
            .unwrap();
        assert!(
            can_put(
                &s3_from_secret(&s.bed.moto, &data),
                &s.bed.moto.bucket,
                &format!("{name}/ok")
            )
            .await
        );
        // Keys left by the crash go at once or after the 3 s grace; then exactly one remains.
        wait_for(Duration::from_secs(30), "one key per user", || {
            let s = &s;
            let user = user.clone();
            async move { (s.key_count(&user).await == 1).then_some(()) }
        })
        .await;
    }
    s.finish().await;
}

/// (reason, note) of the events.k8s.io Events in a namespace.
async fn events(client: &kube::Client, namespace: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&Default::default()).await.unwrap();
    list.items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn drift_in_aws_is_repaired() {
    let Some(s) = setup("iam-repair").await else {
        return;
    };
    let operator = Operator::start(&s.namespace, &[]);
    apply_grant(
        &s.bed.kube,
        &s.namespace,
        &s.grant_yaml("app", "  prefix: app/\n"),
    )
    .await;
    let grant = wait_ready(&s.bed.kube, &s.namespace, "app", "True", READY_TIMEOUT).await;
    let user = grant.status.unwrap().iam_user.unwrap();
    let iam = iam_admin(&s.bed.moto);
    let bucket = s.bed.moto.bucket.clone();

    // Someone widens the inline policy and attaches another: both are undone.
    let wide = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#;
    iam.put_user_policy()
        .user_name(&user)
        .policy_name("s3grant")
        .policy_document(wide)
        .send()
        .await
        .unwrap();
    iam.put_user_policy()
        .user_name(&user)
        .policy_name("extra")
        .policy_document(wide)
        .send()
        .await
        .unwrap();
    let data = secret_data(&s.bed.kube, &s.namespace, "app-s3")
        .await
        .unwrap();
    assert!(
        can_put(&s3_from_secret(&s.bed.moto, &data), &bucket, "elsewhere/x").await,
        "the widened policy is in force"
    );
    operator
        .reconcile_after(touch_grant(&s.bed.kube, &s.namespace, "app"))
        .await;
    let names = iam
        .list_user_policies()
        .user_name(&user)
        .send()
        .await
        .unwrap()
        .policy_names;
    assert_eq!(names, ["s3grant"]);
    let document = iam
        .get_user_policy()
        .user_name(&user)
        .policy_name("s3grant")
        .send()
        .await
        .unwrap();
    let restored: serde_json::Value = serde_json::from_str(
        &percent_encoding::percent_decode_str(document.policy_document()).decode_utf8_lossy(),
    )
    .unwrap();
    assert!(
        restored
            .to_string()
            .contains("arn:aws:s3:::s3grant-test/app/*"),
        "{restored}"
    );
    assert!(
        !can_put(&s3_from_secret(&s.bed.moto, &data), &bucket, "elsewhere/y").await,
        "back inside the prefix"
    );

    // Someone deletes the user: it comes back with a new key in the Secret.
    for key in iam
        .list_access_keys()
        .user_name(&user)
        .send()
        .await
        .unwrap()
        .access_key_metadata()
    {
        iam.delete_access_key()
            .user_name(&user)
            .access_key_id(key.access_key_id().unwrap())
            .send()
            .await
            .unwrap();
    }
    iam.delete_user_policy()
        .user_name(&user)
        .policy_name("s3grant")
        .send()
        .await
        .unwrap();
    iam.delete_user().user_name(&user).send().await.unwrap();
    operator
        .reconcile_after(touch_grant(&s.bed.kube, &s.namespace, "app"))
        .await;
    let renewed = wait_for(READY_TIMEOUT, "a new key for the recreated user", || {
        let client = s.bed.kube.clone();
        let ns = s.namespace.clone();
        let old = data["AWS_ACCESS_KEY_ID"].clone();
        async move {
            secret_data(&client, &ns, "app-s3")
                .await
                .filter(|d| d["AWS_ACCESS_KEY_ID"] != old)
        }
    })
    .await;
    assert_eq!(s.users().await, vec![user.clone()]);
    assert!(
        can_put(
            &s3_from_secret(&s.bed.moto, &renewed),
            &bucket,
            "app/after-repair"
        )
        .await
    );
    s.finish().await;
}

#[tokio::test]
async fn an_iam_user_s3grant_did_not_create_is_never_touched() {
    let Some(s) = setup("iam-foreign").await else {
        return;
    };
    // The grant exists before the operator runs, so its uid (and so its user name) is known.
    let grant = apply_grant(
        &s.bed.kube,
        &s.namespace,
        &s.grant_yaml("app", "  prefix: app/\n"),
    )
    .await;
    let name =
        s3grant::naming::iam_user_name(&s.namespace, "app", grant.metadata.uid.as_deref().unwrap());
    let iam = iam_admin(&s.bed.moto);
    iam.create_user()
        .user_name(&name)
        .path(&s.iam_path)
        .send()
        .await
        .unwrap();
    let _operator = Operator::start(&s.namespace, &[]);
    let grant = wait_ready(&s.bed.kube, &s.namespace, "app", "False", READY_TIMEOUT).await;
    let (_, reason, message) = ready_condition(&grant).unwrap();
    assert_eq!(reason, "IamUserConflict", "{message}");
    let keys = iam
        .list_access_keys()
        .user_name(&name)
        .send()
        .await
        .unwrap();
    assert!(
        keys.access_key_metadata().is_empty(),
        "no key was added to the foreign user"
    );
    assert!(iam
        .list_user_policies()
        .user_name(&name)
        .send()
        .await
        .unwrap()
        .policy_names
        .is_empty());
    Api::<S3Grant>::namespaced(s.bed.kube.clone(), &s.namespace)
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&s.bed.kube, &s.namespace, "app").await;
    assert!(
        iam.get_user().user_name(&name).send().await.is_ok(),
        "deleting the grant left the foreign user alone"
    );
    s.finish().await;
}
