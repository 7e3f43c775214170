//! `approvals policy ...`: policies, and policies as code (`policy apply -f`).
//!
//! A policy file (YAML, TOML or JSON; a folder of them) holds the desired policies, each in the
//! proto's fields (snake_case or lowerCamelCase), under `policies` or as the file's one policy:
//!
//! ```yaml
//! policies:
//!   - name: web-prod
//!     project: web
//!     environment: prod
//!     action_key: "feature_flag.*"
//!     min_approvals: 2
//!     approvers: ["group:sre"]
//!     default_ttl: 7d            # proto JSON ("604800s") or a humantime duration
//!     calendars: ["year-end"]    # applies only while every one is open
//!     apply_delay: 1h            # due no earlier than approval + 1h (humantime, as above)
//! ```
//!
//! Policies are matched by `name` (unique across the service). `apply` prints what differs,
//! creates the missing policies and updates the others (UpdatePolicy with mask `*`, conditional
//! on the etag read); `--prune` deletes policies of the files' projects (and of `--project`)
//! that no file names. Fields left out take their defaults, as on create, so a second run
//! changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};
use prost_types::FieldMask;
use serde_json::Value as Json;

use super::{
    Api, CliError, Format, Global,
    cr::read_document,
    output::{self, names},
};
use crate::pb;

