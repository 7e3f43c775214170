//! `approvals audit export` and `approvals audit verify`: the log as JSON Lines, and the check
//! of every chain and checkpoint, from the database or from an export.
//!
//! An export is one JSON object per line: first a header
//! `{"type":"header","format":"approvals.audit.v1","since":REV,"project":P|null}`, then every
//! event from revision `since` on (of project `P`, if given), oldest first, as
//! `{"type":"event","revision":..,"prev_hash":HEX|null,"hash":HEX|null, <the AuditRecord's
//! fields>}`, then every checkpoint at or after `since` as `{"type":"checkpoint","revision":..,
//! "tree_size":..,"root_hash":HEX,"checkpoint_time_micros":..,"signature":HEX}`.

use std::io::{BufRead, Write};

use approvals_domain::audit::{
    Break, EventFields, StoredEvent, check_chains, hash_from_hex, hex, leaf_hash, merkle_root,
};
use approvals_store::{Checkpoint, Store};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

/// The export's format name, in its header.
pub const FORMAT: &str = "approvals.audit.v1";

/// Events read from the database per query.
const PAGE: u64 = 5_000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Header {
        format: String,
        since: i64,
        project: Option<String>,
    },
    Event {
        revision: i64,
        prev_hash: Option<String>,
        hash: Option<String>,
        #[serde(flatten)]
        fields: Box<EventFields>,
    },
    Checkpoint {
        revision: i64,
        tree_size: u64,
        root_hash: String,
        checkpoint_time_micros: i64,
        signature: String,
    },
}

/// What verification found.
#[derive(Debug, Default)]
pub struct Report {
    pub events: usize,
    pub requests: usize,
    pub legacy_events: usize,
    pub checkpoints: usize,
    /// Checkpoints whose signature was checked but whose root could not be recomputed (a
    /// partial export).
    pub unrecomputed: usize,
    pub breaks: Vec<Break>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.breaks.is_empty()
    }

    /// One line per break, then a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for b in &self.breaks {
            out.push_str(&format!("BREAK {b}\n"));
        }
        out.push_str(&format!(
            "{} events of {} change requests ({} legacy events without a hash), {} checkpoints{}: {}\n",
            self.events,
            self.requests,
            self.legacy_events,
            self.checkpoints,
            if self.unrecomputed > 0 {
                format!(
                    " ({} checked by signature only: the export is partial)",
                    self.unrecomputed
                )
            } else {
                String::new()
            },
            if self.breaks.is_empty() {
                "verified".to_owned()
            } else {
                format!("{} breaks", self.breaks.len())
            }
        ));
        out
    }
}

/// Checks `events` and `checkpoints`: every chain, every signature with `key`, and (when
/// `complete`: the events are the whole log) every checkpoint's tree size and root.
pub fn verify(
    events: Vec<StoredEvent>,
    checkpoints: &[Checkpoint],
    key: &VerifyingKey,
    complete: bool,
) -> Report {
    let chains = check_chains(events, !complete);
    let mut report = Report {
        events: chains.events,
        requests: chains.requests,
        legacy_events: chains.legacy_events,
        checkpoints: checkpoints.len(),
        ..Default::default()
    };
    report.breaks.extend(chains.breaks.iter().cloned());
    for checkpoint in checkpoints {
        let mut problem = |message: String| {
            report.breaks.push(Break {
                change_request_id: None,
                revision: checkpoint.revision,
                message,
            })
        };
        if !super::signature_verifies(key, checkpoint) {
            problem(
                "its signature does not verify with the public key: the checkpoint was forged \
                 or altered (or signed with another key)"
                    .into(),
            );
            continue;
        }
        if !complete {
            report.unrecomputed += 1;
            continue;
        }
        let heads = chains.heads_at(checkpoint.revision);
        let leaves: Vec<_> = heads.iter().map(|h| leaf_hash(&h.leaf())).collect();
        let root = merkle_root(&leaves);
        if leaves.len() as u64 != checkpoint.tree_size {
            problem(format!(
                "it signed {} change requests' chain heads, the log now has {} at that revision: \
                 {}",
                checkpoint.tree_size,
                leaves.len(),
                if (leaves.len() as u64) < checkpoint.tree_size {
                    "a change request it covered was deleted"
                } else {
                    "a change request was added below its revision"
                }
            ));
        } else if root != checkpoint.root {
            problem(format!(
                "the root of the chain heads at that revision is {}, the checkpoint signed {}: \
                 events it covered were edited, deleted or re-hashed",
                hex(&root),
                hex(&checkpoint.root)
            ));
        }
    }
    report
}

