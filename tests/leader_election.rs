//! Two replicas with leader election on the testbed's real Lease API: only the leader
//! acts, the other takes over within the lease time when it dies, a leader paused past
//! its lease makes no AWS call when it resumes (the fence), and a standby whose wall
//! clock is skewed never takes a live Lease (I8 in LIFECYCLE.md).
//!
//! AWS calls are attributed to a replica by the fault proxy's log: each replica runs with
//! its own `AWS_SDK_UA_APP_ID`, which the SDK puts in its user agent as `app/<id>`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::proxy::FaultProxy;
use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

const LEASE_SECONDS: u64 = 4;
/// A leader stops acting this long after it sent its last successful renewal (the lease
/// less the margin of `leader::Timing`: max(1 s, lease / 5)).
const FENCE_SECONDS: f64 = 3.0;
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn replica(namespace: &str, identity: &str) -> Operator {
    replica_with_env(namespace, identity, &[])
}

/// A replica whose AWS calls the proxy log attributes to `identity`.
fn replica_with_env(namespace: &str, identity: &str, env: &[(&str, &str)]) -> Operator {
    let lease = format!("{LEASE_SECONDS}s");
    let mut env = env.to_vec();
    env.push(("AWS_SDK_UA_APP_ID", identity));
    Operator::start_with_env(
        namespace,
        &[
            "--leader-election",
            "--lease-namespace",
            namespace,
            "--lease-duration",
            &lease,
            "--identity",
            identity,
        ],
        &env,
    )
}

async fn lease(client: &kube::Client, namespace: &str) -> Option<Lease> {
    Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt("s3grant-leader")
        .await
        .ok()?
}

async fn holder(client: &kube::Client, namespace: &str) -> Option<String> {
    lease(client, namespace).await?.spec?.holder_identity
}

/// Waits until `identity` holds the Lease.
async fn wait_holder(client: &kube::Client, namespace: &str, identity: &str, timeout: Duration) {
    wait_for(timeout, &format!("{identity} to hold the Lease"), || async move {
        (holder(client, namespace).await.as_deref() == Some(identity)).then_some(())
    })
    .await;
}

fn grant_yaml(name: &str, bucket: &str, class: &str) -> String {
    format!(
        "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {name}}}\nspec: {{bucket: {bucket}, prefix: {name}/, className: {class}}}\n"
    )
}

fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The proxy log's entries for calls made by `client`.
fn calls_by<'a>(entries: &'a [serde_json::Value], client: &str) -> Vec<&'a serde_json::Value> {
    entries.iter().filter(|e| e["client"] == client).collect()
}

