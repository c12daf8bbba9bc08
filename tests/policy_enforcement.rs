//! What the compiled policies really allow, judged by Ceph RGW's policy evaluator (moto
//! ignores Conditions, so the `s3:prefix` condition on ListBucket can only be checked
//! here).
//!
//! Each test compiles a policy with s3grant's library for a bucket of its own (owned by
//! the testbed's admin), attaches it with IAM `PutUserPolicy` to a fresh RGW user of its
//! own, and then uses that user's keys. RGW users own no buckets here: the user reaches
//! the admin's bucket only through its user policy (RGW 16.2 evaluates user policies for
//! buckets of other users of the same tenant; no bucket policy is involved, and none may
//! be: it would add to what the user policy allows).
//!
//! So that a denial can only come from our policy, each test first shows that
//! - the user without any policy is denied even inside the prefix, and
//! - the same user with the whole-bucket policy of the same mode does reach the sibling
//!   prefix `tenant-ab/` (and, for reading modes, lists the whole bucket),
//!
//! then replaces that with the prefix policy and checks everything inside and outside.

mod common;

use common::rgw::*;
use common::{can_get, can_list, can_put};
use s3grant::api::Mode;
use s3grant::policy::{build_policy, USER_INLINE_POLICY_LIMIT};
use s3grant::validate::{parse_prefixes, BucketName};

const POLICY_NAME: &str = "s3grant";

/// A user, its two buckets (the granted one and another) and seeded objects.
struct Case {
    rgw: Rgw,
    user: RgwUser,
    bucket: RgwBucket,
    other_bucket: RgwBucket,
    tenant: aws_sdk_s3::Client,
}

/// Objects the admin seeds in the granted bucket (and `tenant-a/seed.txt` in the other).
const SEEDED: [&str; 6] = [
    "tenant-a/seed.txt",
    "tenant-a/deep/er/seed.txt",
    "tenant-a/delete-me.txt",
    "tenant-ab/seed.txt",
    "tenant-c/seed.txt",
    "other/seed.txt",
];

async fn setup(name: &str) -> Option<Case> {
    let rgw = rgw()?;
    let user = RgwUser::create(&rgw, name);
    let bucket = RgwBucket::create(&rgw, name).await;
    let other_bucket = RgwBucket::create(&rgw, &format!("{name}-other")).await;
    for key in SEEDED {
        seed(&rgw, &bucket.name, key).await;
    }
    seed(&rgw, &other_bucket.name, "tenant-a/seed.txt").await;
    let tenant = user.s3(&rgw);
    Some(Case {
        rgw,
        user,
        bucket,
        other_bucket,
        tenant,
    })
}

/// What each mode may do (the compiler's contract): reads include listing.
fn may_read(mode: Mode) -> bool {
    mode != Mode::WriteOnly
}
fn may_write(mode: Mode) -> bool {
    mode != Mode::ReadOnly
}
fn may_delete(mode: Mode) -> bool {
    mode == Mode::ReadWrite
}

impl Case {
    fn b(&self) -> &str {
        &self.bucket.name
    }

    /// Compiles with s3grant's library and attaches it as the user's inline policy.
    async fn attach(&self, prefixes: &[&str], mode: Mode) -> String {
        let bucket = BucketName::parse(self.b()).unwrap();
        let prefixes = parse_prefixes(prefixes).unwrap();
        let policy = build_policy(&bucket, &prefixes, mode);
        policy
            .check_size(USER_INLINE_POLICY_LIMIT, "a user's inline policies")
            .unwrap();
        let json = policy.to_compact_json();
        put_user_policy(&self.rgw, &self.user.uid, POLICY_NAME, &json).await;
        json
    }

    /// Whether the one operation of `mode` reaches `folder` (a put of a new object for
    /// writers, a get of the admin's `seed.txt` for readers). Puts never overwrite a
    /// seeded object: on RGW the writer would become its owner, and owners may read
    /// their objects whatever their policy says (see the last test).
    async fn reaches(&self, mode: Mode, folder: &str) -> bool {
        if may_write(mode) {
            can_put(&self.tenant, self.b(), &format!("{folder}probe.txt")).await
        } else {
            can_get(&self.tenant, self.b(), &format!("{folder}seed.txt")).await
        }
    }

