//! Model-based lifecycle test: random sequences of the changes a grant lives through
//! (LIFECYCLE.md's table) over a few grants and two backends (moto and a second moto),
//! with the operator SIGKILLed and restarted at random moments. After every step the
//! servers are checked against a model of where each grant must end, and the whole
//! history (every AWS call, from fault proxies in front of both backends in pass-through
//! mode; the Secrets, sampled) against the invariants I1–I6:
//!
//! - I1 a grant that has a class holds exactly one user, on that class's backend; no user
//!   belongs to a grant that is gone or revoked;
//! - I2 no user ever holds more than two keys (replayed from the proxy logs);
//! - I3 Ready=True means the Secret's credential exists and works inside the grant's
//!   prefix and mode, and not outside it;
//! - I4 no key is deleted within the grace after it was last seen in its Secret, unless
//!   the step revoked or moved the grant, or edited or deleted its Secret;
//! - I5 the Secret holds exactly the keys of the grant's kind, prefix and endpoint,
//!   written by one field manager;
//! - I6 a step costs at most one CreateAccessKey per grant (two when the operator was
//!   killed in it), and a converged operator makes no further minting call.
//!
//! `S3GRANT_MODEL_SEQUENCES` (default 5), `S3GRANT_MODEL_STEPS` (default 12) and
//! `S3GRANT_MODEL_SEED` (replays one sequence) choose what runs; every sequence prints its
//! seed and its operations. The full run (`S3GRANT_MODEL_SEQUENCES=60`) is documented in
//! tests/README.md.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::ResourceExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use s3grant::api::{S3Grant, S3GrantClass};
use s3grant::naming::iam_user_name;

const GRANTS: [&str; 3] = ["g0", "g1", "g2"];
const PREFIXES: [&str; 2] = ["p0/", "p1/"];
const MODES: [&str; 3] = ["ReadWrite", "ReadOnly", "WriteOnly"];
const GRACE: Duration = Duration::from_secs(5);
const STEP_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Clone, Debug)]
struct GrantModel {
    /// The class it names; `None` for the default class.
    class: Option<usize>,
    prefix: usize,
    mode: usize,
    sts: bool,
    /// The last rotation request made.
    rotation: Option<String>,
}

#[derive(Clone, Debug)]
struct ClassModel {
    exists: bool,
    default: bool,
}

#[derive(Clone, Debug, Default)]
struct Model {
    classes: Vec<ClassModel>,
    grants: Vec<Option<GrantModel>>,
}

