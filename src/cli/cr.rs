//! `approvals cr ...`: change requests, one subcommand per RPC of `approvals.v1.ChangeRequests`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};
use prost_types::FieldMask;
use serde_json::Value as Json;
use tokio_stream::StreamExt;

use super::{
    Api, CliError, Format, Global, exit,
    output::{self, names},
};
use crate::pb;

/// Change requests: list, show, create, review, apply, watch.
#[derive(Args, Debug)]
#[command(after_help = concat!(
    "Examples:\n",
    "  approvals cr list --project web --pending\n",
    "  approvals cr approve 0193a1b2-... -m LGTM\n\n",
    crate::exit_codes_help!()
))]
pub struct CrArgs {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: CrCommand,
}

/// A change request's id, and an optional etag that makes the call conditional.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The change request's id.
    pub id: String,
    /// Only if the request's etag is still this (else ABORTED, exit code 5).
    #[arg(long)]
    pub etag: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum CrCommand {
    /// List change requests of a project, newest first.
    #[command(after_help = "Examples:
  approvals cr list --project web --pending
  approvals cr list --project web --state in_review --state approved --limit 20 -o json")]
    List(ListArgs),
    /// Show one request: its changes and payloads, reviews, comments, policy snapshot, and
    /// what you may do.
    #[command(after_help = "Example:\n  approvals cr show 0193a1b2-...")]
    Show { id: String },
    /// Create a change request (IN_REVIEW, or DRAFT with --draft).
    #[command(after_help = "Examples:
  approvals cr create --project web --env prod --action-key feature_flag.update \\
    --title 'Roll out checkout' --change feature_flag/checkout=rollout.json
  approvals cr create -f request.yaml --wait")]
    Create(Box<CreateArgs>),
    /// Edit a DRAFT or IN_REVIEW request (requester only); an edit in review dismisses reviews.
    #[command(after_help = "Example:
  approvals cr edit 0193a1b2-... --title 'Roll out checkout to 25%' --change feature_flag/checkout=25.json")]
    Edit(EditArgs),
    /// Submit a DRAFT for review.
    #[command(after_help = "Example:\n  approvals cr submit 0193a1b2-...")]
    Submit(Target),
    /// Approve a request in review.
    #[command(after_help = "Example:\n  approvals cr approve 0193a1b2-... -m LGTM --wait")]
    Approve {
        #[command(flatten)]
        target: Target,
        /// A comment with the approval.
        #[arg(short, long)]
        message: Option<String>,
        /// Follow the request until it leaves the intermediate states (see `cr create --help`).
        #[arg(long)]
        wait: bool,
    },
    /// Reject a request in review.
    #[command(after_help = "Example:\n  approvals cr reject 0193a1b2-... -m 'rollout too wide'")]
    Reject {
        #[command(flatten)]
        target: Target,
        /// Why.
        #[arg(short, long, required = true)]
        message: String,
    },
    /// Withdraw your request.
    #[command(after_help = "Example:\n  approvals cr cancel 0193a1b2-... -m 'superseded'")]
    Cancel {
        #[command(flatten)]
        target: Target,
        /// Why.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Comment on a request.
    #[command(after_help = "Example:\n  approvals cr comment 0193a1b2-... -m 'deploying at 10:00'")]
    Comment {
        id: String,
        /// The comment.
        #[arg(short, long, required = true)]
        message: String,
    },
    /// Apply an approved request through its policy's applier.
    #[command(after_help = "Examples:
  approvals cr apply 0193a1b2-... --wait
  approvals cr apply 0193a1b2-... --break-glass 'incident 4711: checkout down'")]
    Apply {
        #[command(flatten)]
        target: Target,
        /// Apply without quorum (needs the approvals:bypass scope), for this reason.
        #[arg(long, value_name = "JUSTIFICATION")]
        break_glass: Option<String>,
        /// Follow the request until it is APPLIED or APPLY_FAILED.
        #[arg(long)]
        wait: bool,
    },
    /// Plan the apply of an approved request.
    #[command(after_help = "Examples:
  approvals cr schedule 0193a1b2-... --at 2026-12-08T09:00:00Z
  approvals cr schedule 0193a1b2-... --at 'in 2h'
  approvals cr schedule 0193a1b2-... --next-open-window")]
    Schedule {
        #[command(flatten)]
        target: Target,
        /// RFC 3339 time, or a delay from now (`in 2h`, `+30m`).
        #[arg(
            long,
            value_name = "TIME",
            required_unless_present = "next_open_window",
            conflicts_with = "next_open_window"
        )]
        at: Option<String>,
        /// At the next instant every calendar of the request's policy is open (and its apply
        /// delay has passed), instead of at a time.
        #[arg(long)]
        next_open_window: bool,
    },
    /// Cancel a planned apply (back to APPROVED).
    #[command(after_help = "Example:\n  approvals cr unschedule 0193a1b2-...")]
    Unschedule(Target),
    /// The request's audit trail, oldest first.
    #[command(after_help = "Example:\n  approvals cr history 0193a1b2-... -o json")]
    History { id: String },
    /// Stream events of matching requests as they are committed (Ctrl-C to stop).
    #[command(after_help = "Examples:
  approvals cr watch --project web --env prod
  approvals cr watch --project web --from 1200 -o json")]
    Watch(WatchArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only IN_REVIEW requests you could approve now and have not reviewed.
    #[arg(long)]
    pending: bool,
    /// Only requests you created.
    #[arg(long)]
    mine: bool,
    /// Only requests in this state (repeatable): draft, in_review, approved, scheduled,
    /// applying, applied, apply_failed, rejected, cancelled, expired.
    #[arg(long = "state", value_name = "S", value_parser = parse_state)]
    states: Vec<pb::State>,
    /// The project [default: the profile's].
    #[arg(long, value_name = "P")]
    project: Option<String>,
    /// Only this environment.
    #[arg(long = "env", value_name = "E")]
    environment: Option<String>,
    /// Only this action key.
    #[arg(long, value_name = "K")]
    action_key: Option<String>,
    /// At most this many requests.
    #[arg(long, default_value_t = 50, value_name = "N")]
    limit: usize,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// A CreateChangeRequestRequest in YAML or JSON (proto field names); flags given too
    /// override its fields, `--change` adds to its changes.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// The project [default: the profile's].
    #[arg(long, value_name = "P")]
    project: Option<String>,
    /// Only this environment.
    #[arg(long = "env", value_name = "E")]
    environment: Option<String>,
    /// Only this action key.
    #[arg(long, value_name = "K")]
    action_key: Option<String>,
    #[arg(long, value_name = "N")]
    action_version: Option<i32>,
    #[arg(long, value_name = "T")]
    title: Option<String>,
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    #[arg(long, value_name = "TEXT")]
    intent_display: Option<String>,
    /// A change: the resource's TYPE/ID and a JSON file holding its payload (repeatable).
    #[arg(long = "change", value_name = "TYPE/ID=FILE.json")]
    changes: Vec<String>,
    /// The `action` of the --change entries.
    #[arg(long, default_value = "update", value_name = "ACTION")]
    change_action: String,
    /// Start as DRAFT (submit it with `cr submit`).
    #[arg(long)]
    draft: bool,
    /// Idempotency key: retrying with the same key returns the request created the first time.
    #[arg(long, value_name = "KEY")]
    request_id: Option<String>,
    /// Plan the apply: on quorum the request becomes SCHEDULED for this time.
    #[arg(long, value_name = "TIME")]
    apply_at: Option<String>,
    /// Follow the request until it leaves the intermediate states: it is APPLIED, REJECTED,
    /// CANCELLED, EXPIRED or APPLY_FAILED, or rests in DRAFT, or in APPROVED when its policy
    /// applies manually. Exit code 0 unless it ended without being applied (7).
    #[arg(long)]
    wait: bool,
}