    /// Without a policy the user can do nothing in the admin's bucket.
    async fn assert_nothing_without_policy(&self) {
        let (t, b) = (&self.tenant, self.b());
        assert!(!can_put(t, b, "tenant-a/no-policy.txt").await, "put");
        assert!(!can_get(t, b, "tenant-a/seed.txt").await, "get");
        assert!(!can_list(t, b, Some("tenant-a/")).await, "list");
        assert!(!can_delete(t, b, "tenant-a/delete-me.txt").await, "delete");
        assert!(!can_get_location(t, b).await, "location");
    }

    /// The whole-bucket policy of `mode` reaches the sibling prefix: RGW lets this user
    /// into `tenant-ab/` when a policy says so, so the later denials are our prefix's doing.
    async fn assert_whole_bucket_reaches_sibling(&self, mode: Mode) {
        self.attach(&[], mode).await;
        wait_until(
            &format!("{mode} whole-bucket policy reaches tenant-ab/"),
            true,
            || self.reaches(mode, "tenant-ab/"),
        )
        .await;
        let (t, b) = (&self.tenant, self.b());
        assert_eq!(
            can_put(t, b, "tenant-ab/wide.txt").await,
            may_write(mode),
            "{mode} whole bucket: put tenant-ab/"
        );
        assert_eq!(
            can_get(t, b, "tenant-ab/seed.txt").await,
            may_read(mode),
            "{mode} whole bucket: get tenant-ab/"
        );
        assert_eq!(
            can_list(t, b, None).await,
            may_read(mode),
            "{mode} whole bucket: list without prefix"
        );
        assert_eq!(
            can_list(t, b, Some("tenant-ab")).await,
            may_read(mode),
            "{mode} whole bucket: list tenant-ab"
        );
    }

    /// Replaces the policy with the prefix one and waits until it is in force.
    async fn narrow_to(&self, prefixes: &[&str], mode: Mode) {
        let json = self.attach(prefixes, mode).await;
        eprintln!("{mode} {prefixes:?}: {json}");
        wait_until(
            &format!("{mode} prefix policy in force (tenant-ab/ no longer reachable)"),
            false,
            || self.reaches(mode, "tenant-ab/"),
        )
        .await;
    }

    /// Everything `mode` allows works inside `prefix` (a folder, with its slash).
    async fn assert_inside(&self, mode: Mode, prefix: &str) {
        let (t, b) = (&self.tenant, self.b());
        let new = format!("{prefix}new-{mode}.txt");
        assert_eq!(
            can_put(t, b, &new).await,
            may_write(mode),
            "{mode}: put {new}"
        );
        assert_eq!(
            exists(&self.rgw, b, &new).await,
            may_write(mode),
            "{mode}: {new} exists iff the put was allowed"
        );
        let deep = format!("{prefix}deep/er/new-{mode}.txt");
        assert_eq!(
            can_put(t, b, &deep).await,
            may_write(mode),
            "{mode}: put {deep}"
        );
        let seeded = format!("{prefix}seed.txt");
        assert_eq!(
            can_get(t, b, &seeded).await,
            may_read(mode),
            "{mode}: get {seeded}"
        );
        for list in [prefix.to_string(), format!("{prefix}deep/")] {
            assert_eq!(
                can_list(t, b, Some(&list)).await,
                may_read(mode),
                "{mode}: list with prefix {list}"
            );
        }
        if may_read(mode) {
            let listed = t
                .list_objects_v2()
                .bucket(b)
                .prefix(prefix)
                .send()
                .await
                .unwrap();
            let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
            assert!(
                keys.contains(&seeded.as_str()),
                "{mode}: the listing shows {seeded}: {keys:?}"
            );
            assert!(
                keys.iter().all(|k| k.starts_with(prefix)),
                "{mode}: the listing stays in {prefix}: {keys:?}"
            );
        }
        assert_eq!(
            can_get_location(t, b).await,
            may_read(mode),
            "{mode}: GetBucketLocation"
        );
        seed(&self.rgw, b, &format!("{prefix}delete-me.txt")).await;
        let victim = format!("{prefix}delete-me.txt");
        assert_eq!(
            can_delete(t, b, &victim).await,
            may_delete(mode),
            "{mode}: delete {victim}"
        );
        assert_eq!(
            exists(&self.rgw, b, &victim).await,
            !may_delete(mode),
            "{mode}: {victim} is gone iff the delete was allowed"
        );
    }