/// Where a grant must end.
#[derive(Debug, PartialEq)]
enum Expect {
    Gone,
    /// Credentials from this class.
    Ready(usize),
    /// Revoked: nothing held, no Secret.
    Revoked(&'static str),
    /// Not ready, and nothing revoked (a missing or ambiguous default).
    Held(&'static str),
}

impl Model {
    fn expect(&self, g: usize) -> Expect {
        let Some(grant) = &self.grants[g] else {
            return Expect::Gone;
        };
        match grant.class {
            Some(c) if self.classes[c].exists => Expect::Ready(c),
            Some(_) => Expect::Revoked("ClassNotFound"),
            None => {
                let defaults: Vec<usize> = (0..self.classes.len())
                    .filter(|&c| self.classes[c].exists && self.classes[c].default)
                    .collect();
                match defaults.as_slice() {
                    [c] => Expect::Ready(*c),
                    [] => Expect::Held("NoDefaultClass"),
                    _ => Expect::Held("AmbiguousDefaultClass"),
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create(usize),
    Delete(usize),
    EditScope(usize),
    ToggleDuration(usize),
    SwitchClass(usize),
    RequestRotation(usize),
    TamperSecret(usize),
    DeleteSecret(usize),
    DefaultStep(usize),
    DeleteClass(usize),
    RecreateClass(usize),
    /// Another operation, then a SIGKILL of the operator while it converges, and a restart.
    KillDuring(Box<Op>, u64),
}

impl Op {
    /// Whether the op may legitimately delete a key inside its grace (I4 does not apply).
    fn exempts(&self, g: usize) -> bool {
        match self {
            Op::Delete(x)
            | Op::ToggleDuration(x)
            | Op::SwitchClass(x)
            | Op::TamperSecret(x)
            | Op::DeleteSecret(x) => *x == g,
            Op::DefaultStep(_) | Op::DeleteClass(_) => true,
            Op::KillDuring(op, _) => op.exempts(g),
            _ => false,
        }
    }

    fn kills(&self) -> bool {
        matches!(self, Op::KillDuring(..))
    }
}

fn random_op(rng: &mut StdRng, model: &Model) -> Op {
    loop {
        let g = rng.random_range(0..GRANTS.len());
        let c = rng.random_range(0..model.classes.len());
        let exists = model.grants[g].is_some();
        let op = match rng.random_range(0..100) {
            0..=9 => Op::EditScope(g),
            10..=19 => Op::ToggleDuration(g),
            20..=31 => Op::SwitchClass(g),
            32..=41 => Op::RequestRotation(g),
            42..=47 => Op::TamperSecret(g),
            48..=53 => Op::DeleteSecret(g),
            54..=63 => Op::DefaultStep(c),
            64..=69 if model.classes[c].exists => Op::DeleteClass(c),
            64..=69 => Op::RecreateClass(c),
            70..=77 => Op::Delete(g),
            78..=85 => Op::Create(g),
            _ => {
                let inner = random_op(rng, model);
                if inner.kills() {
                    continue;
                }
                Op::KillDuring(Box::new(inner), rng.random_range(0..1200))
            }
        };
        let valid = match &op {
            Op::Create(_) => !exists,
            Op::EditScope(_)
            | Op::ToggleDuration(_)
            | Op::SwitchClass(_)
            | Op::RequestRotation(_)
            | Op::Delete(_) => exists,
            Op::TamperSecret(_) | Op::DeleteSecret(_) => exists,
            _ => true,
        };
        if valid {
            return op;
        }
    }
}

/// What the Secrets held over time, sampled: (when, grant, access key id).
type Samples = Arc<Mutex<Vec<(f64, usize, String)>>>;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

struct Sequence {
    bed: Testbed,
    ns: String,
    classes: Vec<String>,
    class_yaml: Vec<String>,
    /// The real backend of each class (for S3 checks) and the proxy in front of it.
    targets: Vec<AwsTarget>,
    proxies: Vec<FaultProxy>,
    operator: Option<Operator>,
    model: Model,
    samples: Samples,
    /// (when the step began, its op) for I4's exemptions.
    history: Vec<(f64, Op)>,
    /// How far the proxy logs were checked for I6 (entries per proxy).
    checked: Vec<usize>,
    violations: Vec<String>,
    sampler: Option<tokio::task::JoinHandle<()>>,
}

impl Sequence {
    async fn new(bed: Testbed, seed: u64) -> Sequence {
        let ns = namespace(&bed.kube, &format!("model-{seed}"), &[]).await;
        let targets = vec![bed.moto.clone(), bed.moto2.clone()];
        let mut proxies = Vec::new();
        let mut classes = Vec::new();
        let mut class_yaml = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let proxy = FaultProxy::aws(target, &format!("model-{i}")).await;
            let through = proxy.in_front_of(target);
            let credentials = backend_credentials_secret(&bed.kube, &ns, target).await;
            let name = unique(&format!("model-{i}"));
            let yaml = format!(
                "apiVersion: s3grant.io/v1alpha1\nkind: S3GrantClass\nmetadata: {{name: {name}}}\nspec:\n  backend:\n    endpoint: {}\n    region: us-east-1\n    roleArn: {}\n    iamPath: /s3grant/{name}/\n    credentialsSecretRef: {{namespace: {ns}, name: {credentials}}}\n  buckets: [{}]\n",
                through.endpoint, target.role_arn, target.bucket
            );
            apply_class(&bed.kube, &yaml).await;
            for key in ["p0/seed", "p1/seed", "other/seed"] {
                let admin = s3(
                    target,
                    &target.access_key_id,
                    &target.secret_access_key,
                    None,
                );
                assert!(can_put(&admin, &target.bucket, key).await, "seed {key}");
            }
            classes.push(name);
            class_yaml.push(yaml);
            proxies.push(proxy);
        }
        let model = Model {
            classes: vec![
                ClassModel {
                    exists: true,
                    default: false
                };
                classes.len()
            ],
            grants: vec![None; GRANTS.len()],
        };
        let mut sequence = Sequence {
            bed,
            ns,
            classes,
            class_yaml,
            targets,
            checked: vec![0; proxies.len()],
            proxies,
            operator: None,
            model,
            samples: Arc::default(),
            history: Vec::new(),
            violations: Vec::new(),
            sampler: None,
        };
        sequence.start_operator();
        sequence.start_sampler();
        sequence
    }

    fn start_operator(&mut self) {
        self.operator = Some(Operator::start(
            &self.ns,
            &["--key-grace-period", &format!("{}s", GRACE.as_secs())],
        ));
    }

    /// Samples every grant's Secret every 200 ms, for I4.
    fn start_sampler(&mut self) {
        let (client, ns, samples) = (self.bed.kube.clone(), self.ns.clone(), self.samples.clone());
        self.sampler = Some(tokio::spawn(async move {
            let secrets = Api::<Secret>::namespaced(client, &ns);
            loop {
                for (g, name) in GRANTS.iter().enumerate() {
                    if let Ok(Some(secret)) = secrets.get_opt(&format!("{name}-s3")).await {
                        if let Some(id) = secret
                            .data
                            .as_ref()
                            .and_then(|d| d.get("AWS_ACCESS_KEY_ID"))
                        {
                            let id = String::from_utf8_lossy(&id.0).to_string();
                            samples.lock().unwrap().push((unix_now(), g, id));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    fn grants(&self) -> Api<S3Grant> {
        Api::namespaced(self.bed.kube.clone(), &self.ns)
    }

    fn grant_yaml(&self, g: usize) -> String {
        let grant = self.model.grants[g].as_ref().unwrap();
        let mut spec = format!(
            "  bucket: s3grant-test\n  prefix: {}\n  mode: {}\n",
            PREFIXES[grant.prefix], MODES[grant.mode]
        );
        if let Some(c) = grant.class {
            spec.push_str(&format!("  className: {}\n", self.classes[c]));
        }
        if grant.sts {
            spec.push_str("  duration: 15m\n");
        }
        let annotations = match &grant.rotation {
            Some(r) => format!(", annotations: {{s3grant.io/rotate-requested-at: \"{r}\"}}"),
            None => String::new(),
        };
        format!(
            "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {}{annotations}}}\nspec:\n{spec}",
            GRANTS[g]
        )
    }

    async fn apply_grant(&self, g: usize) {
        apply_grant(&self.bed.kube, &self.ns, &self.grant_yaml(g)).await;
    }

    async fn set_default(&self, c: usize, default: bool) {
        let value = default.then_some("true");
        let patch = serde_json::json!({"metadata": {"annotations": {"s3grant.io/is-default-class": value}}});
        Api::<S3GrantClass>::all(self.bed.kube.clone())
            .patch(
                &self.classes[c],
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
    }

    async fn run(&mut self, op: &Op, rng: &mut StdRng) {
        match op {
            Op::Create(g) => {
                // A grant of that name still being deleted must be gone first.
                wait_gone(&self.bed.kube, &self.ns, GRANTS[*g]).await;
                self.model.grants[*g] = Some(GrantModel {
                    class: if rng.random_bool(0.25) {
                        None
                    } else {
                        Some(rng.random_range(0..self.classes.len()))
                    },
                    prefix: rng.random_range(0..PREFIXES.len()),
                    mode: rng.random_range(0..MODES.len()),
                    sts: rng.random_bool(0.3),
                    rotation: None,
                });
                self.apply_grant(*g).await;
            }
            Op::Delete(g) => {
                self.model.grants[*g] = None;
                let _ = self
                    .grants()
                    .delete(GRANTS[*g], &DeleteParams::default())
                    .await;
            }
            Op::EditScope(g) => {
                let grant = self.model.grants[*g].as_mut().unwrap();
                if rng.random_bool(0.5) {
                    grant.prefix = (grant.prefix + 1) % PREFIXES.len();
                } else {
                    grant.mode = (grant.mode + 1 + rng.random_range(0..2)) % MODES.len();
                }
                self.apply_grant(*g).await;
            }
            Op::ToggleDuration(g) => {
                let grant = self.model.grants[*g].as_mut().unwrap();
                grant.sts = !grant.sts;
                self.apply_grant(*g).await;
            }
            Op::SwitchClass(g) => {
                let classes = self.classes.len();
                let grant = self.model.grants[*g].as_mut().unwrap();
                grant.class = match grant.class {
                    Some(c) if c + 1 < classes => Some(c + 1),
                    Some(_) => None,
                    None => Some(0),
                };
                self.apply_grant(*g).await;
            }
            Op::RequestRotation(g) => {
                let grant = self.model.grants[*g].as_mut().unwrap();
                grant.rotation = Some(format!("r{:08x}", rng.random::<u32>()));
                self.apply_grant(*g).await;
            }
            Op::TamperSecret(g) => {
                let tamper =
                    serde_json::json!({"stringData": {"AWS_SECRET_ACCESS_KEY": "tampered"}});
                let _ = Api::<Secret>::namespaced(self.bed.kube.clone(), &self.ns)
                    .patch(
                        &format!("{}-s3", GRANTS[*g]),
                        &PatchParams::default(),
                        &Patch::Merge(&tamper),
                    )
                    .await;
            }
            Op::DeleteSecret(g) => {
                let _ = Api::<Secret>::namespaced(self.bed.kube.clone(), &self.ns)
                    .delete(&format!("{}-s3", GRANTS[*g]), &DeleteParams::default())
                    .await;
            }
            Op::DefaultStep(c) => {
                // One step of moving the default between the classes, in either order.
                let defaults: Vec<usize> = (0..self.classes.len())
                    .filter(|&i| self.model.classes[i].default)
                    .collect();
                let (class, default) = match defaults.as_slice() {
                    [] => (*c, true),
                    [only] if rng.random_bool(0.5) => (*only, false),
                    [only] => ((only + 1) % self.classes.len(), true),
                    [first, ..] => (*first, false),
                };
                self.model.classes[class].default = default;
                if self.model.classes[class].exists {
                    self.set_default(class, default).await;
                }
            }
            Op::DeleteClass(c) => {
                self.model.classes[*c].exists = false;
                self.model.classes[*c].default = false;
                let api = Api::<S3GrantClass>::all(self.bed.kube.clone());
                let _ = api
                    .delete(&self.classes[*c], &DeleteParams::default())
                    .await;
            }
            Op::RecreateClass(c) => {
                let api = Api::<S3GrantClass>::all(self.bed.kube.clone());
                wait_for(STEP_TIMEOUT, "the deleted class to be gone", || {
                    let (api, name) = (api.clone(), self.classes[*c].clone());
                    async move { api.get_opt(&name).await.ok()?.is_none().then_some(()) }
                })
                .await;
                self.model.classes[*c].exists = true;
                self.model.classes[*c].default = false;
                apply_class(&self.bed.kube, &self.class_yaml[*c]).await;
            }
            Op::KillDuring(op, after_ms) => {
                Box::pin(self.run(op, rng)).await;
                tokio::time::sleep(Duration::from_millis(*after_ms)).await;
                if let Some(mut operator) = self.operator.take() {
                    operator.kill();
                }
                self.start_operator();
            }
        }
    }

    /// The users under both classes' paths on both backends: (backend, user).
    async fn users(&self) -> Vec<(usize, String)> {
        let mut users = Vec::new();
        for (b, target) in self.targets.iter().enumerate() {
            for class in &self.classes {
                for user in iam_users_under(target, &format!("/s3grant/{class}/")).await {
                    users.push((b, user));
                }
            }
        }
        users
    }

    fn user_name(&self, g: usize, uid: &str) -> String {
        iam_user_name(&self.ns, GRANTS[g], uid)
    }

    /// Checks the servers against the model. `Err` says what does not hold (yet).
    async fn check_state(&self) -> Result<(), String> {
        let users = self.users().await;
        let mut expected_users: HashSet<(usize, String)> = HashSet::new();
        let mut held_users: HashSet<String> = HashSet::new();
        for (g, name) in GRANTS.iter().enumerate() {
            let expect = self.model.expect(g);
            let grant = self
                .grants()
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?;
            let Some(grant) = grant else {
                if expect != Expect::Gone {
                    return Err(format!("{name}: missing"));
                }
                continue;
            };
            if expect == Expect::Gone {
                return Err(format!("{name}: still there"));
            }
            let uid = grant.uid().unwrap();
            let status = grant.status.clone().unwrap_or_default();
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
            let current = status.observed_generation == grant.metadata.generation;
            let secret = secret_data(&self.bed.kube, &self.ns, &format!("{name}-s3")).await;
            let model = self.model.grants[g].as_ref().unwrap();
            match expect {
                Expect::Gone => unreachable!(),
                Expect::Ready(c) => {
                    let Some(ready) = ready.filter(|r| r.status == "True" && current) else {
                        return Err(format!("{name}: not Ready yet ({ready:?})"));
                    };
                    if status.class_name.as_deref() != Some(self.classes[c].as_str()) {
                        return Err(format!(
                            "{name}: on {:?}, not {}",
                            status.class_name, self.classes[c]
                        ));
                    }
                    if model.rotation.is_some() && status.handled_rotation_request != model.rotation
                    {
                        return Err(format!(
                            "{name}: rotation {:?} not handled yet",
                            model.rotation
                        ));
                    }
                    let data = secret.ok_or(format!(
                        "{name}: Ready without a Secret ({})",
                        ready.message
                    ))?;
                    self.check_secret(g, c, &data).await?;
                    if !model.sts {
                        let user = self.user_name(g, &uid);
                        expected_users.insert((c, user.clone()));
                        let held: Vec<&str> = status.held.iter().map(|h| h.name.as_str()).collect();
                        if held != [user.as_str()] {
                            return Err(format!("{name}: ledger {held:?}, not [{user}]"));
                        }
                        let keys = access_keys(&self.targets[c], &user).await;
                        if !keys.contains(&data["AWS_ACCESS_KEY_ID"]) {
                            return Err(format!("{name}: Secret's key not in IAM ({keys:?}) (I3)"));
                        }
                    } else if !status.held.is_empty() {
                        return Err(format!(
                            "{name}: an STS grant still holds {:?}",
                            status.held
                        ));
                    }
                }
                Expect::Revoked(reason) => {
                    let not_ready =
                        ready.is_some_and(|r| r.status == "False" && r.reason == reason && current);
                    if !not_ready || !status.held.is_empty() || secret.is_some() {
                        return Err(format!(
                            "{name}: not revoked yet (Ready {ready:?}, held {:?}, Secret {})",
                            status.held,
                            secret.is_some()
                        ));
                    }
                }
                Expect::Held(reason) => {
                    if !ready.is_some_and(|r| r.status == "False" && r.reason == reason && current)
                    {
                        return Err(format!("{name}: not {reason} yet ({ready:?})"));
                    }
                    held_users.extend(status.held.iter().map(|h| h.name.clone()));
                }
            }
        }
        // I1: every user is expected, or held by a grant waiting for its class.
        for (b, user) in &users {
            if !expected_users.contains(&(*b, user.clone())) && !held_users.contains(user) {
                return Err(format!(
                    "user {user} on backend {b} belongs to no grant that should hold it (I1)"
                ));
            }
        }
        for (b, user) in &expected_users {
            if !users.contains(&(*b, user.clone())) {
                return Err(format!("user {user} missing on backend {b}"));
            }
        }
        for (b, user) in &users {
            let keys = access_keys(&self.targets[*b], user).await;
            if keys.len() > 2 {
                return Err(format!("{user} holds {} keys (I2)", keys.len()));
            }
        }
        Ok(())
    }

    /// I3 and I5 for a Ready grant's Secret.
    async fn check_secret(
        &self,
        g: usize,
        c: usize,
        data: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let name = GRANTS[g];
        let model = self.model.grants[g].as_ref().unwrap();
        let mut wanted = vec![
            "AWS_ACCESS_KEY_ID",
            "AWS_ENDPOINT_URL_S3",
            "AWS_REGION",
            "AWS_SECRET_ACCESS_KEY",
            "S3_BUCKET",
            "S3_PREFIX",
            "credential_process.json",
            "credentials",
        ];
        if model.sts {
            wanted.extend(["AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION"]);
        }
        wanted.sort();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        if keys != wanted {
            return Err(format!("{name}: Secret keys {keys:?}, not {wanted:?} (I5)"));
        }
        if data["S3_PREFIX"] != PREFIXES[model.prefix]
            || data["AWS_ENDPOINT_URL_S3"] != self.proxies[c].endpoint
        {
            return Err(format!("{name}: Secret's prefix or endpoint is stale (I5)"));
        }
        let secret = Api::<Secret>::namespaced(self.bed.kube.clone(), &self.ns)
            .get(&format!("{name}-s3"))
            .await
            .map_err(|e| e.to_string())?;
        // Who owns the data. (A stringData patch leaves its manager owning `f:stringData`,
        // which no longer exists, on real API servers too: that entry is not a writer.)
        let data_writers: HashSet<String> = secret
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter(|m| {
                m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.get("f:data").is_some())
            })
            .filter_map(|m| m.manager)
            .collect();
        if data_writers.len() != 1 || !data_writers.contains("s3grant") {
            return Err(format!(
                "{name}: Secret data written by {data_writers:?} (I5, or a test edit not repaired yet)"
            ));
        }
        // I3: the credential works inside, and not outside (moto judges object calls).
        let target = &self.targets[c];
        let s3 = s3_from_secret(target, data);
        let inside = PREFIXES[model.prefix];
        let (works, leaks) = match MODES[model.mode] {
            "ReadOnly" => (
                can_get(&s3, &target.bucket, &format!("{inside}seed")).await,
                !model.sts && can_get(&s3, &target.bucket, "other/seed").await,
            ),
            _ => (
                can_put(&s3, &target.bucket, &format!("{inside}probe")).await,
                !model.sts && can_put(&s3, &target.bucket, "other/probe").await,
            ),
        };
        if !works {
            return Err(format!(
                "{name}: Ready but the credential does not work (I3)"
            ));
        }
        if leaks {
            return Err(format!(
                "{name}: the credential reaches outside its prefix (I3)"
            ));
        }
        Ok(())
    }

    /// I2, I4 and I6 over the AWS calls of the step that began at `since`.
    fn check_history(&mut self, step: usize, op: &Op) {
        let samples = self.samples.lock().unwrap().clone();
        let mut creates_per_user: HashMap<String, usize> = HashMap::new();
        for (p, proxy) in self.proxies.iter().enumerate() {
            let entries = proxy.entries();
            // I2 over the whole log: replay key creations and deletions per user.
            let mut keys: HashMap<String, i64> = HashMap::new();
            for e in &entries {
                let ok = e["status"].as_u64().is_some_and(|s| s < 300);
                let user = e["params"]["UserName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match e["action"].as_str() {
                    Some("CreateAccessKey") if ok => {
                        let n = keys.entry(user.clone()).or_default();
                        *n += 1;
                        if *n > 2 {
                            self.violations
                                .push(format!("step {step}: {user} reached {n} keys (I2)"));
                        }
                    }
                    Some("DeleteAccessKey") if ok => *keys.entry(user).or_default() -= 1,
                    _ => {}
                }
            }
            for e in &entries[self.checked[p]..] {
                let ok = e["status"].as_u64().is_some_and(|s| s < 300);
                if e["action"] == "CreateAccessKey" && ok {
                    *creates_per_user
                        .entry(
                            e["params"]["UserName"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        )
                        .or_default() += 1;
                }
                if e["action"] == "DeleteAccessKey" && ok {
                    let key = e["params"]["AccessKeyId"].as_str().unwrap_or_default();
                    let deleted_at = e["t"].as_f64().unwrap_or_default();
                    // I4: the last time the key was seen in a Secret, and by which grant.
                    if let Some((seen, g, _)) = samples
                        .iter()
                        .filter(|(t, _, k)| k == key && *t <= deleted_at)
                        .max_by(|a, b| a.0.total_cmp(&b.0))
                    {
                        let early = deleted_at < seen + GRACE.as_secs_f64() - 1.0;
                        let exempt = self
                            .history
                            .iter()
                            .any(|(t, op)| *t >= seen - 1.0 && *t <= deleted_at && op.exempts(*g));
                        if early && !exempt {
                            self.violations.push(format!(
                                "step {step}: key {key} of {} deleted {:.1} s after it was last seen in its Secret, inside the {:?} grace (I4)",
                                GRANTS[*g],
                                deleted_at - seen,
                                GRACE
                            ));
                        }
                    }
                }
            }
            self.checked[p] = entries.len();
        }
        let allowed = if op.kills() { 2 } else { 1 };
        for (user, creates) in creates_per_user {
            if creates > allowed {
                self.violations.push(format!(
                    "step {step} ({op:?}): {creates} CreateAccessKey for {user} (I6)"
                ));
            }
        }
    }

    /// After convergence, a quiet moment: a converged operator mints nothing more (I6).
    async fn check_quiet(&mut self, step: usize) {
        let before: Vec<usize> = self.proxies.iter().map(|p| p.entries().len()).collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for (p, proxy) in self.proxies.iter().enumerate() {
            let entries = proxy.entries();
            let minted: Vec<&str> = entries[before[p]..]
                .iter()
                .filter_map(|e| e["action"].as_str())
                .filter(|a| ["CreateAccessKey", "CreateUser", "AssumeRole"].contains(a))
                .collect();
            if !minted.is_empty() {
                self.violations.push(format!(
                    "step {step}: a converged operator still called {minted:?} (I6)"
                ));
            }
        }
    }

    async fn finish(mut self) -> Vec<String> {
        if let Some(sampler) = self.sampler.take() {
            sampler.abort();
        }
        let _ = self
            .grants()
            .delete_collection(&DeleteParams::default(), &Default::default())
            .await;
        for g in GRANTS {
            wait_gone(&self.bed.kube, &self.ns, g).await;
        }
        for class in &self.classes {
            delete_class(&self.bed.kube, class).await;
        }
        let leftover = self.users().await;
        if !leftover.is_empty() {
            self.violations.push(format!(
                "users left after every grant was deleted: {leftover:?} (I1)"
            ));
        }
        self.violations
    }
}

async fn run_sequence(bed: Testbed, seed: u64, steps: usize) -> (usize, Vec<String>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sequence = Sequence::new(bed, seed).await;
    let mut ran = 0;
    // Start with every grant present, so the first steps have something to change.
    let mut ops: Vec<Op> = (0..GRANTS.len()).map(Op::Create).collect();
    for step in 0..steps + GRANTS.len() {
        let op = if step < ops.len() {
            ops[step].clone()
        } else {
            let op = random_op(&mut rng, &sequence.model);
            ops.push(op.clone());
            op
        };
        let began = unix_now();
        sequence.history.push((began, op.clone()));
        sequence.run(&op, &mut rng).await;
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut last = String::new();
        let converged = loop {
            match sequence.check_state().await {
                Ok(()) => break true,
                Err(why) => last = why,
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        ran += 1;
        eprintln!(
            "seed {seed} step {step}: {op:?} -> {}",
            if converged { "ok" } else { "NOT CONVERGED" }
        );
        if !converged {
            sequence.violations.push(format!(
                "step {step} ({op:?}) did not converge in {STEP_TIMEOUT:?}: {last}"
            ));
            break;
        }
        sequence.check_history(step, &op);
        sequence.check_quiet(step).await;
    }
    let log = sequence.operator.as_ref().map(|o| o.log.clone());
    let mut violations = sequence.finish().await;
    if !violations.is_empty() {
        violations.insert(
            0,
            format!("seed {seed} (replay with S3GRANT_MODEL_SEED={seed}); operator log {log:?}; ops {ops:?}"),
        );
    }
    (ran, violations)
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
async fn random_lifecycles_keep_every_invariant() {
    let Some(bed) = testbed().await else {
        return;
    };
    let steps = env_number("S3GRANT_MODEL_STEPS", 12) as usize;
    let seeds: Vec<u64> = match std::env::var("S3GRANT_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("S3GRANT_MODEL_SEED is a number")],
        Err(_) => {
            let first: u64 = env_number("S3GRANT_MODEL_FIRST_SEED", rand::random::<u32>().into());
            (0..env_number("S3GRANT_MODEL_SEQUENCES", 5))
                .map(|i| first + i)
                .collect()
        }
    };
    let started = Instant::now();
    let (mut sequences, mut total_steps, mut violations) = (0, 0, Vec::new());
    for seed in seeds {
        let (ran, found) = run_sequence(bed.clone(), seed, steps).await;
        sequences += 1;
        total_steps += ran;
        violations.extend(found);
    }
    eprintln!(
        "model: {sequences} sequences, {total_steps} steps, {} violations, {:.0} s",
        violations.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
