//! The adversarial suite: tenants trying to get more than their S3GrantClass allows.
//! Every attempt must end refused (NotPermitted, with the rule that refused it) or
//! revoked, with nothing left in AWS that should not exist. Runs on the Kubernetes API
//! server and moto (IAM users are what a refused grant must never get).

mod common;

use std::time::Duration;

use common::*;
use kube::api::{Api, Patch, PatchParams};
use s3grant::api::{S3Grant, S3GrantClass};

const TIMEOUT: Duration = Duration::from_secs(60);

struct Tenancy {
    bed: Testbed,
    tenant_a: String,
    tenant_b: String,
    outsider: String,
    class: String,
    iam_path: String,
}

/// Two tenant namespaces (labelled) and one unlabelled, and a class that gives each
/// tenant `data/<namespace>/` in the moto bucket, ReadOnly or ReadWrite, STS up to 1h.
async fn tenancy(prefix: &str) -> Option<Tenancy> {
    let bed = testbed().await?;
    let tenant_label = unique("tenant");
    let tenant_a = namespace(
        &bed.kube,
        &format!("{prefix}-a"),
        &[("s3grant.io/tenant", &tenant_label)],
    )
    .await;
    let tenant_b = namespace(
        &bed.kube,
        &format!("{prefix}-b"),
        &[("s3grant.io/tenant", &tenant_label)],
    )
    .await;
    let outsider = namespace(&bed.kube, &format!("{prefix}-x"), &[]).await;
    let backend_namespace = namespace(&bed.kube, &format!("{prefix}-sys"), &[]).await;
    let rules = format!(
        "  namespaceSelector: {{matchLabels: {{s3grant.io/tenant: {tenant_label}}}}}\n  prefixTemplate: \"data/{{namespace}}/\"\n  modes: [ReadOnly, ReadWrite]\n  maxDuration: 1h\n"
    );
    let class = class_on(&bed.kube, &bed.moto, &backend_namespace, "tenancy", &rules).await;
    let iam_path = format!("/s3grant/{class}/");
    Some(Tenancy {
        bed,
        tenant_a,
        tenant_b,
        outsider,
        class,
        iam_path,
    })
}

impl Tenancy {
    fn grant(&self, name: &str, spec: &str) -> String {
        format!("apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {name}}}\nspec:\n  className: {}\n{spec}", self.class)
    }

    async fn users(&self) -> Vec<String> {
        iam_users_under(&self.bed.moto, &self.iam_path).await
    }

    async fn refused(&self, namespace: &str, name: &str, spec: &str, rule: &str) {
        apply_grant(&self.bed.kube, namespace, &self.grant(name, spec)).await;
        let grant = wait_ready(&self.bed.kube, namespace, name, "False", TIMEOUT).await;
        let (_, reason, message) = ready_condition(&grant).unwrap();
        assert_eq!(reason, "NotPermitted", "{name}: {message}");
        assert!(
            message.contains(rule),
            "{name}: expected {rule:?} in {message:?}"
        );
        let status = grant.status.unwrap();
        assert_eq!(
            status.access_key_id, None,
            "{name}: refused grants hold no key"
        );
        assert!(
            secret_data(&self.bed.kube, namespace, &format!("{name}-s3"))
                .await
                .is_none(),
            "{name}: no Secret"
        );
    }

    async fn finish(self) {
        delete_class(&self.bed.kube, &self.class).await;
    }
}

#[tokio::test]
async fn tenants_are_refused_everything_outside_their_class() {
    let Some(t) = tenancy("adv").await else {
        return;
    };
    let bucket = t.bed.moto.bucket.clone();
    let (a, b) = (t.tenant_a.clone(), t.tenant_b.clone());
    let _operator_a = Operator::start(&a, &[]);
    let _operator_x = Operator::start(&t.outsider, &[]);

    // The one legitimate grant, written without the trailing slash: folder semantics.
    apply_grant(
        &t.bed.kube,
        &a,
        &t.grant(
            "own",
            &format!("  bucket: {bucket}\n  prefix: data/{a}\n  mode: ReadOnly\n"),
        ),
    )
    .await;
    let own = wait_ready(&t.bed.kube, &a, "own", "True", TIMEOUT).await;

    let cases = [
        (
            "other-tenant",
            format!("  bucket: {bucket}\n  prefix: data/{b}/\n"),
            format!("not under data/{a}/"),
        ),
        (
            "sibling-name",
            format!("  bucket: {bucket}\n  prefix: data/{a}-evil/\n"),
            format!("not under data/{a}/"),
        ),
        (
            "parent-folder",
            format!("  bucket: {bucket}\n  prefix: data/\n"),
            format!("not under data/{a}/"),
        ),
        (
            "several-one-bad",
            format!("  bucket: {bucket}\n  prefixes: [data/{a}/x/, data/{b}/]\n"),
            format!("prefix data/{b}/"),
        ),
        (
            "whole-bucket",
            format!("  bucket: {bucket}\n"),
            "allowWholeBucket".to_string(),
        ),
        (
            "other-bucket",
            format!("  bucket: not-{bucket}\n  prefix: data/{a}/\n"),
            "not one of the class's buckets".to_string(),
        ),
        (
            "write-only",
            format!("  bucket: {bucket}\n  prefix: data/{a}/\n  mode: WriteOnly\n"),
            "mode WriteOnly is not allowed".to_string(),
        ),
        (
            "too-long",
            format!("  bucket: {bucket}\n  prefix: data/{a}/\n  duration: 2h\n"),
            "longer than the class's maxDuration 1h".to_string(),
        ),
    ];
    for (name, spec, rule) in &cases {
        t.refused(&a, name, spec, rule).await;
    }
    // A namespace the class's selector does not pick, asking for a prefix named after itself.
    let x = t.outsider.clone();
    t.refused(
        &x,
        "outsider",
        &format!("  bucket: {bucket}\n  prefix: data/{x}/\n"),
        "not selected by the class's namespaceSelector",
    )
    .await;

    let own_user = own.status.unwrap().iam_user.unwrap();
    assert_eq!(
        t.users().await,
        vec![own_user],
        "only the permitted grant has an IAM user"
    );
    t.finish().await;
}