    /// Nothing works outside the granted prefixes, whatever the mode.
    async fn assert_outside(&self, mode: Mode, denied_keys: &[&str], denied_lists: &[&str]) {
        let (t, b) = (&self.tenant, self.b());
        for key in denied_keys {
            assert!(!can_put(t, b, key).await, "{mode}: put {key} is denied");
            assert!(!can_get(t, b, key).await, "{mode}: get {key} is denied");
            assert!(
                !can_delete(t, b, key).await,
                "{mode}: delete {key} is denied"
            );
        }
        for key in denied_keys.iter().filter(|k| SEEDED.contains(k)) {
            assert!(
                exists(&self.rgw, b, key).await,
                "{mode}: {key} survived the denied delete"
            );
        }
        assert!(
            !exists(&self.rgw, b, &format!("tenant-ab/new-{mode}.txt")).await,
            "{mode}: a denied put wrote nothing"
        );
        assert!(
            !can_list(t, b, None).await,
            "{mode}: a listing without prefix is denied"
        );
        for list in denied_lists {
            assert!(
                !can_list(t, b, Some(list)).await,
                "{mode}: a listing with prefix {list:?} is denied"
            );
        }
        let other = &self.other_bucket.name;
        assert!(
            !can_put(t, other, "tenant-a/new.txt").await,
            "{mode}: put in another bucket is denied"
        );
        assert!(
            !can_get(t, other, "tenant-a/seed.txt").await,
            "{mode}: get in another bucket is denied"
        );
        assert!(
            !can_list(t, other, Some("tenant-a/")).await,
            "{mode}: list in another bucket is denied"
        );
        assert!(
            !can_delete(t, other, "tenant-a/seed.txt").await,
            "{mode}: delete in another bucket is denied"
        );
    }
}

/// Keys outside `tenant-a/` that a one-prefix grant must not reach.
const OUTSIDE_KEYS: [&str; 6] = [
    "tenant-ab/seed.txt",
    "tenant-ab/new-x.txt",
    "other/seed.txt",
    "tenant-c/seed.txt",
    "tenant-a",
    "tenant-a.txt",
];
/// Listing prefixes that would show more than `tenant-a/`.
const OUTSIDE_LISTS: [&str; 6] = ["", "tenant-a", "tenant-ab", "tenant-ab/", "other/", "t"];

async fn one_prefix(mode: Mode, given_prefix: &str) {
    let Some(case) = setup(&format!("pe-{}", mode.to_string().to_lowercase())).await else {
        return;
    };
    let started = std::time::Instant::now();
    case.assert_nothing_without_policy().await;
    case.assert_whole_bucket_reaches_sibling(mode).await;
    case.narrow_to(&[given_prefix], mode).await;
    case.assert_inside(mode, "tenant-a/").await;
    let mut outside = OUTSIDE_KEYS.to_vec();
    let sibling_new = format!("tenant-ab/new-{mode}.txt");
    outside.push(&sibling_new);
    case.assert_outside(mode, &outside, &OUTSIDE_LISTS).await;
    eprintln!("{mode} {given_prefix:?}: {:?}", started.elapsed());
}

/// `tenant-a` without its slash still means the folder `tenant-a/`: nothing in
/// `tenant-ab/`, and no listing with prefix `tenant-a` (which would show `tenant-ab/`).
#[tokio::test]
async fn read_write_prefix_without_slash_is_a_folder() {
    assert_eq!(
        parse_prefixes(&["tenant-a"]).unwrap()[0].as_str(),
        "tenant-a/"
    );
    one_prefix(Mode::ReadWrite, "tenant-a").await;
}

