//! The `s3grant` binary as a user runs it: policy, plan and crd.

use assert_cmd::Command;

fn s3grant() -> Command {
    Command::cargo_bin("s3grant").unwrap()
}

fn root(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn stdout_of(args: &[&str]) -> String {
    let output = s3grant().args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn stderr_of_failure(args: &[&str], code: i32) -> String {
    let output = s3grant().args(args).output().unwrap();
    assert_eq!(output.status.code(), Some(code), "{args:?}");
    assert!(
        output.stdout.is_empty(),
        "nothing may be printed on stdout when refusing"
    );
    String::from_utf8(output.stderr).unwrap()
}

#[test]
fn policy_prints_the_golden_documents() {
    let cases: [(&str, &[&str]); 4] = [
        ("read-write", &[]),
        (
            "read-only-prefix",
            &["--prefix", "tenant-a/", "--read-only"],
        ),
        (
            "write-only-prefix",
            &["--prefix", "tenant-a", "--write-only"],
        ),
        (
            "read-write-two-prefixes",
            &["--prefix", "tenant-a/", "--prefix", "tenant-b"],
        ),
    ];
    for (golden, flags) in cases {
        let mut args = vec!["policy", "acme-data"];
        args.extend_from_slice(flags);
        let expected =
            std::fs::read_to_string(root(&format!("tests/golden/policies/{golden}.json"))).unwrap();
        assert_eq!(stdout_of(&args), expected, "{golden}");
    }
}

#[test]
fn read_only_and_write_only_together_is_a_usage_error() {
    let stderr = stderr_of_failure(&["policy", "acme-data", "--read-only", "--write-only"], 2);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn hostile_policy_input_is_refused_with_a_reason() {
    let stderr = stderr_of_failure(&["policy", "Acme_Data"], 1);
    assert!(
        stderr.contains("invalid bucket name \"Acme_Data\""),
        "{stderr}"
    );
    let stderr = stderr_of_failure(
        &["policy", "acme-data", "--prefix", "tenant-a/../tenant-b"],
        1,
    );
    assert!(stderr.contains("'..' segments"), "{stderr}");
    let stderr = stderr_of_failure(&["policy", "acme-data", "--prefix", "${aws:username}"], 1);
    assert!(stderr.contains("policy variables"), "{stderr}");
}

#[test]
fn crd_prints_what_crds_holds() {
    let printed = stdout_of(&["crd"]);
    let grant = std::fs::read_to_string(root("crds/s3grants.s3grant.io.yaml")).unwrap();
    let class = std::fs::read_to_string(root("crds/s3grantclasses.s3grant.io.yaml")).unwrap();
    assert_eq!(printed, format!("{grant}---\n{class}"));
}

#[test]
fn plan_shows_iam_user_policy_and_calls() {
    let out = stdout_of(&[
        "plan",
        "-f",
        &root("examples/grant-iam-read-only.yaml"),
        "--class",
        &root("examples/class-team-data.yaml"),
        "--namespace-label",
        "s3grant.io/tenant=true",
    ]);
    assert!(
        out.contains("credential: IAM user with an access key (rotated every 720h)"),
        "{out}"
    );
    assert!(out.contains("iam user:   s3g-tenant-a-reports-"), "{out}");
    assert!(
        out.contains("\"arn:aws:s3:::acme-data/data/tenant-a/reports/*\""),
        "{out}"
    );
    let calls = [
        "iam:GetUser",
        "iam:CreateUser",
        "PermissionsBoundary=arn:aws:iam::123456789012:policy/s3grant-boundary",
        "iam:PutUserPolicy",
        "iam:CreateAccessKey",
    ];
    let mut last = 0;
    for call in calls {
        let at = out
            .find(call)
            .unwrap_or_else(|| panic!("{call} missing:\n{out}"));
        assert!(at >= last, "{call} out of order");
        last = at;
    }
}

#[test]
fn plan_shows_sts_session() {
    let out = stdout_of(&[
        "plan",
        "-f",
        &root("examples/grant-sts-read-write.yaml"),
        "--class",
        &root("examples/class-team-data.yaml"),
    ]);
    assert!(
        out.contains("sts:AssumeRole RoleArn=arn:aws:iam::123456789012:role/s3grant-sessions"),
        "{out}"
    );
    assert!(out.contains("DurationSeconds=3600"), "{out}");
    assert!(
        out.contains("secret:     tenant-a/ingest-credentials"),
        "{out}"
    );
    assert!(out.contains("namespaceSelector was not checked"), "{out}");
}

#[test]
fn plan_reports_what_the_operator_would_put_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let class = root("examples/class-team-data.yaml");
    let other_tenant = write(
        "other.yaml",
        "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {name: x, namespace: tenant-a}\nspec: {bucket: acme-data, prefix: data/tenant-b/}\n",
    );
    let stderr = stderr_of_failure(&["plan", "-f", &other_tenant, "--class", &class], 1);
    assert!(stderr.contains("not permitted by S3GrantClass team-data: prefix data/tenant-b/ is not under data/tenant-a/"), "{stderr}");

    let too_long = write(
        "long.yaml",
        "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {name: x, namespace: tenant-a}\nspec: {bucket: acme-data, prefix: data/tenant-a/, duration: 13h}\n",
    );
    let stderr = stderr_of_failure(&["plan", "-f", &too_long], 1);
    assert!(
        stderr.contains("invalid duration \"13h\": must be between 15m and 12h"),
        "{stderr}"
    );

    let not_yaml = write("bad.yaml", "spec: [unclosed\n");
    let stderr = stderr_of_failure(&["plan", "-f", &not_yaml], 1);
    assert!(stderr.contains("cannot read S3Grant manifest"), "{stderr}");
}