#[tokio::test]
async fn prefix_tricks_are_rejected_before_anything_is_created() {
    let Some(t) = tenancy("tricks").await else {
        return;
    };
    let bucket = t.bed.moto.bucket.clone();
    let a = t.tenant_a.clone();
    let api: Api<S3Grant> = Api::namespaced(t.bed.kube.clone(), &a);
    let tricks = [
        format!("data/{a}/../{}/", t.tenant_b),
        format!("data/{a}/*"),
        format!("data/{a}/?"),
        "data/${aws:username}/".to_string(),
        format!("/data/{a}/"),
        format!("data//{a}/"),
        format!("data/{a}/./x"),
    ];
    for (i, prefix) in tricks.iter().enumerate() {
        let grant: S3Grant = serde_yaml::from_str(&t.grant(
            &format!("trick-{i}"),
            &format!("  bucket: {bucket}\n  prefix: {prefix:?}\n"),
        ))
        .unwrap();
        let result = api
            .patch(
                &format!("trick-{i}"),
                &PatchParams::apply("tenant"),
                &Patch::Apply(&grant),
            )
            .await;
        match result {
            Err(kube::Error::Api(refusal)) => {
                assert_eq!(refusal.code, 422, "{prefix:?}: {refusal:?}")
            }
            other => {
                panic!("the API server did not refuse prefix {prefix:?} as invalid: {other:?}")
            }
        }
    }
    assert!(t.users().await.is_empty());
    t.finish().await;
}

#[tokio::test]
async fn grants_racing_for_one_secret_name_never_share_it() {
    let Some(t) = tenancy("race").await else {
        return;
    };
    let bucket = t.bed.moto.bucket.clone();
    let a = t.tenant_a.clone();
    // Both grants exist before the operator starts, so it reconciles them concurrently.
    for name in ["first", "second"] {
        apply_grant(
            &t.bed.kube,
            &a,
            &t.grant(
                name,
                &format!("  bucket: {bucket}\n  prefix: data/{a}/{name}/\n  secretName: shared\n"),
            ),
        )
        .await;
    }
    let _operator = Operator::start(&a, &["--concurrency", "4"]);
    let api: Api<S3Grant> = Api::namespaced(t.bed.kube.clone(), &a);
    let (winner, loser) = wait_for(TIMEOUT, "one winner and one SecretConflict", || {
        let api = api.clone();
        async move {
            let mut ready = None;
            let mut conflicted = None;
            for name in ["first", "second"] {
                let grant = api.get(name).await.ok()?;
                match ready_condition(&grant)? {
                    (s, _, _) if s == "True" => ready = Some(grant),
                    (_, r, _) if r == "SecretConflict" => conflicted = Some(grant),
                    _ => {}
                }
            }
            Some((ready?, conflicted?))
        }
    })
    .await;
    let data = secret_data(&t.bed.kube, &a, "shared").await.unwrap();
    let winner_status = winner.status.unwrap();
    assert_eq!(
        Some(data["AWS_ACCESS_KEY_ID"].as_str()),
        winner_status.access_key_id.as_deref()
    );
    assert_eq!(
        data["S3_PREFIX"],
        format!("data/{a}/{}/", winner.metadata.name.unwrap())
    );
    assert_eq!(loser.status.unwrap().access_key_id, None);
    wait_for(TIMEOUT, "only the winner to keep an IAM user", || {
        let t = &t;
        let user = winner_status.iam_user.clone().unwrap();
        async move { (t.users().await == vec![user]).then_some(()) }
    })
    .await;
    t.finish().await;
}