#[tokio::test]
async fn read_only_reads_and_lists_inside_and_writes_nothing() {
    one_prefix(Mode::ReadOnly, "tenant-a/").await;
}

#[tokio::test]
async fn write_only_writes_inside_and_reads_nothing() {
    one_prefix(Mode::WriteOnly, "tenant-a/").await;
}

/// Two prefixes, one of them deeper: both work, their parents and siblings do not.
#[tokio::test]
async fn two_prefixes_allow_both_and_nothing_between() {
    let Some(case) = setup("pe-two").await else {
        return;
    };
    let mode = Mode::ReadWrite;
    seed(&case.rgw, case.b(), "tenant-c/reports/seed.txt").await;
    seed(&case.rgw, case.b(), "tenant-c/reports-old/seed.txt").await;
    case.assert_nothing_without_policy().await;
    case.assert_whole_bucket_reaches_sibling(mode).await;
    case.narrow_to(&["tenant-a", "tenant-c/reports/"], mode)
        .await;
    case.assert_inside(mode, "tenant-a/").await;
    case.assert_inside(mode, "tenant-c/reports/").await;
    case.assert_outside(
        mode,
        &[
            "tenant-ab/seed.txt",
            "other/seed.txt",
            "tenant-c/seed.txt",
            "tenant-c/reports-old/seed.txt",
            "tenant-c/reports",
        ],
        &[
            "tenant-a",
            "tenant-ab",
            "tenant-c/",
            "tenant-c/reports",
            "tenant-c/reports-old/",
        ],
    )
    .await;
}

/// Not s3grant's doing, but what its WriteOnly means on RGW: when a user policy neither
/// allows nor denies a request, RGW falls back to ACLs, and an object belongs to the
/// user who wrote it. So a WriteOnly user reads back objects it wrote itself (never the
/// admin's), and keeps reading them after its policy stops covering them; writes and
/// deletes are bucket permissions and stay confined. (On AWS, ACLs are off by default,
/// "bucket owner enforced", and ACL grants name accounts, not IAM users.) If the compiler
/// ever adds an explicit Deny for reads to WriteOnly, the read-back assertions flip.
#[tokio::test]
async fn rgw_lets_a_writer_read_back_objects_it_owns_whatever_its_policy() {
    let Some(case) = setup("pe-owner").await else {
        return;
    };
    let (t, b) = (&case.tenant, case.b());
    case.attach(&["tenant-a/"], Mode::WriteOnly).await;
    wait_until("WriteOnly policy in force", true, || {
        can_put(t, b, "tenant-a/own.txt")
    })
    .await;
    assert!(
        !can_get(t, b, "tenant-a/seed.txt").await,
        "the admin's object"
    );
    assert!(
        can_get(t, b, "tenant-a/own.txt").await,
        "RGW: the writer reads back its own object (object ACL), despite WriteOnly"
    );

    // A policy that grants nothing in this bucket: the read-back still works, so it
    // comes from ownership, not from our policy; writes and deletes are gone.
    let elsewhere = BucketName::parse(&case.other_bucket.name).unwrap();
    let json = build_policy(
        &elsewhere,
        &parse_prefixes(&["tenant-a"]).unwrap(),
        Mode::WriteOnly,
    )
    .to_compact_json();
    put_user_policy(&case.rgw, &case.user.uid, POLICY_NAME, &json).await;
    wait_until("policy for another bucket in force", false, || {
        can_put(t, b, "tenant-a/own-2.txt")
    })
    .await;
    assert!(
        can_get(t, b, "tenant-a/own.txt").await,
        "RGW: still readable by its owner with no policy covering it"
    );
    assert!(!can_delete(t, b, "tenant-a/own.txt").await, "delete own");
    assert!(!can_put(t, b, "tenant-a/own.txt").await, "overwrite own");
    assert!(
        !can_get(t, b, "tenant-a/seed.txt").await,
        "the admin's object"
    );
}
