//! Four eyes that one credential cannot fake: acting on behalf of users (`approvals:act_as`)
//! through the real server. A backend that only asserts who its users are is one party, however
//! many users it names; a backend that forwards its users' own tokens speaks for each of them.

use approvals::{auth::AuthConfig, pb};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    callers::*,
    common::{TestServer, assert_error, new_request},
};

/// The reproduction of the security review: `--min-approvals 2` and one key with read, write
/// and act_as, acting for every user.
async fn backend_server(
    min_approvals: u32,
    configure: impl FnOnce(&mut approvals::config::Config),
) -> (TestServer, String, Issuer) {
    let (key, backend) = api_key(
        "service:backend",
        &["approvals:read", "approvals:write", "approvals:act_as"],
        &[],
        &[],
    );
    let issuer = Issuer::new("key-1");
    let jwt = issuer.config();
    let server = TestServer::start_with(|c| {
        c.min_approvals = min_approvals;
        c.auth = AuthConfig {
            api_keys: vec![backend],
            jwt: Some(jwt),
            ..AuthConfig::default()
        };
        configure(c);
    })
    .await;
    (server, key, issuer)
}

fn approve(id: &str) -> pb::ApproveChangeRequestRequest {
    pb::ApproveChangeRequestRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn get(id: &str) -> pb::GetChangeRequestRequest {
    pb::GetChangeRequestRequest { id: id.into() }
}

fn assert_not_independent(status: &tonic::Status) {
    let message = assert_error(status, Code::PermissionDenied, "APPROVAL_NOT_INDEPENDENT");
    assert!(message.contains("service:backend"), "{message}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(
        info.metadata.get("party").map(String::as_str),
        Some("service:backend")
    );
}

#[tokio::test]
async fn one_key_asserting_every_user_never_reaches_approved() {
    let (server, key, _) = backend_server(2, |_| {}).await;
    let as_user = |user: &str| Headers::bearer(&key).on_behalf_of(user, "");
    let mut alice = requests(&server, as_user("user:alice")).await;
    let created = alice
        .create_change_request(new_request())
        .await
        .expect("the backend creates for alice")
        .into_inner();
    assert_eq!(created.created_by, "user:alice");
    assert_eq!(created.created_by_acting_principal, "service:backend");
    assert_eq!(
        created.created_by_identity_proof,
        pb::IdentityProof::Asserted as i32
    );

    for user in ["user:bob", "user:carol"] {
        let mut reviewer = requests(&server, as_user(user)).await;
        let seen = reviewer
            .get_change_request(get(&created.id))
            .await
            .expect("get")
            .into_inner();
        assert!(!seen.can_approve, "{user} is told it cannot approve");
        let err = reviewer
            .approve_change_request(approve(&created.id))
            .await
            .expect_err("an approval the backend only asserts");
        assert_not_independent(&err);
    }
    let after = alice
        .get_change_request(get(&created.id))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after.state, pb::State::InReview as i32);
    assert_eq!(after.approval_count, 0);
    assert!(after.reviews.is_empty(), "nothing was written");
}

