//! The fault suite, AWS side: faults injected by tests/faults/proxy.py in front of moto
//! (and the second moto), and SIGKILLs of the operator, each row judged by the auditor
//! (tests/common/audit.rs) against I1–I7. Every test prints one `FAULT-ROW {json}` line
//! that tests/faults.sh gathers into the suite's table, then fails on any violation.
//!
//! Runs only with `S3GRANT_FAULTS=quick` (CI: fewer trials, shorter faults) or
//! `S3GRANT_FAULTS=full` (the trials and durations), through tests/faults.sh;
//! a plain `cargo test` skips it. The kube side is tests/faults_kube.rs; leader faults
//! (SIGSTOP, clock skew) are in tests/leader_election.rs.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::audit::{self, unix_now, SecretHistory};
use common::proxy::FaultProxy;
use common::*;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use s3grant::api::S3Grant;

const READY_TIMEOUT: Duration = Duration::from_secs(240);

fn mode() -> Option<String> {
    match std::env::var("S3GRANT_FAULTS") {
        Ok(mode) if mode == "quick" || mode == "full" => Some(mode),
        _ => {
            eprintln!(
                "skipped: the fault suite runs with S3GRANT_FAULTS=quick|full (tests/faults.sh)"
            );
            None
        }
    }
}

fn full() -> bool {
    mode().as_deref() == Some("full")
}