#[derive(Args, Debug)]
pub struct EditArgs {
    #[command(flatten)]
    target: Target,
    /// A new title.
    #[arg(long, value_name = "T")]
    title: Option<String>,
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    #[arg(long, value_name = "TEXT")]
    intent_display: Option<String>,
    /// When the request expires (RFC 3339 or `in 7d`).
    #[arg(long, value_name = "TIME")]
    expire_at: Option<String>,
    /// Set the payload of the change on TYPE/ID (replacing it, or adding one) (repeatable).
    #[arg(long = "change", value_name = "TYPE/ID=FILE.json")]
    changes: Vec<String>,
    /// Remove the change on TYPE/ID (repeatable).
    #[arg(long = "remove-change", value_name = "TYPE/ID")]
    remove: Vec<String>,
    /// The `action` of added changes.
    #[arg(long, default_value = "update", value_name = "ACTION")]
    change_action: String,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The project [default: the profile's].
    #[arg(long, value_name = "P")]
    project: Option<String>,
    /// Only this environment.
    #[arg(long = "env", value_name = "E")]
    environment: Option<String>,
    /// Only this action key.
    #[arg(long, value_name = "K")]
    action_key: Option<String>,
    /// Only events into this state (repeatable).
    #[arg(long = "state", value_name = "S", value_parser = parse_state)]
    states: Vec<pb::State>,
    /// Only events of this request.
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Replay from this revision (inclusive); without it, from now.
    #[arg(long = "from", value_name = "REV")]
    from: Option<i64>,
}

/// `in_review`, `IN_REVIEW` or `STATE_IN_REVIEW`.
fn parse_state(text: &str) -> Result<pb::State, String> {
    let upper = text.trim().to_ascii_uppercase().replace('-', "_");
    let name = if upper.starts_with("STATE_") {
        upper
    } else {
        format!("STATE_{upper}")
    };
    pb::State::from_str_name(&name)
        .filter(|s| *s != pb::State::Unspecified)
        .ok_or_else(|| format!("{text:?} is not a state"))
}

pub async fn run(args: CrArgs) -> Result<ExitCode, CliError> {
    let api = Api::connect(&args.global).await?;
    let format = args.global.format();
    let mut cr = api.change_requests();
    let ok = Ok(ExitCode::SUCCESS);
    match args.command {
        CrCommand::List(list) => return run_list(&api, list, format).await,
        CrCommand::Show { id } => {
            let request = cr
                .get_change_request(pb::GetChangeRequestRequest { id })
                .await?
                .into_inner();
            print_request(&request, format, View::Full)?;
        }
        CrCommand::Create(create) => {
            let wait = create.wait;
            let body = create_request(&api, *create)?;
            let request = cr.create_change_request(body).await?.into_inner();
            return done(&api, request, format, "created", wait).await;
        }
        CrCommand::Edit(edit) => {
            let request = run_edit(&api, edit).await?;
            print_request(&request, format, View::Summary("updated"))?;
        }
        CrCommand::Submit(t) => {
            let request = cr
                .submit_change_request(pb::SubmitChangeRequestRequest {
                    id: t.id,
                    etag: t.etag.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_request(&request, format, View::Summary("submitted"))?;
        }
        CrCommand::Approve {
            target,
            message,
            wait,
        } => {
            let request = cr
                .approve_change_request(pb::ApproveChangeRequestRequest {
                    id: target.id,
                    comment: message.unwrap_or_default(),
                    etag: target.etag.unwrap_or_default(),
                })
                .await?
                .into_inner();
            return done(&api, request, format, "approved", wait).await;
        }
        CrCommand::Reject { target, message } => {
            let request = cr
                .reject_change_request(pb::RejectChangeRequestRequest {
                    id: target.id,
                    comment: message,
                    etag: target.etag.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_request(&request, format, View::Summary("rejected"))?;
        }
        CrCommand::Cancel { target, message } => {
            let request = cr
                .cancel_change_request(pb::CancelChangeRequestRequest {
                    id: target.id,
                    reason: message.unwrap_or_default(),
                    etag: target.etag.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_request(&request, format, View::Summary("cancelled"))?;
        }
        CrCommand::Comment { id, message } => {
            let request = cr
                .add_comment(pb::AddCommentRequest { id, text: message })
                .await?
                .into_inner();
            print_request(&request, format, View::Summary("commented on"))?;
        }
        CrCommand::Apply {
            target,
            break_glass,
            wait,
        } => {
            let request = cr
                .apply_change_request(pb::ApplyChangeRequestRequest {
                    id: target.id,
                    etag: target.etag.unwrap_or_default(),
                    bypass_justification: break_glass.unwrap_or_default(),
                })
                .await?
                .into_inner();
            return done(&api, request, format, "applied", wait).await;
        }
        CrCommand::Schedule {
            target,
            at,
            next_open_window,
        } => {
            let apply_time = at
                .map(|at| output::parse_time(&at).map_err(|e| CliError::usage(format!("--at {e}"))))
                .transpose()?;
            let request = cr
                .schedule_change_request(pb::ScheduleChangeRequestRequest {
                    id: target.id,
                    apply_time,
                    etag: target.etag.unwrap_or_default(),
                    next_open_window,
                })
                .await?
                .into_inner();
            print_request(&request, format, View::Summary("scheduled"))?;
        }
        CrCommand::Unschedule(t) => {
            let request = cr
                .unschedule_change_request(pb::UnscheduleChangeRequestRequest {
                    id: t.id,
                    etag: t.etag.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_request(&request, format, View::Summary("unscheduled"))?;
        }
        CrCommand::History { id } => return run_history(&api, id, format).await,
        CrCommand::Watch(watch) => return run_watch(&api, watch, format).await,
    }
    ok
}

async fn run_list(api: &Api, args: ListArgs, format: Format) -> Result<ExitCode, CliError> {
    let project = api.project(args.project)?;
    let mut cr = api.change_requests();
    let mut found: Vec<pb::ChangeRequest> = Vec::new();
    let mut page_token = String::new();
    let mut total_size;
    loop {
        let page = cr
            .list_change_requests(pb::ListChangeRequestsRequest {
                project: project.clone(),
                environment: args.environment.clone().unwrap_or_default(),
                action_key: args.action_key.clone().unwrap_or_default(),
                states: args.states.iter().map(|s| *s as i32).collect(),
                page_size: i32::try_from(args.limit.clamp(1, 1000)).unwrap_or(1000),
                page_token,
                pending_for_me: args.pending,
                ..Default::default()
            })
            .await?
            .into_inner();
        total_size = page.total_size;
        // `--mine`: the server computes is_requester for the caller, whoever the credential
        // says it is.
        found.extend(
            page.change_requests
                .into_iter()
                .filter(|r| !args.mine || r.is_requester),
        );
        page_token = page.next_page_token;
        if found.len() >= args.limit || page_token.is_empty() {
            break;
        }
    }
    found.truncate(args.limit);
    let response = pb::ListChangeRequestsResponse {
        change_requests: found,
        next_page_token: String::new(),
        total_size: if args.mine { 0 } else { total_size },
    };
    if output::machine(&response, names::LIST_CHANGE_REQUESTS, format)? {
        return Ok(ExitCode::SUCCESS);
    }
    if format == Format::Id {
        for r in &response.change_requests {
            outln!("{}", r.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&[
        "ID",
        "STATE",
        "TITLE",
        "ENV",
        "ACTION KEY",
        "REQUESTER",
        "APPROVALS",
        "UPDATED",
    ]);
    for r in &response.change_requests {
        table.add_row(vec![
            r.id.clone(),
            output::state(r.state),
            r.title.clone(),
            r.environment.clone(),
            r.action_key.clone(),
            r.created_by.clone(),
            format!("{}/{}", r.approval_count, r.min_approvals),
            output::relative(r.update_time.as_ref()),
        ]);
    }
    if response.change_requests.is_empty() {
        outln!("no change requests");
    } else {
        output::print_table(&table);
    }
    Ok(ExitCode::SUCCESS)
}

/// `TYPE/ID=FILE.json` -> a change whose payload is the file's JSON object.
fn parse_change(text: &str, action: &str) -> Result<pb::Change, CliError> {
    let bad = |why: &str| CliError::usage(format!("--change {text:?}: {why}"));
    let (resource, file) = text
        .split_once('=')
        .ok_or_else(|| bad("expected TYPE/ID=FILE.json"))?;
    let (resource_type, resource_id) = resource
        .split_once('/')
        .ok_or_else(|| bad("expected TYPE/ID before '='"))?;
    let body = std::fs::read_to_string(file).map_err(|e| bad(&format!("{file}: {e}")))?;
    let json: Json = serde_json::from_str(&body).map_err(|e| bad(&format!("{file}: {e}")))?;
    let Json::Object(map) = json else {
        return Err(bad(&format!("{file}: the payload must be a JSON object")));
    };
    Ok(pb::Change {
        action: action.to_owned(),
        resource_type: resource_type.to_owned(),
        resource_id: resource_id.to_owned(),
        payload: Some(crate::convert::to_struct(&map)),
        ..Default::default()
    })
}

/// A YAML, JSON or TOML file as JSON (by its extension; YAML, a superset of JSON, otherwise).
pub fn read_document(path: &std::path::Path) -> Result<Json, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?;
    let bad = |e: String| CliError::usage(format!("{}: {e}", path.display()));
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => {
            let value: toml::Value = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            serde_json::to_value(value).map_err(|e| bad(e.to_string()))
        }
        Some("json") => serde_json::from_str(&text).map_err(|e| bad(e.to_string())),
        _ => serde_yaml::from_str(&text).map_err(|e| bad(e.to_string())),
    }
}

fn create_request(api: &Api, args: CreateArgs) -> Result<pb::CreateChangeRequestRequest, CliError> {
    let mut body = match &args.file {
        Some(path) => {
            let json = read_document(path)?;
            output::from_json(json, names::CREATE_CHANGE_REQUEST)
                .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?
        }
        None => pb::CreateChangeRequestRequest::default(),
    };
    if let Some(project) = args.project.or_else(|| {
        body.project
            .is_empty()
            .then(|| api.project.clone())
            .flatten()
    }) {
        body.project = project;
    }
    let set = |field: &mut String, value: Option<String>| {
        if let Some(value) = value {
            *field = value;
        }
    };
    set(&mut body.environment, args.environment);
    set(&mut body.action_key, args.action_key);
    set(&mut body.title, args.title);
    set(&mut body.description, args.description);
    set(&mut body.intent_display, args.intent_display);
    set(&mut body.request_id, args.request_id);
    if let Some(version) = args.action_version {
        body.action_version = version;
    }
    for change in &args.changes {
        body.changes
            .push(parse_change(change, &args.change_action)?);
    }
    if args.draft {
        body.draft = true;
    }
    if let Some(at) = &args.apply_at {
        body.apply_time =
            Some(output::parse_time(at).map_err(|e| CliError::usage(format!("--apply-at {e}")))?);
    }
    Ok(body)
}

async fn run_edit(api: &Api, args: EditArgs) -> Result<pb::ChangeRequest, CliError> {
    let mut cr = api.change_requests();
    let mut paths = Vec::new();
    let mut body = pb::ChangeRequest {
        id: args.target.id.clone(),
        etag: args.target.etag.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(title) = args.title {
        body.title = title;
        paths.push("title");
    }
    if let Some(description) = args.description {
        body.description = description;
        paths.push("description");
    }
    if let Some(intent) = args.intent_display {
        body.intent_display = intent;
        paths.push("intent_display");
    }
    if let Some(at) = &args.expire_at {
        body.expire_time =
            Some(output::parse_time(at).map_err(|e| CliError::usage(format!("--expire-at {e}")))?);
        paths.push("expire_time");
    }
    if !args.changes.is_empty() || !args.remove.is_empty() {
        // Read-modify-write of the list, made safe by the etag of what was read.
        let current = cr
            .get_change_request(pb::GetChangeRequestRequest {
                id: args.target.id.clone(),
            })
            .await?
            .into_inner();
        if body.etag.is_empty() {
            body.etag = current.etag.clone();
        }
        let mut changes = current.changes;
        for resource in &args.remove {
            let before = changes.len();
            changes.retain(|c| format!("{}/{}", c.resource_type, c.resource_id) != *resource);
            if changes.len() == before {
                return Err(CliError::usage(format!(
                    "--remove-change {resource}: the request has no change on it"
                )));
            }
        }
        for text in &args.changes {
            let mut change = parse_change(text, &args.change_action)?;
            match changes.iter_mut().find(|c| {
                c.resource_type == change.resource_type && c.resource_id == change.resource_id
            }) {
                Some(existing) => {
                    change.id = existing.id.clone();
                    change.action = existing.action.clone();
                    change.base_version = existing.base_version.clone();
                    *existing = change;
                }
                None => changes.push(change),
            }
        }
        body.changes = changes;
        paths.push("changes");
    }
    if paths.is_empty() {
        return Err(CliError::usage(
            "nothing to edit: give --title, --description, --intent-display, --expire-at, \
             --change or --remove-change",
        ));
    }
    Ok(cr
        .update_change_request(pb::UpdateChangeRequestRequest {
            change_request: Some(body),
            update_mask: Some(FieldMask {
                paths: paths.into_iter().map(str::to_owned).collect(),
            }),
        })
        .await?
        .into_inner())
}

async fn run_history(api: &Api, id: String, format: Format) -> Result<ExitCode, CliError> {
    let mut cr = api.change_requests();
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = cr
            .list_change_request_events(pb::ListChangeRequestEventsRequest {
                id: id.clone(),
                page_size: 1000,
                page_token,
                include_change_request: false,
            })
            .await?
            .into_inner();
        events.extend(page.events);
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    let response = pb::ListChangeRequestEventsResponse {
        events,
        next_page_token: String::new(),
    };
    if output::machine(&response, names::LIST_EVENTS, format)? {
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&["REVISION", "TIME", "EVENT", "ACTOR", "STATE", "DETAIL"]);
    for e in &response.events {
        table.add_row(event_row(e));
    }
    output::print_table(&table);
    Ok(ExitCode::SUCCESS)
}

fn kind(e: &pb::Event) -> String {
    let kind = pb::EventKind::try_from(e.kind).unwrap_or(pb::EventKind::Unspecified);
    output::short(kind.as_str_name(), "EVENT_KIND_")
}

fn transition(e: &pb::Event) -> String {
    if e.from_state == e.to_state {
        output::state(e.to_state)
    } else {
        format!(
            "{} -> {}",
            output::state(e.from_state),
            output::state(e.to_state)
        )
    }
}

fn event_row(e: &pb::Event) -> Vec<String> {
    let actor = if e.acting_principal.is_empty() {
        e.actor.clone()
    } else {
        format!("{} (via {})", e.actor, e.acting_principal)
    };
    let mut detail = e.detail.replace('\n', " ");
    if detail.chars().count() > 60 {
        detail = detail.chars().take(57).collect::<String>() + "...";
    }
    vec![
        e.revision.to_string(),
        output::relative(e.event_time.as_ref()),
        kind(e),
        actor,
        transition(e),
        detail,
    ]
}

async fn run_watch(api: &Api, args: WatchArgs, format: Format) -> Result<ExitCode, CliError> {
    let project = api.project(args.project)?;
    let mut stream = api
        .change_requests()
        .watch_change_requests(pb::WatchChangeRequestsRequest {
            project,
            environment: args.environment.unwrap_or_default(),
            action_key: args.action_key.unwrap_or_default(),
            states: args.states.iter().map(|s| *s as i32).collect(),
            id: args.id.unwrap_or_default(),
            start_revision: args.from.unwrap_or(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(message) = stream.next().await {
        let message = message?;
        for event in &message.events {
            match format {
                Format::Json | Format::Yaml => {
                    // One event per line (JSON Lines), or one YAML document each.
                    let json = output::to_json(event, names::EVENT)?;
                    if format == Format::Json {
                        outln!("{json}");
                    } else {
                        outln!("---");
                        output::print_machine(&json, format)?;
                    }
                }
                Format::Id => outln!("{}", event.change_request_id),
                Format::Table => {
                    let row = event_row(event);
                    outln!(
                        "{}  {}  {}  {}  {}  {}",
                        row[0],
                        event.change_request_id,
                        row[2],
                        row[4],
                        row[3],
                        row[5]
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How a request is printed in table mode.
enum View {
    Full,
    /// One line: `VERB ID: STATE (n/m approvals)`.
    Summary(&'static str),
}

fn print_request(request: &pb::ChangeRequest, format: Format, view: View) -> Result<(), CliError> {
    if output::machine(request, names::CHANGE_REQUEST, format)? {
        return Ok(());
    }
    if format == Format::Id {
        outln!("{}", request.id);
        return Ok(());
    }
    match view {
        View::Summary(verb) => outln!(
            "{verb} {}: {} ({}/{} approvals)",
            request.id,
            output::state(request.state),
            request.approval_count,
            request.min_approvals
        ),
        View::Full => out!("{}", describe(request)),
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `cr show` for people.
fn describe(r: &pb::ChangeRequest) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let line = |out: &mut String, key: &str, value: &str| {
        if !value.is_empty() {
            let _ = writeln!(out, "{:<16}{value}", format!("{key}:"));
        }
    };
    let _ = writeln!(out, "{}", output::bold(&r.title));
    line(&mut out, "id", &r.id);
    line(&mut out, "state", &output::state(r.state));
    line(&mut out, "project", &r.project);
    line(&mut out, "environment", &r.environment);
    line(
        &mut out,
        "action key",
        &format!("{} (v{})", r.action_key, r.action_version),
    );
    line(&mut out, "requester", &r.created_by);
    line(&mut out, "created", &output::when(r.create_time.as_ref()));
    line(&mut out, "updated", &output::when(r.update_time.as_ref()));
    if r.expire_time.is_some() {
        line(&mut out, "expires", &output::when(r.expire_time.as_ref()));
    }
    line(
        &mut out,
        "approvals",
        &format!("{}/{}", r.approval_count, r.min_approvals),
    );
    line(&mut out, "description", &r.description);
    line(&mut out, "intent", &r.intent_display);
    if let Some(schedule) = &r.schedule {
        let status = pb::ScheduleStatus::try_from(schedule.status)
            .map(|s| output::short(s.as_str_name(), "SCHEDULE_STATUS_"))
            .unwrap_or_default();
        line(
            &mut out,
            "schedule",
            format!(
                "{} by {} {status} {}",
                output::when(schedule.apply_time.as_ref()),
                schedule.scheduled_by,
                schedule.reason
            )
            .trim_end(),
        );
    }
    if r.apply_time.is_some() {
        line(
            &mut out,
            "applied",
            &format!(
                "{} by {}",
                output::when(r.apply_time.as_ref()),
                r.applied_by
            ),
        );
    }
    line(&mut out, "apply error", &r.apply_error);
    if !r.bypassed_by.is_empty() {
        line(
            &mut out,
            "break-glass",
            &format!("{}: {}", r.bypassed_by, r.bypass_justification),
        );
    }
    for error in &r.validation_errors {
        line(&mut out, "invalid", error);
    }
    let decision = pb::Decision::try_from(r.user_decision)
        .ok()
        .filter(|d| *d != pb::Decision::Unspecified)
        .map_or_else(
            || "none".to_owned(),
            |d| output::short(d.as_str_name(), "DECISION_"),
        );
    let pending = r.can_approve
        && r.state == pb::State::InReview as i32
        && r.user_decision == pb::Decision::Unspecified as i32;
    let _ = writeln!(out, "\n{}", output::bold("You"));
    let _ = writeln!(
        out,
        "  requester: {}   can approve: {}   can cancel: {}   pending for you: {}   your decision: {decision}",
        yes(r.is_requester),
        yes(r.can_approve),
        yes(r.can_cancel),
        yes(pending)
    );
    if let Some(p) = &r.policy_snapshot {
        let _ = writeln!(out, "\n{}", output::bold("Policy snapshot"));
        let mode = pb::ApplyMode::try_from(p.apply_mode)
            .map(|m| output::short(m.as_str_name(), "APPLY_MODE_"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}  min approvals {}  approvers {}  self-approval {}  apply {mode}",
            if p.name.is_empty() {
                "(server default)"
            } else {
                &p.name
            },
            p.min_approvals,
            if p.approvers.is_empty() {
                "anyone".to_owned()
            } else {
                p.approvers.join(",")
            },
            yes(p.allow_self_approval),
        );
        for req in &p.requirements {
            let _ = writeln!(out, "  requires {} from {}", req.min_approvals, req.group);
        }
    }
    let _ = writeln!(out, "\n{}", output::bold("Changes"));
    for c in &r.changes {
        let _ = writeln!(
            out,
            "  {} {}/{}{}",
            c.action,
            c.resource_type,
            c.resource_id,
            if c.conflict.is_empty() {
                String::new()
            } else {
                format!("  CONFLICT: {}", c.conflict)
            }
        );
        out.push_str(&output::struct_yaml(c.payload.as_ref(), "    "));
    }
    if !r.reviews.is_empty() {
        let _ = writeln!(out, "\n{}", output::bold("Reviews"));
        for review in &r.reviews {
            let decision = pb::Decision::try_from(review.decision)
                .map(|d| output::short(d.as_str_name(), "DECISION_"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {decision:<8} {}  {}{}  {}",
                review.reviewer,
                output::relative(review.create_time.as_ref()),
                if review.dismissed {
                    "  (dismissed)"
                } else {
                    ""
                },
                review.comment
            );
        }
    }
    if !r.comments.is_empty() {
        let _ = writeln!(out, "\n{}", output::bold("Comments"));
        for comment in &r.comments {
            let _ = writeln!(
                out,
                "  {}  {}: {}",
                output::relative(comment.create_time.as_ref()),
                comment.author,
                comment.text
            );
        }
    }
    if let Some(result) = &r.result_data {
        let _ = writeln!(out, "\n{}", output::bold("Result"));
        out.push_str(&output::struct_yaml(Some(result), "  "));
    }
    out
}

/// Whether `--wait` stops at this request: it left the intermediate states (see
/// `CreateArgs::wait`).
fn resting(r: &pb::ChangeRequest) -> bool {
    let state = pb::State::try_from(r.state).unwrap_or(pb::State::Unspecified);
    match state {
        pb::State::InReview | pb::State::Scheduled | pb::State::Applying => false,
        pb::State::Approved => {
            let mode = r
                .policy_snapshot
                .as_ref()
                .map_or(pb::ApplyMode::Unspecified as i32, |p| p.apply_mode);
            mode != pb::ApplyMode::Auto as i32 && mode != pb::ApplyMode::External as i32
        }
        _ => true,
    }
}

fn outcome(r: &pb::ChangeRequest) -> ExitCode {
    let state = pb::State::try_from(r.state).unwrap_or(pb::State::Unspecified);
    match state {
        pb::State::Rejected
        | pb::State::Cancelled
        | pb::State::Expired
        | pb::State::ApplyFailed => ExitCode::from(exit::NOT_APPLIED),
        _ => ExitCode::SUCCESS,
    }
}

/// Prints the result of a mutation; with `wait`, first follows the request through the watch
/// stream (each transition on stderr) until it rests, and says the outcome in the exit code.
async fn done(
    api: &Api,
    request: pb::ChangeRequest,
    format: Format,
    verb: &'static str,
    wait: bool,
) -> Result<ExitCode, CliError> {
    if !wait {
        print_request(&request, format, View::Summary(verb))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut request = request;
    eprintln!("{} {}: {}", verb, request.id, output::state(request.state));
    if !resting(&request) {
        let mut cr = api.change_requests();
        // From the revision after the one returned: nothing between is missed.
        let mut stream = cr
            .watch_change_requests(pb::WatchChangeRequestsRequest {
                project: request.project.clone(),
                id: request.id.clone(),
                start_revision: request.revision + 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut rested = None;
        'watch: while let Some(message) = stream.next().await {
            for event in message?.events {
                eprintln!(
                    "  revision {}: {} {} by {}",
                    event.revision,
                    kind(&event),
                    transition(&event),
                    event.actor
                );
                if let Some(snapshot) = event.change_request
                    && resting(&snapshot)
                {
                    rested = Some(snapshot);
                    break 'watch;
                }
            }
        }
        let Some(snapshot) = rested else {
            return Err(CliError::Local {
                code: exit::UNAVAILABLE,
                message: format!(
                    "the watch stream ended while {} was {}: wait again with `approvals cr \
                     watch --id {} --from {}`",
                    request.id,
                    output::state(request.state),
                    request.id,
                    request.revision + 1
                ),
            });
        };
        // The caller's view (can_approve and the other computed fields), unless this replica
        // has not read that far yet.
        let current = cr
            .get_change_request(pb::GetChangeRequestRequest {
                id: request.id.clone(),
            })
            .await?
            .into_inner();
        request = if current.revision >= snapshot.revision {
            current
        } else {
            snapshot
        };
    }
    print_request(&request, format, View::Summary(verb))?;
    Ok(outcome(&request))
}