/// Reads every event (from `since`, of `project`) and every checkpoint from the database.
pub async fn read_database(
    store: &Store,
    since: i64,
    project: Option<&str>,
) -> Result<(Vec<StoredEvent>, Vec<Checkpoint>), String> {
    let mut events = Vec::new();
    let mut after = since.saturating_sub(1).max(0);
    loop {
        let page = store
            .stored_events(after, project, PAGE)
            .await
            .map_err(|e| format!("reading the events: {e}"))?;
        let full = page.len() as u64 >= PAGE;
        if let Some(last) = page.last() {
            after = last.revision;
        }
        events.extend(page);
        if !full {
            break;
        }
    }
    let checkpoints = store
        .checkpoints_since(since)
        .await
        .map_err(|e| format!("reading the checkpoints: {e}"))?;
    Ok((events, checkpoints))
}

/// Verifies the database (the whole log).
pub async fn verify_database(store: &Store, key: &VerifyingKey) -> Result<Report, String> {
    let (events, checkpoints) = read_database(store, 0, None).await?;
    Ok(verify(events, &checkpoints, key, true))
}

/// Writes the export of the log from `since` (of `project`) to `out`.
pub async fn export(
    store: &Store,
    since: i64,
    project: Option<&str>,
    out: &mut impl Write,
) -> Result<(), String> {
    let (events, checkpoints) = read_database(store, since, project).await?;
    let mut write = |line: &Line| -> Result<(), String> {
        let text = serde_json::to_string(line).map_err(|e| e.to_string())?;
        writeln!(out, "{text}").map_err(|e| format!("writing the export: {e}"))
    };
    write(&Line::Header {
        format: FORMAT.into(),
        since,
        project: project.map(str::to_owned),
    })?;
    for event in events {
        write(&Line::Event {
            revision: event.revision,
            prev_hash: event.prev_hash.map(|h| hex(&h)),
            hash: event.hash.map(|h| hex(&h)),
            fields: Box::new(event.fields),
        })?;
    }
    for c in checkpoints {
        write(&Line::Checkpoint {
            revision: c.revision,
            tree_size: c.tree_size,
            root_hash: hex(&c.root),
            checkpoint_time_micros: c.time_micros,
            signature: hex(&c.signature),
        })?;
    }
    Ok(())
}

fn bytes_from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// Verifies an export on its own. A malformed line is an error (naming the line), not a break.
pub fn verify_export(input: impl BufRead, key: &VerifyingKey) -> Result<Report, String> {
    let mut events = Vec::new();
    let mut checkpoints = Vec::new();
    let mut complete = None;
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("reading line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}", n + 1);
        let parsed: Line =
            serde_json::from_str(&line).map_err(|e| bad(&format!("not an export line: {e}")))?;
        match parsed {
            Line::Header {
                format,
                since,
                project,
            } => {
                if format != FORMAT {
                    return Err(bad(&format!("unknown format {format:?}")));
                }
                complete = Some(since <= 1 && project.is_none());
            }
            Line::Event {
                revision,
                prev_hash,
                hash,
                fields,
            } => {
                let parse = |h: Option<String>| -> Result<_, String> {
                    h.map(|h| hash_from_hex(&h).ok_or_else(|| bad("a hash is not 64 hex digits")))
                        .transpose()
                };
                events.push(StoredEvent {
                    revision,
                    fields: *fields,
                    prev_hash: parse(prev_hash)?,
                    hash: parse(hash)?,
                });
            }
            Line::Checkpoint {
                revision,
                tree_size,
                root_hash,
                checkpoint_time_micros,
                signature,
            } => checkpoints.push(Checkpoint {
                revision,
                tree_size,
                root: hash_from_hex(&root_hash)
                    .ok_or_else(|| bad("root_hash is not 64 hex digits"))?,
                time_micros: checkpoint_time_micros,
                signature: bytes_from_hex(&signature).ok_or_else(|| bad("signature is not hex"))?,
            }),
        }
    }
    let complete = complete.ok_or("the export has no header line")?;
    Ok(verify(events, &checkpoints, key, complete))
}