#[tokio::test]
async fn forwarded_user_tokens_make_approvals_their_users() {
    let (server, key, issuer) = backend_server(2, |_| {}).await;
    let mut alice = requests(
        &server,
        Headers::bearer(&key).on_behalf_of("user:alice", ""),
    )
    .await;
    let created = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();

    for (n, user) in ["bob", "carol"].into_iter().enumerate() {
        let token = issuer.token(user, "", &[]);
        let mut reviewer = requests(
            &server,
            Headers::bearer(&key)
                .on_behalf_of(&format!("user:{user}"), "")
                .with(approvals::USER_TOKEN_HEADER, &token),
        )
        .await;
        let approved = reviewer
            .approve_change_request(approve(&created.id))
            .await
            .unwrap_or_else(|e| panic!("{user}'s own token proves the approval: {e:?}"))
            .into_inner();
        assert_eq!(approved.approval_count, n as i32 + 1);
        let review = approved.reviews.last().expect("review");
        assert_eq!(review.reviewer, format!("user:{user}"));
        assert_eq!(review.acting_principal, "service:backend");
        assert_eq!(review.identity_proof, pb::IdentityProof::UserToken as i32);
    }
    let after = alice
        .get_change_request(get(&created.id))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after.state, pb::State::Approved as i32);

    // The on-behalf-of user must be the token's; without the header the token names the user.
    let carol = issuer.token("carol", "", &[]);
    let mut mismatch = requests(
        &server,
        Headers::bearer(&key)
            .on_behalf_of("user:dave", "")
            .with(approvals::USER_TOKEN_HEADER, &carol),
    )
    .await;
    let err = mismatch
        .get_change_request(get(&created.id))
        .await
        .expect_err("a token of another user");
    assert_error(&err, Code::PermissionDenied, "ACT_AS_NOT_ALLOWED");
    let mut by_token = requests(
        &server,
        Headers::bearer(&key).with(approvals::USER_TOKEN_HEADER, &carol),
    )
    .await;
    let seen = by_token
        .get_change_request(get(&created.id))
        .await
        .expect("the token alone names the user")
        .into_inner();
    assert_eq!(seen.user_decision, pb::Decision::Approve as i32);
    // A forged user token is refused, naming the header.
    let forged = issuer.forger().sign(serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "erin", "exp": now_secs() + 600,
    }));
    let mut forger = requests(
        &server,
        Headers::bearer(&key).with(approvals::USER_TOKEN_HEADER, &forged),
    )
    .await;
    let err = forger
        .get_change_request(get(&created.id))
        .await
        .expect_err("forged");
    let message = assert_error(&err, Code::Unauthenticated, "CREDENTIALS_INVALID");
    assert!(message.contains(approvals::USER_TOKEN_HEADER), "{message}");
}

#[tokio::test]
async fn a_second_asserted_approval_is_refused_and_pending_agrees() {
    let (server, key, issuer) = backend_server(2, |_| {}).await;
    // alice creates with her own token: she is one party, the backend another.
    let mut alice = requests(
        &server,
        Headers::bearer(&issuer.token("alice", "approvals:write", &[])),
    )
    .await;
    let created = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    let mut bob = requests(&server, Headers::bearer(&key).on_behalf_of("user:bob", "")).await;
    let first = bob
        .approve_change_request(approve(&created.id))
        .await
        .expect("the backend's one approval counts")
        .into_inner();
    assert_eq!(first.approval_count, 1);
    assert_eq!(
        first.reviews[0].identity_proof,
        pb::IdentityProof::Asserted as i32
    );

    let mut carol = requests(
        &server,
        Headers::bearer(&key).on_behalf_of("user:carol", ""),
    )
    .await;
    let pending = carol
        .list_change_requests(pb::ListChangeRequestsRequest {
            project: "web".into(),
            pending_for_me: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(
        pending.change_requests.is_empty(),
        "not pending for an approval that would be refused"
    );
    let err = carol
        .approve_change_request(approve(&created.id))
        .await
        .expect_err("second asserted approval");
    assert_not_independent(&err);
    let after = alice
        .get_change_request(get(&created.id))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after.state, pb::State::InReview as i32);
    assert_eq!(after.approval_count, 1);
}

#[tokio::test]
async fn a_policy_may_turn_independence_off_and_new_policies_have_it_on() {
    let (admin_key, admin) = api_key("user:root", &["approvals:admin"], &[], &[]);
    let (server, key, _) = backend_server(1, |c| c.auth.api_keys.push(admin)).await;
    let mut policies = policies(&server, Headers::bearer(&admin_key)).await;
    let created = policies
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "web-trusting".into(),
                project: "web".into(),
                action_key: "*".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(created.independent_approvals, Some(true), "on by default");
    policies
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(pb::Policy {
                name: "web-trusting".into(),
                independent_approvals: Some(false),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["independent_approvals".into()],
            }),
        })
        .await
        .expect("turned off");
    let mut alice = requests(
        &server,
        Headers::bearer(&key).on_behalf_of("user:alice", ""),
    )
    .await;
    let request = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        request
            .policy_snapshot
            .as_ref()
            .and_then(|p| p.independent_approvals),
        Some(false)
    );
    let mut bob = requests(&server, Headers::bearer(&key).on_behalf_of("user:bob", "")).await;
    let approved = bob
        .approve_change_request(approve(&request.id))
        .await
        .expect("the policy trusts the backend")
        .into_inner();
    assert_eq!(approved.state, pb::State::Approved as i32);
}