#[tokio::test]
async fn tightening_the_class_revokes_running_grants() {
    let Some(t) = tenancy("tighten").await else {
        return;
    };
    let bucket = t.bed.moto.bucket.clone();
    let a = t.tenant_a.clone();
    let _operator = Operator::start(&a, &[]);
    apply_grant(
        &t.bed.kube,
        &a,
        &t.grant(
            "app",
            &format!("  bucket: {bucket}\n  prefix: data/{a}/app/\n"),
        ),
    )
    .await;
    wait_ready(&t.bed.kube, &a, "app", "True", TIMEOUT).await;
    let data = secret_data(&t.bed.kube, &a, "app-s3").await.unwrap();
    let tenant = s3_from_secret(&t.bed.moto, &data);
    assert!(can_put(&tenant, &bucket, &format!("data/{a}/app/before")).await);

    // The platform team withdraws ReadWrite.
    let classes: Api<S3GrantClass> = Api::all(t.bed.kube.clone());
    let tighten = serde_json::json!({"spec": {"modes": ["ReadOnly"]}});
    let changed_at = std::time::Instant::now();
    classes
        .patch(&t.class, &PatchParams::default(), &Patch::Merge(&tighten))
        .await
        .unwrap();
    let grant = wait_ready(&t.bed.kube, &a, "app", "False", TIMEOUT).await;
    eprintln!("class change to revoked: {:?}", changed_at.elapsed());
    let (_, reason, message) = ready_condition(&grant).unwrap();
    assert_eq!(reason, "NotPermitted", "{message}");
    wait_for(TIMEOUT, "the Secret and IAM user to be removed", || {
        let t = &t;
        let a = a.clone();
        async move {
            (secret_data(&t.bed.kube, &a, "app-s3").await.is_none() && t.users().await.is_empty())
                .then_some(())
        }
    })
    .await;
    assert!(
        !can_put(&tenant, &bucket, &format!("data/{a}/app/after")).await,
        "the revoked key no longer works"
    );

    // Deleting the class revokes its grants on its backend, then the class goes.
    apply_grant(
        &t.bed.kube,
        &a,
        &t.grant(
            "reader",
            &format!("  bucket: {bucket}\n  prefix: data/{a}/r/\n  mode: ReadOnly\n"),
        ),
    )
    .await;
    wait_ready(&t.bed.kube, &a, "reader", "True", TIMEOUT).await;
    assert_eq!(t.users().await.len(), 1);
    delete_class(&t.bed.kube, &t.class).await;
    let grant = wait_ready(&t.bed.kube, &a, "reader", "False", TIMEOUT).await;
    let (_, reason, message) = ready_condition(&grant).unwrap();
    assert_eq!(reason, "ClassNotFound", "{message}");
    wait_for(TIMEOUT, "the class to go once its grant let go", || {
        let classes = classes.clone();
        let name = t.class.clone();
        async move {
            classes
                .get_opt(&name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert!(t.users().await.is_empty(), "no IAM user outlives its class");
    assert!(
        secret_data(&t.bed.kube, &a, "reader-s3").await.is_none(),
        "the Secret is removed"
    );
    assert!(grant.status.unwrap().held.is_empty(), "the ledger is empty");
}

// Permissions boundaries: moto neither stores nor returns them (and answers
// PutUserPermissionsBoundary with a 500), so the CreateUser request is checked in
// src/iam_user.rs (`created_users_carry_the_class_boundary_path_and_tags`).

#[tokio::test]
async fn a_namespace_that_loses_its_tenant_label_loses_its_grants() {
    let Some(t) = tenancy("unlabel").await else {
        return;
    };
    let bucket = t.bed.moto.bucket.clone();
    let a = t.tenant_a.clone();
    let _operator = Operator::start(&a, &[]);
    let spec = format!("  bucket: {bucket}\n  prefix: data/{a}/app/\n");
    apply_grant(&t.bed.kube, &a, &t.grant("app", &spec)).await;
    wait_ready(&t.bed.kube, &a, "app", "True", TIMEOUT).await;

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(t.bed.kube.clone());
    let unlabel = serde_json::json!({"metadata": {"labels": {"s3grant.io/tenant": null}}});
    let changed_at = std::time::Instant::now();
    namespaces
        .patch(&a, &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    // Within TIMEOUT, so on the label change itself and not on the hourly resync.
    let grant = wait_ready(&t.bed.kube, &a, "app", "False", TIMEOUT).await;
    eprintln!("label removed to revoked: {:?}", changed_at.elapsed());
    let (_, reason, message) = ready_condition(&grant).unwrap();
    assert_eq!(reason, "NotPermitted", "{message}");
    assert!(
        message.contains("not selected by the class's namespaceSelector"),
        "{message}"
    );
    wait_for(TIMEOUT, "the Secret and IAM user to be removed", || {
        let t = &t;
        let a = a.clone();
        async move {
            (secret_data(&t.bed.kube, &a, "app-s3").await.is_none() && t.users().await.is_empty())
                .then_some(())
        }
    })
    .await;
    t.finish().await;
}