/// Approval policies, and policies as code.
#[derive(Args, Debug)]
#[command(after_help = concat!(
    "Examples:\n",
    "  approvals policy list --project web\n",
    "  approvals policy apply -f policies/ --dry-run\n\n",
    crate::exit_codes_help!()
))]
pub struct PolicyArgs {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// List policies by name.
    #[command(after_help = "Example:\n  approvals policy list --project web")]
    List {
        /// Only this project's policies.
        #[arg(long, value_name = "P")]
        project: Option<String>,
    },
    /// Show one policy.
    #[command(after_help = "Example:\n  approvals policy show web-prod -o yaml")]
    Show { name: String },
    /// Make the service's policies match a file or a folder of files (YAML, TOML, JSON).
    #[command(after_help = "Examples:
  approvals policy apply -f policies/ --dry-run
  approvals policy apply -f policies.yaml --prune")]
    Apply(ApplyArgs),
    /// Delete a policy (requests already created keep their snapshot).
    #[command(after_help = "Example:\n  approvals policy delete web-prod")]
    Delete {
        name: String,
        /// Only if the policy's etag is still this.
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// A policy file, or a folder of them (`*.yaml`, `*.yml`, `*.toml`, `*.json`).
    #[arg(short = 'f', long = "file", value_name = "PATH", required = true)]
    file: PathBuf,
    /// Only print what would change.
    #[arg(long)]
    dry_run: bool,
    /// Delete policies of the files' projects (and of --project) that no file names.
    #[arg(long)]
    prune: bool,
    /// With --prune: a project whose policies are pruned too, though no file names it
    /// (repeatable).
    #[arg(long = "project", value_name = "P")]
    projects: Vec<String>,
}

pub async fn run(args: PolicyArgs) -> Result<ExitCode, CliError> {
    let api = Api::connect(&args.global).await?;
    let format = args.global.format();
    let mut policies = api.policies();
    match args.command {
        PolicyCommand::List { project } => {
            let project = project.or(api.project.clone()).unwrap_or_default();
            let response = pb::ListPoliciesResponse {
                policies: list_all(&api, &project).await?,
                next_page_token: String::new(),
            };
            if output::machine(&response, names::LIST_POLICIES, format)? {
                return Ok(ExitCode::SUCCESS);
            }
            if format == Format::Id {
                for p in &response.policies {
                    outln!("{}", p.name);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&[
                "NAME",
                "PROJECT",
                "ENV",
                "ACTION KEY",
                "MIN",
                "APPROVERS",
                "APPLY",
                "UPDATED",
            ]);
            for p in &response.policies {
                table.add_row(vec![
                    p.name.clone(),
                    p.project.clone(),
                    p.environment.clone(),
                    p.action_key.clone(),
                    p.min_approvals.to_string(),
                    p.approvers.join(","),
                    pb::ApplyMode::try_from(p.apply_mode)
                        .map(|m| output::short(m.as_str_name(), "APPLY_MODE_"))
                        .unwrap_or_default(),
                    output::relative(p.update_time.as_ref()),
                ]);
            }
            if response.policies.is_empty() {
                outln!("no policies");
            } else {
                output::print_table(&table);
            }
        }
        PolicyCommand::Show { name } => {
            let policy = policies
                .get_policy(pb::GetPolicyRequest { name })
                .await?
                .into_inner();
            let format = if format == Format::Table {
                // A policy reads best as its YAML.
                Format::Yaml
            } else {
                format
            };
            if format == Format::Id {
                outln!("{}", policy.name);
            } else {
                output::machine(&policy, names::POLICY, format)?;
            }
        }
        PolicyCommand::Delete { name, etag } => {
            policies
                .delete_policy(pb::DeletePolicyRequest {
                    name: name.clone(),
                    etag: etag.unwrap_or_default(),
                })
                .await?;
            outln!("deleted policy {name}");
        }
        PolicyCommand::Apply(apply) => return run_apply(&api, apply, format).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// Deletes `p` unless it changed since it was read.
async fn delete(
    client: &mut pb::policies_client::PoliciesClient<super::Channel>,
    p: &pb::Policy,
) -> Result<(), CliError> {
    client
        .delete_policy(pb::DeletePolicyRequest {
            name: p.name.clone(),
            etag: p.etag.clone(),
        })
        .await?;
    Ok(())
}

async fn list_all(api: &Api, project: &str) -> Result<Vec<pb::Policy>, CliError> {
    let mut client = api.policies();
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_policies(pb::ListPoliciesRequest {
                project: project.to_owned(),
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        all.extend(page.policies);
        page_token = page.next_page_token;
        if page_token.is_empty() {
            return Ok(all);
        }
    }
}

/// The files of `path`: itself, or the policy files directly in the folder, by name.
fn files(path: &Path) -> Result<Vec<PathBuf>, CliError> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries =
        std::fs::read_dir(path).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "toml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// `default_ttl: 7d` -> `"604800s"` (the proto JSON of a Duration), for people writing files;
/// the same for `apply_delay`.
fn friendly_durations(policy: &mut Json) {
    let Json::Object(map) = policy else { return };
    for key in ["default_ttl", "defaultTtl", "apply_delay", "applyDelay"] {
        if let Some(Json::String(text)) = map.get(key) {
            let is_proto = text
                .strip_suffix('s')
                .is_some_and(|n| n.parse::<f64>().is_ok());
            if !is_proto && let Ok(d) = humantime::parse_duration(text) {
                map.insert(key.to_owned(), Json::String(format!("{}s", d.as_secs())));
            }
        }
    }
}

/// The desired policies, by name.
pub fn desired(path: &Path) -> Result<BTreeMap<String, pb::Policy>, CliError> {
    let mut out = BTreeMap::new();
    for file in files(path)? {
        let document = read_document(&file)?;
        let (items, list) = match document {
            Json::Object(mut map) if map.contains_key("policies") => match map.remove("policies") {
                Some(Json::Array(items)) => (items, true),
                _ => {
                    return Err(CliError::usage(format!(
                        "{}: `policies` must be a list",
                        file.display()
                    )));
                }
            },
            Json::Null => (Vec::new(), true),
            single => (vec![single], false),
        };
        for (i, mut item) in items.into_iter().enumerate() {
            let at = if list {
                format!("{}: policies[{i}]", file.display())
            } else {
                file.display().to_string()
            };
            friendly_durations(&mut item);
            let policy: pb::Policy = output::from_json(item, names::POLICY)
                .map_err(|e| CliError::usage(format!("{at}: {e}")))?;
            if policy.name.is_empty() {
                return Err(CliError::usage(format!("{at}: `name` is required")));
            }
            let name = policy.name.clone();
            if out.insert(name.clone(), normalized(policy)).is_some() {
                return Err(CliError::usage(format!(
                    "{at}: policy {name:?} is named twice"
                )));
            }
        }
    }
    Ok(out)
}

/// A policy as the service stores it: output-only fields cleared, defaults made explicit
/// (as CreatePolicy fills them in), so desired and current compare field by field.
fn normalized(mut p: pb::Policy) -> pb::Policy {
    p.uid.clear();
    p.etag.clear();
    p.create_time = None;
    p.update_time = None;
    p.rejections_to_reject = p.rejections_to_reject.max(1);
    p.dismiss_stale_approvals = Some(p.dismiss_stale_approvals.unwrap_or(true));
    p.independent_approvals = Some(p.independent_approvals.unwrap_or(true));
    p.count_approver_once = Some(p.count_approver_once.unwrap_or(true));
    p
}

/// The fields that differ, each as `field: old -> new` (proto JSON values).
fn differences(current: &pb::Policy, desired: &pb::Policy) -> Result<Vec<String>, CliError> {
    let old = output::to_json_with(current, names::POLICY, true)?;
    let new = output::to_json_with(desired, names::POLICY, true)?;
    let (Json::Object(old), Json::Object(new)) = (old, new) else {
        return Ok(Vec::new());
    };
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    Ok(keys
        .into_iter()
        .filter_map(|key| {
            let (a, b) = (old.get(key), new.get(key));
            (a != b).then(|| {
                let show = |v: Option<&Json>| v.map_or_else(|| "unset".to_owned(), Json::to_string);
                format!("{key}: {} -> {}", show(a), show(b))
            })
        })
        .collect())
}

async fn run_apply(api: &Api, args: ApplyArgs, format: Format) -> Result<ExitCode, CliError> {
    let wanted = desired(&args.file)?;
    let mut projects: BTreeSet<String> = wanted.values().map(|p| p.project.clone()).collect();
    projects.extend(args.projects.iter().cloned());
    let mut current: BTreeMap<String, pb::Policy> = BTreeMap::new();
    // Every policy the caller may see: a name is unique across the service, so a desired
    // policy may exist under another project (the update then moves it).
    for p in list_all(api, "").await? {
        current.insert(p.name.clone(), p);
    }
    let mut creates = Vec::new();
    let mut updates = Vec::new();
    let mut unchanged = Vec::new();
    for (name, policy) in &wanted {
        match current.get(name) {
            None => creates.push(policy.clone()),
            Some(existing) => {
                let diff = differences(&normalized(existing.clone()), policy)?;
                if diff.is_empty() {
                    unchanged.push(name.clone());
                } else {
                    updates.push((policy.clone(), existing.etag.clone(), diff));
                }
            }
        }
    }
    let deletes: Vec<pb::Policy> = if args.prune {
        current
            .values()
            .filter(|p| !wanted.contains_key(&p.name) && projects.contains(&p.project))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };

    let human = matches!(format, Format::Table | Format::Id);
    let would = if args.dry_run { "would " } else { "" };
    if human {
        for p in &creates {
            outln!(
                "+ {would}create policy {} (project {}, environment {:?}, action_key {})",
                p.name,
                p.project,
                p.environment,
                p.action_key
            );
        }
        for (p, _, diff) in &updates {
            outln!("~ {would}update policy {}", p.name);
            for line in diff {
                outln!("    {line}");
            }
        }
        for p in &deletes {
            outln!("- {would}delete policy {} (project {})", p.name, p.project);
        }
    }
    if !args.dry_run {
        // A policy to delete that holds the project/environment/action_key a created or updated
        // one takes (a rename) goes first, or the create would be ALREADY_EXISTS; the others go
        // last, so a service never lacks a policy it is meant to keep.
        let triple = |p: &pb::Policy| {
            (
                p.project.clone(),
                p.environment.clone(),
                p.action_key.clone(),
            )
        };
        let taken: BTreeSet<_> = creates
            .iter()
            .chain(updates.iter().map(|(p, _, _)| p))
            .map(triple)
            .collect();
        let (first, last): (Vec<&pb::Policy>, Vec<&pb::Policy>) =
            deletes.iter().partition(|p| taken.contains(&triple(p)));
        let mut client = api.policies();
        for p in &first {
            delete(&mut client, p).await?;
        }
        for p in &creates {
            client
                .create_policy(pb::CreatePolicyRequest {
                    policy: Some(p.clone()),
                })
                .await?;
        }
        for (p, etag, _) in &updates {
            let mut body = p.clone();
            body.etag = etag.clone();
            client
                .update_policy(pb::UpdatePolicyRequest {
                    policy: Some(body),
                    update_mask: Some(FieldMask {
                        paths: vec!["*".into()],
                    }),
                })
                .await?;
        }
        for p in &last {
            delete(&mut client, p).await?;
        }
    }
    let names_of = |ps: &[pb::Policy]| ps.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    if human {
        let changes = creates.len() + updates.len() + deletes.len();
        if changes == 0 {
            outln!("no changes ({} policies unchanged)", unchanged.len());
        } else {
            outln!(
                "{}{} to create, {} to update, {} to delete, {} unchanged",
                if args.dry_run {
                    "dry run: "
                } else {
                    "applied: "
                },
                creates.len(),
                updates.len(),
                deletes.len(),
                unchanged.len()
            );
        }
    } else {
        let summary = serde_json::json!({
            "dryRun": args.dry_run,
            "created": names_of(&creates),
            "updated": updates.iter().map(|(p, _, _)| p.name.clone()).collect::<Vec<_>>(),
            "deleted": names_of(&deletes),
            "unchanged": unchanged,
        });
        output::print_machine(&summary, format)?;
    }
    Ok(ExitCode::SUCCESS)
}