fn signal(operator: &Operator, name: &str) {
    let pid = operator.pid().expect("the replica runs");
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// The wall-clock time (unix seconds) of the first line an operator logged.
fn first_log_time(log: &str) -> Option<f64> {
    let stamp: jiff::Timestamp = log.split_whitespace().next()?.parse().ok()?;
    Some(stamp.as_millisecond() as f64 / 1000.0)
}

#[tokio::test]
async fn only_the_leader_acts_and_the_other_takes_over_when_it_dies() {
    let Some(bed) = testbed().await else { return };
    let ns = namespace(&bed.kube, "leader", &[]).await;
    let class = class_on(&bed.kube, &bed.moto, &ns, "leader", "").await;
    let grant = |name: &str| grant_yaml(name, &bed.moto.bucket, &class);

    let mut replicas = [replica(&ns, "replica-a"), replica(&ns, "replica-b")];
    let leader = wait_for(Duration::from_secs(30), "a leader", || {
        holder(&bed.kube, &ns)
    })
    .await;
    apply_grant(&bed.kube, &ns, &grant("first")).await;
    wait_ready(&bed.kube, &ns, "first", "True", Duration::from_secs(30)).await;

    let (leader_index, standby_index) = if leader == "replica-a" {
        (0, 1)
    } else {
        (1, 0)
    };
    assert!(replicas[leader_index].log_text().contains("became leader"));
    let standby_log = replicas[standby_index].log_text();
    assert!(
        standby_log.contains("waiting to become leader"),
        "{standby_log}"
    );
    assert!(
        !standby_log.contains("credentials written"),
        "the standby acted:\n{standby_log}"
    );
    let standby_ready = http_get(&format!("{}/readyz", replicas[standby_index].admin)).await;
    assert!(standby_ready.is_some(), "a standby replica reports ready");

    replicas[leader_index].kill();
    let killed_at = Instant::now();
    apply_grant(&bed.kube, &ns, &grant("second")).await;
    let new_leader = wait_for(
        Duration::from_secs(LEASE_SECONDS * 4),
        "the standby to take the Lease",
        || {
            let client = bed.kube.clone();
            let ns = ns.clone();
            let leader = leader.clone();
            async move { holder(&client, &ns).await.filter(|h| *h != leader) }
        },
    )
    .await;
    wait_ready(&bed.kube, &ns, "second", "True", Duration::from_secs(30)).await;
    let takeover = killed_at.elapsed();
    eprintln!("takeover after the leader's SIGKILL: {takeover:?} (lease {LEASE_SECONDS}s)");
    assert_ne!(new_leader, leader);
    assert!(
        takeover < Duration::from_secs(LEASE_SECONDS * 3),
        "took {takeover:?}"
    );
    assert!(
        replicas[standby_index]
            .log_text()
            .contains("credentials written"),
        "the new leader acts"
    );
    delete_class(&bed.kube, &class).await;
}

/// The leader is stopped by the proxy itself (SIGSTOP) right after moto has created an
/// IAM user for it and before it hears the answer: it resumes in the middle of a
/// reconcile, with the rest of that grant's AWS calls still to make, long after the other
/// replica took over.
/// Trials of the fault suite: 1 in a plain `cargo test`, more with `S3GRANT_FAULTS`.
fn trials(quick: usize, full: usize) -> usize {
    match std::env::var("S3GRANT_FAULTS").as_deref() {
        Ok("quick") => quick,
        Ok("full") => full,
        _ => 1,
    }
}

/// Runs `trial` `n` times; a trial that panics is a violation (its message kept). Prints
/// the fault suite's row (tests/faults.sh), then fails on any violation.
async fn run_trials<F, Fut>(fault: &str, must_hold: &str, n: usize, trial: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = f64> + Send + 'static,
{
    let (mut converge, mut violations) = (Vec::new(), Vec::new());
    for i in 0..n {
        match tokio::spawn(trial(i)).await {
            Ok(seconds) => converge.push((seconds * 100.0).round() / 100.0),
            Err(err) => {
                let message = err
                    .try_into_panic()
                    .ok()
                    .and_then(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    })
                    .unwrap_or_else(|| "the trial was cancelled".into());
                violations.push(format!("trial {i}: {message}"));
            }
        }
    }
    let row = serde_json::json!({
        "fault": fault, "trials": n, "violations": violations.len(),
        "converge_s": converge, "must_hold": must_hold,
        "measured": {"what": "seconds from the fault to the new leader holding the Lease"},
    });
    eprintln!("FAULT-ROW {row}");
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[tokio::test]
async fn a_leader_paused_past_its_lease_makes_no_aws_call_when_it_resumes() {
    let Some(bed) = testbed().await else { return };
    run_trials(
        "leader SIGSTOPped past its lease, then resumed",
        "I8: the resumed replica makes no AWS call before it knows it lost",
        trials(2, 10),
        move |_| paused_leader(bed.clone()),
    )
    .await;
}

/// One trial: returns the takeover time after the SIGSTOP.
async fn paused_leader(bed: Testbed) -> f64 {
    let ns = namespace(&bed.kube, "paused", &[]).await;
    let proxy = FaultProxy::aws(&bed.moto, "paused-leader").await;
    let class = class_on(&bed.kube, &proxy.in_front_of(&bed.moto), &ns, "paused", "").await;
    let grant = |name: &str| grant_yaml(name, &bed.moto.bucket, &class);

    let mut replicas = [replica(&ns, "paused-a"), replica(&ns, "paused-b")];
    let leader = wait_for(Duration::from_secs(30), "a leader", || {
        holder(&bed.kube, &ns)
    })
    .await;
    let (leader_index, standby_index) = if leader == "paused-a" { (0, 1) } else { (1, 0) };
    let standby = if leader == "paused-a" {
        "paused-b"
    } else {
        "paused-a"
    };
    apply_grant(&bed.kube, &ns, &grant("before")).await;
    wait_ready(&bed.kube, &ns, "before", "True", Duration::from_secs(30)).await;
    assert!(
        !calls_by(&proxy.entries(), &leader).is_empty(),
        "the proxy log names the leader's calls"
    );

    let pid = replicas[leader_index].pid().unwrap();
    proxy
        .set_rules(serde_json::json!([{
            "id": "pause-the-leader", "action": "CreateUser", "client": leader,
            "fault": "forward_then_kill", "signal": "STOP", "pid": pid, "count": 1,
        }]))
        .await;
    apply_grant(&bed.kube, &ns, &grant("in-flight")).await;
    let stop = wait_for(
        Duration::from_secs(30),
        "the proxy to stop the leader after its CreateUser",
        || {
            let entries = proxy.entries();
            async move {
                entries
                    .into_iter()
                    .find(|e| e["signal"] == "SIGSTOP" && e["killed"].as_u64().is_some())
            }
        },
    )
    .await;
    assert_eq!(stop["status"], 200, "moto created the user: {stop}");
    // The request was read at `t`; the STOP was sent once moto had answered.
    let stopped_at = stop["t"].as_f64().unwrap() + stop["ms"].as_f64().unwrap() / 1000.0;
    let stopped = Instant::now() - Duration::from_secs_f64((wall_now() - stopped_at).max(0.0));

    wait_holder(
        &bed.kube,
        &ns,
        standby,
        Duration::from_secs(LEASE_SECONDS * 5),
    )
    .await;
    let takeover = stopped.elapsed();
    // The standby finishes the interrupted grant (it adopts the user the paused leader
    // created) and issues a new one.
    wait_ready(&bed.kube, &ns, "in-flight", "True", Duration::from_secs(60)).await;
    apply_grant(&bed.kube, &ns, &grant("after")).await;
    wait_ready(&bed.kube, &ns, "after", "True", Duration::from_secs(60)).await;
    assert!(
        !calls_by(&proxy.entries(), standby).is_empty(),
        "the new leader acts"
    );

    // Paused for three leases at least, then resumed.
    let pause = Duration::from_secs(LEASE_SECONDS * 3);
    if let Some(left) = pause.checked_sub(stopped.elapsed()) {
        tokio::time::sleep(left).await;
    }
    signal(&replicas[leader_index], "CONT");
    let resumed_at = wall_now();
    let resumed = Instant::now();
    let paused_for = stopped.elapsed();
    while replicas[leader_index].is_running() {
        assert!(
            resumed.elapsed() < Duration::from_secs(30),
            "the resumed replica is still running 30 s after its SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit_after_resume = resumed.elapsed();
    // Its last renewal was sent before the STOP, so its fence closed FENCE_SECONDS after
    // it at the latest.
    let fence_closed_by = stopped_at + FENCE_SECONDS;
    let exited_at = wall_now();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let entries = proxy.entries();
    let resumed_calls: Vec<_> = calls_by(&entries, &leader)
        .into_iter()
        .filter(|e| e["t"].as_f64().unwrap() >= stopped_at)
        .collect();
    let log = replicas[leader_index].log_text();
    let refused = log.matches("not the leader").count();
    eprintln!(
        "paused leader: takeover {takeover:.2?} after its SIGSTOP (lease {LEASE_SECONDS}s); \
         paused {paused_for:.2?}; exited {exit_after_resume:.2?} after its SIGCONT, at least \
         {:.2} s after its fence had closed; AWS calls from it after the STOP: {}; calls its \
         fence refused: {refused}",
        exited_at - fence_closed_by,
        resumed_calls.len(),
    );
    assert!(
        resumed_calls.is_empty(),
        "the paused leader made AWS calls after its STOP (resumed at {resumed_at:.3}, fence closed by {fence_closed_by:.3}): {resumed_calls:#?}"
    );
    let exit_line = log
        .lines()
        .find(|l| l.contains("lost the leader-election Lease") && l.contains("exiting"))
        .unwrap_or_else(|| panic!("the resumed replica says why it exits:\n{log}"));
    eprintln!("the resumed replica's last words: {exit_line}");
    // Not an AWS call, so not I8's business, but worth seeing: the interrupted grant's
    // status as the new leader wrote it, after the old one resumed and exited.
    let in_flight = Api::<s3grant::api::S3Grant>::namespaced(bed.kube.clone(), &ns)
        .get("in-flight")
        .await
        .unwrap();
    eprintln!(
        "in-flight grant after the resume: {:?}",
        ready_condition(&in_flight)
    );
    assert!(
        !replicas[standby_index]
            .log_text()
            .contains("lost the leader-election Lease"),
        "the new leader keeps the Lease"
    );
    assert_eq!(
        holder(&bed.kube, &ns).await.as_deref(),
        Some(standby),
        "the Lease stays with the new leader"
    );
    delete_class(&bed.kube, &class).await;
    takeover.as_secs_f64()
}

/// For a wall clock 10 s ahead and 10 s behind: the standby must leave a live Lease alone
/// (a follower comparing the holder's renewTime with its own clock would take it at once
/// when ahead), make no AWS call, and still take over in time when the leader dies.
#[tokio::test]
async fn a_standbys_clock_skewed_ten_seconds_never_takes_a_live_lease() {
    let Some(bed) = testbed().await else { return };
    if !std::path::Path::new(LIBFAKETIME).exists() {
        eprintln!("skipped: no {LIBFAKETIME} (apt-get install faketime)");
        return;
    }
    for (skew, seconds) in [("+10s", 10.0), ("-10s", -10.0)] {
        let bed = bed.clone();
        run_trials(
            &format!("standby's clock skewed {skew}"),
            "I8; the healthy leader keeps the lease",
            trials(1, 10),
            move |_| skewed_standby(bed.clone(), skew, seconds),
        )
        .await;
    }
}

/// One trial: returns the takeover time after the healthy leader's SIGKILL.
async fn skewed_standby(bed: Testbed, skew: &'static str, seconds: f64) -> f64 {
    {
        let ns = namespace(&bed.kube, "skew", &[]).await;
        let proxy = FaultProxy::aws(&bed.moto, "skewed-standby").await;
        let class = class_on(&bed.kube, &proxy.in_front_of(&bed.moto), &ns, "skew", "").await;
        let grant = |name: &str| grant_yaml(name, &bed.moto.bucket, &class);

        let mut healthy = replica(&ns, "healthy");
        wait_holder(&bed.kube, &ns, "healthy", Duration::from_secs(30)).await;
        let skewed = replica_with_env(
            &ns,
            "skewed",
            &[
                ("LD_PRELOAD", LIBFAKETIME),
                ("FAKETIME", skew),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        );
        // The skew is real: the standby's log lines carry its clock.
        let (logged_at, read_at) =
            wait_for(Duration::from_secs(30), "the skewed standby to log", || {
                let log = skewed.log_text();
                async move {
                    log.contains("waiting to become leader")
                        .then(|| first_log_time(&log).map(|t| (t, wall_now())))
                        .flatten()
                }
            })
            .await;
        let shown_skew = logged_at - read_at;
        assert!(
            (shown_skew - seconds).abs() < 3.0,
            "FAKETIME={skew} should skew the standby's wall clock; its log is {shown_skew:.1} s off"
        );
        let transitions = lease(&bed.kube, &ns)
            .await
            .and_then(|l| l.spec?.lease_transitions);

        apply_grant(&bed.kube, &ns, &grant("while-skewed")).await;
        wait_ready(
            &bed.kube,
            &ns,
            "while-skewed",
            "True",
            Duration::from_secs(30),
        )
        .await;
        // Three leases: the healthy leader keeps the Lease all along.
        let watched = Instant::now();
        while watched.elapsed() < Duration::from_secs(LEASE_SECONDS * 3) {
            let lease = lease(&bed.kube, &ns).await.and_then(|l| l.spec);
            let lease = lease.expect("the Lease exists");
            assert_eq!(
                lease.holder_identity.as_deref(),
                Some("healthy"),
                "FAKETIME={skew}: the standby took a live Lease after {:?}",
                watched.elapsed()
            );
            assert_eq!(lease.lease_transitions, transitions, "FAKETIME={skew}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let skewed_log = skewed.log_text();
        assert!(
            !skewed_log.contains("became leader"),
            "FAKETIME={skew}:\n{skewed_log}"
        );
        let entries = proxy.entries();
        assert!(!calls_by(&entries, "healthy").is_empty());
        assert!(
            calls_by(&entries, "skewed").is_empty(),
            "FAKETIME={skew}: the standby made AWS calls: {:#?}",
            calls_by(&entries, "skewed")
        );

        // The skew does not slow a takeover either: only monotonic time counts.
        healthy.kill();
        let killed = Instant::now();
        wait_holder(
            &bed.kube,
            &ns,
            "skewed",
            Duration::from_secs(LEASE_SECONDS * 4),
        )
        .await;
        let takeover = killed.elapsed();
        let renewed = lease(&bed.kube, &ns)
            .await
            .and_then(|l| l.spec?.renew_time)
            .expect("the new holder wrote a renewTime");
        let written_skew = renewed.0.as_millisecond() as f64 / 1000.0 - wall_now();
        apply_grant(&bed.kube, &ns, &grant("after-takeover")).await;
        wait_ready(
            &bed.kube,
            &ns,
            "after-takeover",
            "True",
            Duration::from_secs(30),
        )
        .await;
        eprintln!(
            "FAKETIME={skew}: the healthy leader kept the Lease for {:?}; the skewed standby \
             made no AWS call, took over {takeover:.2?} after the leader's SIGKILL (lease \
             {LEASE_SECONDS}s), and its renewTime is {written_skew:+.1} s off",
            Duration::from_secs(LEASE_SECONDS * 3)
        );
        assert!(
            takeover < Duration::from_secs(LEASE_SECONDS * 3),
            "FAKETIME={skew}: took {takeover:?}"
        );
        assert!(
            (written_skew - seconds).abs() < 3.0,
            "FAKETIME={skew}: the renewTime the skewed replica wrote is {written_skew:.1} s off"
        );
        // The skewed replica, now the leader, revokes what the class's grants hold.
        delete_class(&bed.kube, &class).await;
        drop(skewed);
        takeover.as_secs_f64()
    }
}

/// SIGTERM: the leader finishes, closes its fence, then frees the Lease, so the standby
/// takes over at its next read instead of after a lease.
#[tokio::test]
async fn a_leader_stopped_by_sigterm_hands_the_lease_over_at_once() {
    let Some(bed) = testbed().await else { return };
    let ns = namespace(&bed.kube, "handover", &[]).await;
    let mut replicas = [replica(&ns, "handover-a"), replica(&ns, "handover-b")];
    let leader = wait_for(Duration::from_secs(30), "a leader", || {
        holder(&bed.kube, &ns)
    })
    .await;
    let (leader_index, standby) = if leader == "handover-a" {
        (0, "handover-b")
    } else {
        (1, "handover-a")
    };
    // Let the leader renew a few times first.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS)).await;
    let asked = Instant::now();
    let status = replicas[leader_index].terminate();
    let stopped = asked.elapsed();
    wait_holder(
        &bed.kube,
        &ns,
        standby,
        Duration::from_secs(LEASE_SECONDS * 3),
    )
    .await;
    let takeover = asked.elapsed();
    eprintln!(
        "SIGTERM: the leader exited in {stopped:.2?} ({status}); the standby held the Lease {takeover:.2?} after the signal (lease {LEASE_SECONDS}s)"
    );
    assert!(status.success(), "{status}");
    assert!(
        replicas[leader_index]
            .log_text()
            .contains("released the Lease"),
        "{}",
        replicas[leader_index].log_text()
    );
    // A released Lease is taken at the standby's next read (every second with a 4 s
    // lease), not after the lease runs out.
    assert!(
        takeover < stopped + Duration::from_secs(LEASE_SECONDS),
        "took {takeover:?}"
    );
}

/// `tests/faults/proxy.py --mode tcp` in front of the API server; killed when dropped.
struct TcpProxy {
    child: Child,
    listen: String,
    control: String,
}

impl TcpProxy {
    async fn start(upstream: &str) -> TcpProxy {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-proxies");
        std::fs::create_dir_all(&dir).unwrap();
        let tag = format!("leader-tcp-{:08x}", rand::random::<u32>());
        let ready = dir.join(format!("{tag}.ready"));
        let child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/faults/proxy.py"
            ))
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(["--mode", "tcp", "--control", "127.0.0.1:0"])
            .arg("--log")
            .arg(dir.join(format!("{tag}.log")))
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tests/faults/proxy.py --mode tcp");
        let line = wait_for(Duration::from_secs(15), "the tcp proxy to start", || {
            let ready = ready.clone();
            async move { std::fs::read_to_string(&ready).ok() }
        })
        .await;
        let state: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        TcpProxy {
            child,
            listen: state["listen"].as_str().unwrap().to_string(),
            control: state["control"].as_str().unwrap().to_string(),
        }
    }

    /// `pass`, `stall`, `reset` or `refuse` (tests/faults/README.md).
    async fn set_mode(&self, mode: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = serde_json::json!({ "tcp": mode }).to_string();
        let mut stream = tokio::net::TcpStream::connect(&self.control).await.unwrap();
        let request = format!(
            "PUT /tcp HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.control,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "PUT /tcp {mode}: {response}"
        );
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The testbed's kubeconfig as YAML, and the `host:port` of its API server.
fn testbed_kubeconfig() -> (serde_yaml::Value, String) {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG from the testbed's env");
    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let server = config["clusters"][0]["cluster"]["server"]
        .as_str()
        .expect("server in the testbed's kubeconfig")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    (config, server)
}

/// A copy of the testbed's kubeconfig that reaches the API server through `listen` (same
/// CA and client certificate: the serving certificate is for 127.0.0.1, any port).
fn kubeconfig_through(listen: &str, path: &Path) {
    let (mut config, _) = testbed_kubeconfig();
    for cluster in config["clusters"].as_sequence_mut().expect("clusters") {
        cluster["cluster"]["server"] = serde_yaml::Value::from(format!("https://{listen}"));
    }
    std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
}

/// The leader's connection to the API server stalls: it hears nothing, not even an
/// error, and its renewals hang. It must stop acting when its own clock says the lease
/// (less the margin) has run out since its last renewal, and exit; the standby takes over.
#[tokio::test]
async fn a_leader_whose_renewals_stall_stops_acting_when_its_lease_runs_out() {
    let Some(bed) = testbed().await else { return };
    let ns = namespace(&bed.kube, "cutoff", &[]).await;
    let proxy = FaultProxy::aws(&bed.moto, "cut-off-leader").await;
    let class = class_on(&bed.kube, &proxy.in_front_of(&bed.moto), &ns, "cutoff", "").await;
    let grant = |name: &str| grant_yaml(name, &bed.moto.bucket, &class);
    let (_, upstream) = testbed_kubeconfig();
    let tcp = TcpProxy::start(&upstream).await;
    let kubeconfig = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fault-proxies")
        .join(format!("{ns}.kubeconfig"));
    kubeconfig_through(&tcp.listen, &kubeconfig);

    let mut cut_off = replica_with_env(
        &ns,
        "cut-off",
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    wait_holder(&bed.kube, &ns, "cut-off", Duration::from_secs(30)).await;
    let _standby = replica(&ns, "direct");
    apply_grant(&bed.kube, &ns, &grant("before")).await;
    wait_ready(&bed.kube, &ns, "before", "True", Duration::from_secs(30)).await;
    // Let it renew a few times through the proxy first.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS)).await;

    tcp.set_mode("stall").await;
    let cut_at = wall_now();
    let cut = Instant::now();
    while cut_off.is_running() {
        assert!(
            cut.elapsed() < Duration::from_secs(LEASE_SECONDS * 5),
            "the cut-off leader still runs {:?} after its connection stalled",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exited = cut.elapsed();
    wait_holder(
        &bed.kube,
        &ns,
        "direct",
        Duration::from_secs(LEASE_SECONDS * 5),
    )
    .await;
    let takeover = cut.elapsed();
    apply_grant(&bed.kube, &ns, &grant("after")).await;
    wait_ready(&bed.kube, &ns, "after", "True", Duration::from_secs(60)).await;

    let log = cut_off.log_text();
    let exit_line = log
        .lines()
        .find(|l| l.contains("lost the leader-election Lease") && l.contains("exiting"))
        .unwrap_or_else(|| panic!("the cut-off leader says why it exits:\n{log}"));
    let entries = proxy.entries();
    let late_calls: Vec<_> = calls_by(&entries, "cut-off")
        .into_iter()
        .filter(|e| e["t"].as_f64().unwrap() >= cut_at + FENCE_SECONDS)
        .collect();
    eprintln!(
        "stalled API connection: the leader exited {exited:.2?} after the stall (its fence \
         lasts {FENCE_SECONDS} s after its last renewal), the standby held the Lease \
         {takeover:.2?} after it (lease {LEASE_SECONDS}s); AWS calls from the cut-off leader \
         after its fence closed: {}; its last words: {exit_line}",
        late_calls.len()
    );
    assert!(exit_line.contains("not renewed in time"), "{exit_line}");
    assert!(
        exited < Duration::from_secs_f64(FENCE_SECONDS + 3.0),
        "its fence closes {FENCE_SECONDS} s after its last renewal, which came before the stall; it exited after {exited:?}"
    );
    assert!(late_calls.is_empty(), "{late_calls:#?}");
    assert!(
        !calls_by(&entries, "direct").is_empty(),
        "the new leader acts"
    );
    delete_class(&bed.kube, &class).await;
}
