//! The invariant auditor (LIFECYCLE.md's I1–I7) for tests that run faults: the fault
//! proxies' logs are the AWS-side history of every call, a watch on the namespace's
//! Secrets is the Kubernetes-side one, and moto and the API server give the end state.
//! Each check returns the violations it found, with when they happened.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use s3grant::api::S3Grant;

use super::{access_keys, iam_users_under, AwsTarget};

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One observed state of a Secret: when, which, its key, its expiry (STS).
#[derive(Clone, Debug)]
pub struct SecretSeen {
    pub t: f64,
    pub secret: String,
    pub access_key_id: Option<String>,
    pub expires_at: Option<f64>,
}

/// Every change of the Secrets in a namespace, from a watch (no polling).
#[derive(Clone, Default)]
pub struct SecretHistory(Arc<Mutex<Vec<SecretSeen>>>);

impl SecretHistory {
    /// Starts watching; the task ends with the returned handle.
    pub fn watch(
        client: &kube::Client,
        namespace: &str,
    ) -> (SecretHistory, tokio::task::JoinHandle<()>) {
        let history = SecretHistory::default();
        let seen = history.0.clone();
        let api = Api::<Secret>::namespaced(client.clone(), namespace);
        let task = tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let (secret, deleted) = match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => (s, false),
                    Ok(watcher::Event::Delete(s)) => (s, true),
                    _ => continue,
                };
                let field = |key: &str| {
                    secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .map(|v| String::from_utf8_lossy(&v.0).to_string())
                };
                let expires_at = field("AWS_CREDENTIAL_EXPIRATION")
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map(|t| t.as_second() as f64);
                let deleted = deleted || secret.metadata.deletion_timestamp.is_some();
                seen.lock().unwrap().push(SecretSeen {
                    t: unix_now(),
                    secret: secret.name_any(),
                    access_key_id: if deleted {
                        None
                    } else {
                        field("AWS_ACCESS_KEY_ID")
                    },
                    expires_at,
                });
            }
        });
        (history, task)
    }

    pub fn seen(&self) -> Vec<SecretSeen> {
        self.0.lock().unwrap().clone()
    }
}

fn ok(entry: &serde_json::Value) -> bool {
    entry["status"].as_u64().is_some_and(|s| s < 300)
}