/// One row of the suite's table.
fn report(
    fault: &str,
    trials: usize,
    violations: &[String],
    converge: &[f64],
    must_hold: &str,
    extra: serde_json::Value,
) {
    let row = serde_json::json!({
        "fault": fault,
        "trials": trials,
        "violations": violations.len(),
        "converge_s": converge.iter().map(|s| (s * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "must_hold": must_hold,
        "measured": extra,
    });
    eprintln!("FAULT-ROW {row}");
    assert!(violations.is_empty(), "{fault}:\n{}", violations.join("\n"));
}

/// A namespace, a proxy in front of moto, a class through it, and the Secret history.
struct Trial {
    bed: Testbed,
    ns: String,
    class: String,
    path: String,
    proxy: FaultProxy,
    history: SecretHistory,
    watch: tokio::task::JoinHandle<()>,
    pid_file: std::path::PathBuf,
    operator: Option<Operator>,
    args: Vec<String>,
}

impl Trial {
    async fn new(bed: &Testbed, name: &str, args: &[&str]) -> Trial {
        let ns = namespace(&bed.kube, name, &[]).await;
        let proxy = FaultProxy::aws(&bed.moto, name).await;
        let class = class_on(
            &bed.kube,
            &proxy.in_front_of(&bed.moto),
            &ns,
            name,
            "  allowWholeBucket: true\n",
        )
        .await;
        let (history, watch) = SecretHistory::watch(&bed.kube, &ns);
        let pid_file = proxy.log.with_extension("operator-pid");
        let mut trial = Trial {
            bed: bed.clone(),
            path: format!("/s3grant/{class}/"),
            ns,
            class,
            proxy,
            history,
            watch,
            pid_file,
            operator: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        trial.restart();
        trial
    }

    /// (Re)starts the operator and records its pid where the proxy's kill rules read it.
    fn restart(&mut self) {
        if let Some(mut old) = self.operator.take() {
            old.kill();
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let operator = Operator::start(&self.ns, &args);
        std::fs::write(&self.pid_file, operator.pid().unwrap().to_string()).unwrap();
        self.operator = Some(operator);
    }

    fn grants(&self) -> Api<S3Grant> {
        Api::namespaced(self.bed.kube.clone(), &self.ns)
    }

    async fn apply(&self, name: &str, extra: &str) {
        let yaml = format!(
            "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {name}}}\nspec:\n  bucket: {}\n  className: {}\n  prefix: {name}/\n{extra}",
            self.bed.moto.bucket, self.class
        );
        apply_grant(&self.bed.kube, &self.ns, &yaml).await;
    }

    async fn apply_many(&self, names: &[String]) {
        for chunk in names.chunks(25) {
            futures::future::join_all(chunk.iter().map(|n| self.apply(n, ""))).await;
        }
    }

    async fn rotate(&self, name: &str, value: &str) {
        let patch = serde_json::json!({"metadata": {"annotations": {"s3grant.io/rotate-requested-at": value}}});
        self.grants()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Waits until every grant is Ready (and has handled its rotation request, if any).
    async fn all_ready(&self, timeout: Duration) -> Result<f64, String> {
        let started = Instant::now();
        loop {
            let grants = self.grants().list(&Default::default()).await.unwrap().items;
            let pending: Vec<String> = grants
                .iter()
                .filter(|g| {
                    let status = g.status.as_ref();
                    let ready = status.is_some_and(|s| {
                        s.observed_generation == g.metadata.generation
                            && s.conditions
                                .iter()
                                .any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                    let requested = g
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("s3grant.io/rotate-requested-at"));
                    let handled = requested.is_none()
                        || status.and_then(|s| s.handled_rotation_request.as_ref()) == requested;
                    !(ready && handled)
                })
                .map(|g| g.metadata.name.clone().unwrap_or_default())
                .collect();
            if pending.is_empty() {
                return Ok(started.elapsed().as_secs_f64());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "{} grants not converged after {timeout:?}: {:?}",
                    pending.len(),
                    &pending[..pending.len().min(5)]
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Deletes every grant and checks nothing is left in IAM (I1).
    async fn finish(self) -> Vec<String> {
        let mut violations = Vec::new();
        let _ = self
            .grants()
            .delete_collection(&DeleteParams::default(), &Default::default())
            .await;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self
            .grants()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
        {
            if Instant::now() > deadline {
                violations.push("grants not deleted in time".to_string());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let left = iam_users_under(&self.bed.moto, &self.path).await;
        if !left.is_empty() {
            violations.push(format!(
                "{} IAM users left after their grants were deleted (I1): {:?}",
                left.len(),
                &left[..left.len().min(3)]
            ));
        }
        violations.extend(audit::at_most_two_keys(&self.proxy.entries()));
        self.watch.abort();
        delete_class(&self.bed.kube, &self.class).await;
        violations
    }
}

fn exempt_none(_: &str, _: f64, _: f64) -> bool {
    false
}

#[tokio::test]
async fn sigkill_at_random_moments_while_grants_converge_and_rotate() {
    let Some(_) = mode() else { return };
    let Some(bed) = testbed().await else { return };
    let (trials, grants, kills) = if full() { (20, 200, 3) } else { (1, 40, 3) };
    let grace = Duration::from_secs(8);
    let mut violations = Vec::new();
    let mut converge = Vec::new();
    for trial_no in 0..trials {
        let mut t = Trial::new(
            &bed,
            &format!("kill-{trial_no}"),
            &["--key-grace-period", "8s"],
        )
        .await;
        let names: Vec<String> = (0..grants).map(|i| format!("g{i:03}")).collect();
        t.apply_many(&names).await;
        for kill in 0..kills {
            tokio::time::sleep(Duration::from_millis(rand::random_range(300..2500))).await;
            t.restart();
            if kill == 0 {
                for name in names.iter().step_by(4) {
                    t.rotate(name, &format!("r{trial_no}")).await;
                }
            }
        }
        match t.all_ready(READY_TIMEOUT).await {
            Ok(seconds) => converge.push(seconds),
            Err(why) => violations.push(format!("trial {trial_no}: {why}")),
        }
        // Let the rotated keys' grace run out, then judge the whole history.
        tokio::time::sleep(grace + Duration::from_secs(4)).await;
        t.all_ready(READY_TIMEOUT).await.ok();
        let mut found = audit::iam_grants_converged(&t.bed.kube, &t.ns, &t.bed.moto, &t.path).await;
        let entries = t.proxy.entries();
        found.extend(audit::grace_honoured(
            &entries,
            &t.history.seen(),
            grace,
            Duration::from_secs(1),
            exempt_none,
        ));
        // I6: one key for the issue, one for the rotation, and one more per kill at most.
        for (user, created) in audit::keys_created(&entries) {
            if created > 2 + kills {
                found.push(format!("{user}: {created} keys created (I6)"));
            }
        }
        found.extend(t.finish().await);
        violations.extend(found.into_iter().map(|v| format!("trial {trial_no}: {v}")));
    }
    report(
        "SIGKILL at random moments during convergence, with rotation requests",
        trials,
        &violations,
        &converge,
        "I1–I6; all Ready after restart",
        serde_json::json!({"grants": grants, "kills_per_trial": kills}),
    );
}

#[tokio::test]
async fn sigkill_right_after_each_mutating_iam_call() {
    let Some(_) = mode() else { return };
    let Some(bed) = testbed().await else { return };
    let trials_per_call = if full() { 5 } else { 1 };
    let calls = [
        "CreateUser",
        "PutUserPolicy",
        "CreateAccessKey",
        "DeleteAccessKey",
        "DeleteUser",
    ];
    let grace = Duration::from_secs(3);
    let mut violations = Vec::new();
    let mut converge = Vec::new();
    let mut killed = 0;
    for call in calls {
        for trial_no in 0..trials_per_call {
            let label = format!("{call}#{trial_no}");
            let mut t = Trial::new(
                &bed,
                &format!("ftk-{}", call.to_lowercase()),
                &["--key-grace-period", "3s"],
            )
            .await;
            let pid_file = t.pid_file.display().to_string();
            let rule = serde_json::json!([{"id": "kill", "action": call, "fault": "forward_then_kill", "count": 1, "pid_file": pid_file}]);
            match call {
                "DeleteAccessKey" => {
                    t.apply("app", "").await;
                    t.all_ready(READY_TIMEOUT).await.ok();
                    t.proxy.set_rules(rule).await;
                    t.rotate("app", "r1").await;
                }
                "DeleteUser" => {
                    t.apply("app", "").await;
                    t.all_ready(READY_TIMEOUT).await.ok();
                    t.proxy.set_rules(rule).await;
                    t.grants()
                        .delete("app", &DeleteParams::default())
                        .await
                        .unwrap();
                }
                _ => {
                    t.proxy.set_rules(rule).await;
                    t.apply("app", "").await;
                }
            }
            // The proxy forwards the call, then kills the operator before it hears back.
            let died = wait_until(Duration::from_secs(60), || {
                let running = t.operator.as_mut().is_some_and(Operator::is_running);
                async move { (!running).then_some(()) }
            })
            .await;
            if !died {
                violations.push(format!(
                    "{label}: the operator was never killed after {call}"
                ));
            } else {
                killed += 1;
            }
            let restarted_at = Instant::now();
            t.restart();
            let outcome = if call == "DeleteUser" {
                wait_until(READY_TIMEOUT, || async {
                    t.grants()
                        .get_opt("app")
                        .await
                        .ok()?
                        .is_none()
                        .then_some(())
                })
                .await
                .then(|| restarted_at.elapsed().as_secs_f64())
                .ok_or("the deleted grant was never released".to_string())
            } else {
                t.all_ready(READY_TIMEOUT).await
            };
            match outcome {
                Ok(seconds) => converge.push(seconds),
                Err(why) => violations.push(format!("{label}: {why}")),
            }
            if call == "DeleteAccessKey" {
                tokio::time::sleep(grace + Duration::from_secs(3)).await;
            }
            let mut found =
                audit::iam_grants_converged(&t.bed.kube, &t.ns, &t.bed.moto, &t.path).await;
            let entries = t.proxy.entries();
            found.extend(audit::grace_honoured(
                &entries,
                &t.history.seen(),
                grace,
                Duration::from_secs(1),
                exempt_none,
            ));
            // I6: the key, plus the one a kill after CreateAccessKey orphans (or the
            // rotation's key).
            for (user, created) in audit::keys_created(&entries) {
                if created > 2 {
                    found.push(format!("{user}: {created} keys created (I6)"));
                }
            }
            found.extend(t.finish().await);
            violations.extend(found.into_iter().map(|v| format!("{label}: {v}")));
        }
    }
    report(
        "SIGKILL right after each mutating IAM call (the proxy forwards, then kills)",
        calls.len() * trials_per_call,
        &violations,
        &converge,
        "I1–I6",
        serde_json::json!({"calls": calls, "killed": killed}),
    );
}

/// Polls `check` until it gives a value or `timeout` passes; false on timeout.
async fn wait_until<T, F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await.is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
async fn throttling_and_server_errors_from_iam() {
    let Some(_) = mode() else { return };
    let Some(bed) = testbed().await else { return };
    let (trials, window, grants) = if full() {
        (3, Duration::from_secs(300), 30)
    } else {
        (1, Duration::from_secs(30), 20)
    };
    let mut violations = Vec::new();
    let mut converge = Vec::new();
    let mut rates = Vec::new();
    for trial_no in 0..trials {
        let t = Trial::new(
            &bed,
            &format!("throttle-{trial_no}"),
            &["--key-grace-period", "5s"],
        )
        .await;
        let names: Vec<String> = (0..grants).map(|i| format!("g{i:03}")).collect();
        let (settled, churn) = names.split_at(grants / 2);
        t.apply_many(settled).await;
        t.all_ready(READY_TIMEOUT).await.ok();
        t.proxy
            .set_rules(serde_json::json!([
                {"id": "throttle", "service": "iam", "action": "*", "fault": "error", "probability": 0.3, "code": "Throttling", "status": 400, "message": "Rate exceeded"},
                {"id": "5xx", "service": "iam", "action": "*", "fault": "error", "probability": 0.14, "code": "ServiceFailure", "status": 500, "message": "injected"}
            ]))
            .await;
        let began = unix_now();
        // Work arrives during the brown-out: new grants, rotations, deletions.
        t.apply_many(churn).await;
        for name in settled.iter().step_by(3) {
            t.rotate(name, "during-brown-out").await;
        }
        for name in settled.iter().skip(1).step_by(5) {
            t.grants()
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
        }
        tokio::time::sleep(window).await;
        t.proxy.reset().await;
        let ended = unix_now();
        match t.all_ready(READY_TIMEOUT).await {
            Ok(seconds) => converge.push(seconds),
            Err(why) => violations.push(format!("trial {trial_no}: {why}")),
        }
        let entries = t.proxy.entries();
        let during = entries
            .iter()
            .filter(|e| e["service"] == "iam")
            .filter(|e| e["t"].as_f64().is_some_and(|at| at >= began && at <= ended))
            .count();
        let per_second = during as f64 / (ended - began);
        rates.push((per_second * 10.0).round() / 10.0);
        // Bounded: with backoff, each grant costs a few calls per minute, not a loop.
        let per_grant_minute = per_second * 60.0 / grants as f64;
        if per_grant_minute > 30.0 {
            violations.push(format!(
                "trial {trial_no}: {per_second:.1} IAM calls/s during the brown-out ({per_grant_minute:.1} per grant per minute): not bounded"
            ));
        }
        let mut found = audit::iam_grants_converged(&t.bed.kube, &t.ns, &t.bed.moto, &t.path).await;
        found.extend(audit::grace_honoured(
            &entries,
            &t.history.seen(),
            Duration::from_secs(5),
            Duration::from_secs(1),
            exempt_none,
        ));
        found.extend(t.finish().await);
        violations.extend(found.into_iter().map(|v| format!("trial {trial_no}: {v}")));
    }
    report(
        "30 % Throttling and 14 % 5xx from IAM",
        trials,
        &violations,
        &converge,
        "all converge after; IAM call rate bounded",
        serde_json::json!({"window_s": window.as_secs(), "grants": grants, "iam_calls_per_s_during": rates}),
    );
}

#[tokio::test]
async fn a_user_created_and_deleted_within_a_second_is_not_lost_to_eventual_consistency() {
    let Some(_) = mode() else { return };
    let Some(bed) = testbed().await else { return };
    let trials = if full() { 20 } else { 3 };
    let mut violations = Vec::new();
    let mut converge = Vec::new();
    let t = Trial::new(&bed, "consistency", &[]).await;
    t.proxy
        .control_put(
            "/consistency",
            &serde_json::json!({"consistency_seconds": 5}).to_string(),
        )
        .await;
    for trial_no in 0..trials {
        let name = format!("g{trial_no:02}");
        t.apply(&name, "").await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(200..1000))).await;
        let deleted_at = Instant::now();
        t.grants()
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
        let gone = wait_until(Duration::from_secs(120), || async {
            t.grants()
                .get_opt(&name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
        if gone {
            converge.push(deleted_at.elapsed().as_secs_f64());
        } else {
            violations.push(format!("{name}: not released in 120 s"));
        }
    }
    // Once everything is visible again: no user may be left (I1).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let left = iam_users_under(&bed.moto, &t.path).await;
    if !left.is_empty() {
        violations.push(format!("{} users left behind (I1): {left:?}", left.len()));
    }
    let created = audit::keys_created(&t.proxy.entries());
    violations.extend(t.finish().await);
    report(
        "eventual consistency T=5 s; grant created and deleted within 1 s",
        trials,
        &violations,
        &converge,
        "I1 (no orphan)",
        serde_json::json!({"users_with_keys": created.len()}),
    );
}

#[tokio::test]
async fn one_stalled_backend_does_not_delay_sts_remints_on_another() {
    let Some(_) = mode() else { return };
    let Some(bed) = testbed().await else { return };
    let (trials, stall) = if full() {
        (2, Duration::from_secs(600))
    } else {
        (1, Duration::from_secs(75))
    };
    // Sessions of 15 minutes re-minted at 5 % of their life: every ~45 s (less a jitter).
    let wait = 900.0 * 0.05;
    let mut violations = Vec::new();
    let mut lateness_all = Vec::new();
    for trial_no in 0..trials {
        let args = ["--sts-refresh-fraction", "0.05"];
        let t = Trial::new(&bed, &format!("stall-{trial_no}"), &args).await;
        // The healthy backend: the second moto, through a proxy of its own.
        let healthy = FaultProxy::aws(&bed.moto2, &format!("healthy-{trial_no}")).await;
        let other = class_on(
            &bed.kube,
            &healthy.in_front_of(&bed.moto2),
            &t.ns,
            "healthy",
            "  allowWholeBucket: true\n",
        )
        .await;
        for i in 0..8 {
            t.apply(&format!("stalled-sts-{i}"), "  duration: 15m\n")
                .await;
            t.apply(&format!("stalled-iam-{i}"), "").await;
        }
        for i in 0..8 {
            let yaml = format!(
                "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: healthy-{i}}}\nspec:\n  bucket: {}\n  className: {other}\n  prefix: h{i}/\n  duration: 15m\n",
                bed.moto2.bucket
            );
            apply_grant(&bed.kube, &t.ns, &yaml).await;
        }
        if let Err(why) = t.all_ready(READY_TIMEOUT).await {
            violations.push(format!("trial {trial_no}: before the stall: {why}"));
        }
        let began = unix_now();
        t.proxy
            .set_rules(serde_json::json!([{"id": "stall", "action": "*", "fault": "stall", "seconds": stall.as_secs() + 60}]))
            .await;
        // Touch the stalled backend's IAM grants too, so their reconciles hit the stall.
        for i in 0..8 {
            touch_grant(&bed.kube, &t.ns, &format!("stalled-iam-{i}")).await;
        }
        tokio::time::sleep(stall).await;
        let ended = unix_now();
        t.proxy.reset().await;
        // Lateness of each re-mint on the healthy backend: the gap between two AssumeRole
        // calls for one session, beyond the scheduled wait.
        let mut by_session: HashMap<String, Vec<f64>> = HashMap::new();
        for e in healthy
            .entries()
            .iter()
            .filter(|e| e["action"] == "AssumeRole")
        {
            if let (Some(session), Some(at)) =
                (e["params"]["RoleSessionName"].as_str(), e["t"].as_f64())
            {
                by_session.entry(session.to_string()).or_default().push(at);
            }
        }
        for (session, times) in &by_session {
            for pair in times.windows(2) {
                if pair[1] < began || pair[0] > ended {
                    continue;
                }
                let late = pair[1] - pair[0] - wait;
                lateness_all.push((late * 10.0).round() / 10.0);
                if late > 30.0 {
                    violations.push(format!("trial {trial_no}: session {session} re-minted {late:.0} s late during the stall"));
                }
            }
        }
        // A re-mint still overdue when the stall ended is late too (it has no pair yet).
        for (session, times) in &by_session {
            if let Some(last) = times
                .iter()
                .cloned()
                .filter(|t| *t <= ended)
                .reduce(f64::max)
            {
                let overdue = ended - last - wait;
                if overdue > 0.0 {
                    lateness_all.push((overdue * 10.0).round() / 10.0);
                }
                if overdue > 30.0 {
                    violations.push(format!(
                        "trial {trial_no}: session {session} overdue by {overdue:.0} s when the stall ended"
                    ));
                }
            }
        }
        let remints = lateness_all.len();
        if remints == 0 {
            violations.push(format!(
                "trial {trial_no}: no re-mint on the healthy backend during the stall"
            ));
        }
        // I7: no healthy Secret ever held an expired session.
        let seen = t.history.seen();
        for s in seen.iter().filter(|s| s.secret.starts_with("healthy-")) {
            if s.expires_at.is_some_and(|exp| exp <= s.t) {
                violations.push(format!(
                    "trial {trial_no}: {} held an expired session at {:.0} (I7)",
                    s.secret, s.t
                ));
            }
        }
        if let Err(why) = t.all_ready(READY_TIMEOUT).await {
            violations.push(format!("trial {trial_no}: after the stall: {why}"));
        }
        let other_class = other.clone();
        violations.extend(t.finish().await);
        delete_class(&bed.kube, &other_class).await;
    }
    let worst = lateness_all.iter().cloned().fold(f64::MIN, f64::max);
    report(
        "one backend stalled",
        trials,
        &violations,
        &[],
        "STS re-mints on the other backend on time (lateness < 30 s), I7",
        serde_json::json!({"stall_s": stall.as_secs(), "remints": lateness_all.len(), "worst_lateness_s": worst}),
    );
}