#[tokio::test]
async fn act_as_targets_only_listed_users() {
    let (backend_key, mut backend) = api_key(
        "service:backend",
        &["approvals:read", "approvals:write", "approvals:act_as"],
        &[],
        &[],
    );
    backend.act_as = vec!["user:alice".into()];
    let server = TestServer::start_with(|c| {
        c.auth = AuthConfig {
            api_keys: vec![backend],
            ..AuthConfig::default()
        }
    })
    .await;
    let mut as_alice = requests(
        &server,
        Headers::bearer(&backend_key).on_behalf_of("user:alice", ""),
    )
    .await;
    as_alice
        .create_change_request(new_request())
        .await
        .expect("alice is listed");
    for (target, case) in [
        ("user:bob", "a user not listed"),
        ("service:deployer", "a service (an executor, say)"),
    ] {
        let mut other = requests(
            &server,
            Headers::bearer(&backend_key).on_behalf_of(target, ""),
        )
        .await;
        let err = other
            .create_change_request(new_request())
            .await
            .expect_err(case);
        let message = assert_error(&err, Code::PermissionDenied, "ACT_AS_NOT_ALLOWED");
        assert!(message.contains(target), "{message}");
    }
}

#[tokio::test]
async fn groups_come_from_tokens_and_the_server_never_from_the_header() {
    let (admin_key, admin) = api_key("user:root", &["approvals:admin"], &[], &[]);
    let (server, key, issuer) = backend_server(1, |c| {
        c.auth.api_keys.push(admin);
        c.auth
            .groups
            .insert("security".into(), vec!["user:carol".into()]);
    })
    .await;
    let mut policies = policies(&server, Headers::bearer(&admin_key)).await;
    policies
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "web-sre-security".into(),
                project: "web".into(),
                action_key: "*".into(),
                min_approvals: 2,
                requirements: vec![
                    pb::GroupRequirement {
                        group: "group:sre".into(),
                        min_approvals: 1,
                        ..Default::default()
                    },
                    pb::GroupRequirement {
                        group: "group:security".into(),
                        min_approvals: 1,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
        })
        .await
        .expect("policy");
    let mut alice = requests(
        &server,
        Headers::bearer(&issuer.token("alice", "approvals:write", &[])),
    )
    .await;
    let created = alice
        .create_change_request(new_request())
        .await
        .expect("create")
        .into_inner();

    // The header claims sre for bob: ignored, since the backend's word is no proof.
    let mut bob = requests(
        &server,
        Headers::bearer(&key).on_behalf_of("user:bob", "sre,security"),
    )
    .await;
    let reviewed = bob
        .approve_change_request(approve(&created.id))
        .await
        .expect("bob approves")
        .into_inner();
    assert!(
        reviewed.reviews[0].reviewer_groups.is_empty(),
        "asserted groups are not recorded: {:?}",
        reviewed.reviews[0].reviewer_groups
    );
    // dave's token says sre; carol is in security by the server's configuration.
    for (user, groups) in [("dave", vec!["sre"]), ("carol", vec![])] {
        let token = issuer.token(user, "", &groups);
        let mut reviewer = requests(
            &server,
            Headers::bearer(&key).with(approvals::USER_TOKEN_HEADER, &token),
        )
        .await;
        reviewer
            .approve_change_request(approve(&created.id))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
    }
    let after = alice
        .get_change_request(get(&created.id))
        .await
        .expect("get")
        .into_inner();
    let groups: Vec<(&str, Vec<String>)> = after
        .reviews
        .iter()
        .map(|r| (r.reviewer.as_str(), r.reviewer_groups.clone()))
        .collect();
    assert_eq!(
        groups,
        vec![
            ("user:bob", vec![]),
            ("user:dave", vec!["sre".to_owned()]),
            ("user:carol", vec!["security".to_owned()]),
        ]
    );
    assert_eq!(after.state, pb::State::Approved as i32);
}