fn user_of(entry: &serde_json::Value) -> String {
    entry["params"]["UserName"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// I2: replays every key creation and deletion of a proxy log; a user that ever held
/// more than two keys is a violation.
pub fn at_most_two_keys(entries: &[serde_json::Value]) -> Vec<String> {
    let mut keys: HashMap<String, i64> = HashMap::new();
    let mut violations = Vec::new();
    for e in entries.iter().filter(|e| ok(e)) {
        match e["action"].as_str() {
            Some("CreateAccessKey") => {
                let n = keys.entry(user_of(e)).or_default();
                *n += 1;
                if *n > 2 {
                    violations.push(format!(
                        "at {:.1}: {} holds {n} access keys (I2)",
                        e["t"].as_f64().unwrap_or_default(),
                        user_of(e)
                    ));
                }
            }
            Some("DeleteAccessKey") => *keys.entry(user_of(e)).or_default() -= 1,
            _ => {}
        }
    }
    violations
}

/// I4: a key deleted less than `grace` after it was last seen in its Secret, unless
/// `exempt(secret, from, to)` says the grant was revoked, moved or had its Secret edited
/// in that window. `slack` covers how late the watch saw the change.
pub fn grace_honoured(
    entries: &[serde_json::Value],
    history: &[SecretSeen],
    grace: Duration,
    slack: Duration,
    exempt: impl Fn(&str, f64, f64) -> bool,
) -> Vec<String> {
    let mut violations = Vec::new();
    for e in entries
        .iter()
        .filter(|e| ok(e) && e["action"] == "DeleteAccessKey")
    {
        let key = e["params"]["AccessKeyId"].as_str().unwrap_or_default();
        let deleted = e["t"].as_f64().unwrap_or_default();
        // The last state of each Secret before the deletion: was this key still in one?
        let mut last: BTreeMap<&str, &SecretSeen> = BTreeMap::new();
        for seen in history.iter().filter(|s| s.t <= deleted) {
            last.insert(&seen.secret, seen);
        }
        let still_in = last
            .values()
            .find(|s| s.access_key_id.as_deref() == Some(key));
        if let Some(s) = still_in {
            if !exempt(&s.secret, s.t, deleted) {
                violations.push(format!(
                    "at {deleted:.1}: key {key} deleted while Secret {} still held it (I4)",
                    s.secret
                ));
            }
            continue;
        }
        // When it left: the first state after the last one holding it.
        let held_until = history
            .iter()
            .rfind(|s| s.t <= deleted && s.access_key_id.as_deref() == Some(key))
            .map(|s| (s.secret.clone(), s.t));
        if let Some((secret, seen)) = held_until {
            let next = history.iter().find(|s| {
                s.secret == secret && s.t > seen && s.access_key_id.as_deref() != Some(key)
            });
            // A Secret deleted between the key's last appearance and its deletion belongs to
            // a grant that was deleted or revoked: its keys go at once, by design. (A Secret
            // a tenant deletes is rewritten at once; LIFECYCLE.md's notes say why an older
            // previous key may then go early.)
            let revoked = history.iter().any(|s| {
                s.secret == secret && s.t > seen && s.t <= deleted && s.access_key_id.is_none()
            });
            let left = next.map(|s| s.t).unwrap_or(seen);
            if !revoked
                && deleted + slack.as_secs_f64() < left + grace.as_secs_f64()
                && !exempt(&secret, seen, deleted)
            {
                violations.push(format!(
                    "at {deleted:.1}: key {key} of Secret {secret} deleted {:.1} s after it left it, inside the {} s grace (I4)",
                    deleted - left,
                    grace.as_secs()
                ));
            }
        }
    }
    violations
}

/// I6: successful CreateAccessKey calls per user in `entries`.
pub fn keys_created(entries: &[serde_json::Value]) -> HashMap<String, usize> {
    let mut created = HashMap::new();
    for e in entries
        .iter()
        .filter(|e| ok(e) && e["action"] == "CreateAccessKey")
    {
        *created.entry(user_of(e)).or_default() += 1;
    }
    created
}

/// The end state of IAM-user grants in `namespace` against a backend: every grant Ready,
/// with exactly one user under `path` whose key is the Secret's (I1, I3), no user without
/// a grant (I1), at most two keys each (I2), and the Secret holding exactly the
/// IAM-user keys (I5). Returns the violations; empty when all hold.
pub async fn iam_grants_converged(
    client: &kube::Client,
    namespace: &str,
    target: &AwsTarget,
    path: &str,
) -> Vec<String> {
    let mut violations = Vec::new();
    let grants = Api::<S3Grant>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let users = iam_users_under(target, path).await;
    let mut expected = Vec::new();
    for grant in &grants {
        let name = grant.name_any();
        let status = grant.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            && status.observed_generation == grant.metadata.generation;
        if !ready {
            violations.push(format!("{name}: not Ready ({:?})", status.conditions));
            continue;
        }
        let user = s3grant::naming::iam_user_name(namespace, &name, &grant.uid().unwrap());
        expected.push(user.clone());
        if !users.contains(&user) {
            violations.push(format!(
                "{name}: Ready but its user {user} does not exist (I1/I3)"
            ));
            continue;
        }
        let secret_name = status.secret_name.clone().unwrap_or(format!("{name}-s3"));
        let data = super::secret_data(client, namespace, &secret_name).await;
        let Some(data) = data else {
            violations.push(format!("{name}: Ready without a Secret (I3)"));
            continue;
        };
        let keys = access_keys(target, &user).await;
        if keys.len() > 2 {
            violations.push(format!("{user}: {} keys (I2)", keys.len()));
        }
        if !keys.contains(&data["AWS_ACCESS_KEY_ID"]) {
            violations.push(format!(
                "{name}: the Secret's key is not one of the user's (I3)"
            ));
        }
        let session_keys = ["AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION"];
        if session_keys.iter().any(|k| data.contains_key(*k)) {
            violations.push(format!("{name}: session keys in an IAM-user Secret (I5)"));
        }
    }
    for user in users {
        if !expected.contains(&user) {
            violations.push(format!("user {user} belongs to no Ready grant (I1)"));
        }
    }
    violations
}
