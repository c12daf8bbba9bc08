//! The fault proxy (tests/faults/proxy.py) from a test: started in front of a testbed
//! server, its log read back as the AWS-side record of every call the operator made.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{wait_for, AwsTarget};

pub struct FaultProxy {
    child: Child,
    /// `http://127.0.0.1:PORT`: give this to a class as its endpoint.
    pub endpoint: String,
    control: String,
    pub log: PathBuf,
}

impl FaultProxy {
    /// A proxy in `aws` mode in front of `target`, passing everything through.
    pub async fn aws(target: &AwsTarget, name: &str) -> FaultProxy {
        let upstream = target
            .endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-proxies");
        std::fs::create_dir_all(&dir).unwrap();
        let tag = format!("{name}-{:08x}", rand::random::<u32>());
        let log = dir.join(format!("{tag}.log"));
        let ready = dir.join(format!("{tag}.ready"));
        let child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/faults/proxy.py"
            ))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &upstream,
                "--mode",
                "aws",
            ])
            .args(["--control", "127.0.0.1:0"])
            .arg("--log")
            .arg(&log)
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tests/faults/proxy.py");
        let line = wait_for(Duration::from_secs(15), "the fault proxy to start", || {
            let ready = ready.clone();
            async move { std::fs::read_to_string(&ready).ok() }
        })
        .await;
        let state: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        FaultProxy {
            child,
            endpoint: format!("http://{}", state["listen"].as_str().unwrap()),
            control: state["control"].as_str().unwrap().to_string(),
            log,
        }
    }

    /// `target` as reached through this proxy (for a class's endpoint).
    pub fn in_front_of(&self, target: &AwsTarget) -> AwsTarget {
        AwsTarget {
            endpoint: self.endpoint.clone(),
            ..target.clone()
        }
    }

    /// Every request relayed so far, in order.
    pub fn entries(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Replaces the proxy's rules (see tests/faults/README.md).
    pub async fn set_rules(&self, rules: serde_json::Value) {
        self.control("PUT", "/rules", &rules.to_string()).await;
    }

    /// Any other control call that replaces a setting (e.g. `/consistency`, `/tcp`).
    pub async fn control_put(&self, path: &str, body: &str) {
        self.control("PUT", path, body).await;
    }

    pub async fn reset(&self) {
        self.control("POST", "/reset", "{}").await;
    }

    async fn control(&self, method: &str, path: &str, body: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&self.control).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.control,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "proxy control {method} {path}: {response}"
        );
        response
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The entries of `action` (e.g. "CreateAccessKey") that the upstream answered with success.
pub fn succeeded<'a>(entries: &'a [serde_json::Value], action: &str) -> Vec<&'a serde_json::Value> {
    entries
        .iter()
        .filter(|e| e["action"] == action && e["status"].as_u64().is_some_and(|s| s < 300))
        .collect()
}
