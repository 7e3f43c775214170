//! The verifiable history: each event's hash in its request's chain, the Merkle tree over the
//! chain heads (RFC 6962), and the bytes a checkpoint signs. Pure functions, so the store, the
//! server, the `audit verify` command and an independent implementation agree on every byte.
//!
//! - An event's **record** is the deterministic protobuf encoding of `approvals.v1.AuditRecord`
//!   (proto/approvals/v1/audit.proto): fields in field-number order, each written once, a
//!   string or bytes field left out when empty, `comment_count` (explicit presence) written
//!   whenever it is set. [`AuditRecord::encode`] writes exactly those bytes.
//! - Its **hash** is `SHA-256(prev_hash || uint64_be(revision) || record)`, where `prev_hash` is
//!   the hash of the previous event of the same change request, or 32 zero bytes for the first
//!   hashed event of a request ([`GENESIS`]). The revision is outside the record so that the
//!   database can compute the hash in the statement that draws the revision (PostgreSQL's
//!   `sha256(prev || int8send(revision) || record)`).
//! - A **leaf** of a checkpoint's tree is one request's chain head at the checkpoint's revision:
//!   `uint64_be(head_revision) || head_hash || change_request_id` (UTF-8); leaves are ordered by
//!   change request id (byte order). Leaf and node hashes follow RFC 6962 section 2.1:
//!   `SHA-256(0x00 || leaf)`, `SHA-256(0x01 || left || right)`, the empty tree `SHA-256("")`.
//! - A **checkpoint** signs [`checkpoint_message`].

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The previous hash of a request's first hashed event.
pub const GENESIS: Hash = [0; 32];

/// The fields of an event that its hash covers (see the module comment), as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditRecord<'a> {
    pub change_request_id: &'a str,
    pub project: &'a str,
    pub environment: &'a str,
    /// The event kind as stored (`REVIEWED`).
    pub kind: &'a str,
    pub actor: &'a str,
    /// Empty when no service acted for the actor.
    pub acting_principal: &'a str,
    /// States as stored (`IN_REVIEW`).
    pub from_state: &'a str,
    pub to_state: &'a str,
    /// Microseconds since the Unix epoch.
    pub event_time_micros: i64,
    pub detail: &'a str,
    /// The stored snapshot of the request right after the event (JSON text, byte for byte).
    pub snapshot: &'a str,
    /// How many comments the request had right after the event.
    pub comment_count: Option<i64>,
    /// How the credential that made the change was presented, as stored (`API_KEY`); empty
    /// when not recorded (legacy and the service's own events), so that their records are the
    /// bytes they were before the field existed.
    pub auth_method: &'a str,
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    if value.is_empty() {
        return;
    }
    put_varint(out, u64::from(field << 3 | 2));
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn put_int64(out: &mut Vec<u8>, field: u32, value: i64, always: bool) {
    if value == 0 && !always {
        return;
    }
    put_varint(out, u64::from(field << 3));
    // int64: two's complement as a 64-bit varint (negative values take ten bytes).
    put_varint(out, value as u64);
}

impl AuditRecord<'_> {
    /// The deterministic protobuf encoding of `approvals.v1.AuditRecord`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.detail.len() + self.snapshot.len());
        put_bytes(&mut out, 1, self.change_request_id.as_bytes());
        put_bytes(&mut out, 2, self.project.as_bytes());
        put_bytes(&mut out, 3, self.environment.as_bytes());
        put_bytes(&mut out, 4, self.kind.as_bytes());
        put_bytes(&mut out, 5, self.actor.as_bytes());
        put_bytes(&mut out, 6, self.acting_principal.as_bytes());
        put_bytes(&mut out, 7, self.from_state.as_bytes());
        put_bytes(&mut out, 8, self.to_state.as_bytes());
        put_int64(&mut out, 9, self.event_time_micros, false);
        put_bytes(&mut out, 10, self.detail.as_bytes());
        put_bytes(&mut out, 11, self.snapshot.as_bytes());
        if let Some(count) = self.comment_count {
            put_int64(&mut out, 12, count, true);
        }
        put_bytes(&mut out, 13, self.auth_method.as_bytes());
        out
    }
}

/// `SHA-256(prev || uint64_be(revision) || record)`.
pub fn event_hash(prev: &Hash, revision: i64, record: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update((revision as u64).to_be_bytes());
    hasher.update(record);
    hasher.finalize().into()
}

/// A 32-byte hash from stored bytes (`None` when the length is wrong).
pub fn hash_from_slice(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

/// One request's chain head at a checkpoint: a leaf of its tree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChainHead {
    pub change_request_id: String,
    pub revision: i64,
    pub hash: Hash,
}

impl ChainHead {
    /// The leaf's bytes: `uint64_be(revision) || hash || change_request_id`.
    pub fn leaf(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.change_request_id.len());
        out.extend_from_slice(&(self.revision as u64).to_be_bytes());
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(self.change_request_id.as_bytes());
        out
    }
}

/// RFC 6962 leaf hash: `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(leaf);
    hasher.finalize().into()
}

/// RFC 6962 interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// RFC 6962 Merkle Tree Hash over already hashed leaves.
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&merkle_root(&leaves[..k]), &merkle_root(&leaves[k..]))
        }
    }
}

/// RFC 6962 audit path (section 2.1.1) of leaf `index` in the tree over `leaves`, from the leaf
/// upwards. `None` when `index` is out of range.
pub fn inclusion_path(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    fn walk(leaves: &[Hash], index: usize, path: &mut Vec<Hash>) {
        if leaves.len() <= 1 {
            return;
        }
        let k = split(leaves.len());
        if index < k {
            walk(&leaves[..k], index, path);
            path.push(merkle_root(&leaves[k..]));
        } else {
            walk(&leaves[k..], index - k, path);
            path.push(merkle_root(&leaves[..k]));
        }
    }
    walk(leaves, index, &mut path);
    Some(path)
}

/// Checks an audit path (RFC 9162 section 2.1.3.2, the same tree as RFC 6962): whether `leaf`
/// (already hashed) at `index` of a tree of `size` leaves leads to `root`.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && &r == root
}

/// The bytes a checkpoint's Ed25519 signature covers: the ASCII line
/// `approvals.audit.checkpoint.v1\n`, then `uint64_be(revision) || uint64_be(tree_size) || root
/// || int64_be(time_micros)`.
pub fn checkpoint_message(revision: i64, tree_size: u64, root: &Hash, time_micros: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(30 + 56);
    out.extend_from_slice(b"approvals.audit.checkpoint.v1\n");
    out.extend_from_slice(&(revision as u64).to_be_bytes());
    out.extend_from_slice(&tree_size.to_be_bytes());
    out.extend_from_slice(root);
    out.extend_from_slice(&time_micros.to_be_bytes());
    out
}

/// Lower-case hex of a hash (as exports and messages show it).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A hash from its hex form.
pub fn hash_from_hex(text: &str) -> Option<Hash> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The owned fields of an [`AuditRecord`] (as an export writes them).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct EventFields {
    pub change_request_id: String,
    pub project: String,
    pub environment: String,
    pub kind: String,
    pub actor: String,
    #[serde(default)]
    pub acting_principal: Option<String>,
    pub from_state: String,
    pub to_state: String,
    pub event_time_micros: i64,
    pub detail: String,
    pub snapshot: String,
    #[serde(default)]
    pub comment_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<String>,
}

impl EventFields {
    pub fn record(&self) -> AuditRecord<'_> {
        AuditRecord {
            change_request_id: &self.change_request_id,
            project: &self.project,
            environment: &self.environment,
            kind: &self.kind,
            actor: &self.actor,
            acting_principal: self.acting_principal.as_deref().unwrap_or(""),
            from_state: &self.from_state,
            to_state: &self.to_state,
            event_time_micros: self.event_time_micros,
            detail: &self.detail,
            snapshot: &self.snapshot,
            comment_count: self.comment_count,
            auth_method: self.auth_method.as_deref().unwrap_or(""),
        }
    }
}

/// An event as read back for verification: its fields as stored and the hashes beside them.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub revision: i64,
    pub fields: EventFields,
    /// `None`: an event written before hashing existed (or whose hashes were removed).
    pub prev_hash: Option<Hash>,
    pub hash: Option<Hash>,
}

/// One thing that no longer matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The change request, when the break is in its chain.
    pub change_request_id: Option<String>,
    /// The revision of the event (or of the checkpoint) concerned.
    pub revision: i64,
    pub message: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.change_request_id {
            Some(id) => write!(
                f,
                "change request {id}, revision {}: {}",
                self.revision, self.message
            ),
            None => write!(
                f,
                "checkpoint at revision {}: {}",
                self.revision, self.message
            ),
        }
    }
}

/// What checking every chain found.
#[derive(Debug, Default)]
pub struct ChainReport {
    pub events: usize,
    pub requests: usize,
    /// Events without a hash before the first hashed event of their request (written before
    /// the hash chain existed): reported, not counted as breaks.
    pub legacy_events: usize,
    pub breaks: Vec<Break>,
    /// Each request's hashed events, in revision order (revision, stored hash), for checkpoints.
    pub hashed: std::collections::BTreeMap<String, Vec<(i64, Hash)>>,
}

impl ChainReport {
    /// Every request's chain head at `revision`, in leaf order (by change request id).
    pub fn heads_at(&self, revision: i64) -> Vec<ChainHead> {
        self.hashed
            .iter()
            .filter_map(|(id, events)| {
                let last = events.iter().rev().find(|(r, _)| *r <= revision)?;
                Some(ChainHead {
                    change_request_id: id.clone(),
                    revision: last.0,
                    hash: last.1,
                })
            })
            .collect()
    }
}

/// Checks every chain in `events` (any order). For each event: its record and revision still
/// give its stored hash from its stored previous hash (else its content, or its revision, was
/// edited), and that previous hash is the stored hash of the request's previous event (else an
/// event was deleted between them, or events were moved). `open_chains`: the export started
/// after the beginning of the log, so a request's first event may link to an event not given.
pub fn check_chains(mut events: Vec<StoredEvent>, open_chains: bool) -> ChainReport {
    events.sort_by_key(|e| e.revision);
    let mut by_request: std::collections::BTreeMap<String, Vec<StoredEvent>> = Default::default();
    let mut report = ChainReport {
        events: events.len(),
        ..Default::default()
    };
    for event in events {
        by_request
            .entry(event.fields.change_request_id.clone())
            .or_default()
            .push(event);
    }
    report.requests = by_request.len();
    for (id, chain) in by_request {
        let mut problem = |revision: i64, message: String| {
            report.breaks.push(Break {
                change_request_id: Some(id.clone()),
                revision,
                message,
            })
        };
        // Where each stored hash sits in the chain, to tell a deletion from a move.
        let position: std::collections::HashMap<Hash, usize> = chain
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.hash.map(|h| (h, i)))
            .collect();
        let mut previous: Option<(i64, Hash)> = None;
        let mut hashed = Vec::new();
        let mut first = true;
        for (i, event) in chain.iter().enumerate() {
            let (Some(prev), Some(hash)) = (event.prev_hash, event.hash) else {
                match previous {
                    None => report.legacy_events += 1,
                    Some((after, _)) => problem(
                        event.revision,
                        format!(
                            "the event has no hash, but revision {after} before it in this \
                             chain has one: its hashes were removed"
                        ),
                    ),
                }
                continue;
            };
            if event_hash(&prev, event.revision, &event.fields.record().encode()) != hash {
                problem(
                    event.revision,
                    "the event's content (kind, actor, acting principal, states, time, detail \
                     or snapshot) or its revision no longer matches its hash: the event was \
                     edited"
                        .into(),
                );
            }
            let expected = match previous {
                Some((_, h)) => h,
                None => GENESIS,
            };
            if prev != expected && !(first && open_chains) {
                let message = match (position.get(&prev), previous) {
                    (Some(&j), _) if j > i => format!(
                        "the event was chained after revision {}, which now comes after it: \
                         events were swapped or reordered",
                        chain[j].revision
                    ),
                    (_, Some((after, _))) => format!(
                        "the event does not follow revision {after}, the request's previous \
                         event: an event between them was deleted (or moved)"
                    ),
                    (_, None) => "the event is the first of its chain here, but it was chained \
                                  after an earlier event: the request's earlier events were \
                                  deleted"
                        .into(),
                };
                problem(event.revision, message);
            }
            previous = Some((event.revision, hash));
            hashed.push((event.revision, hash));
            first = false;
        }
        report.hashed.insert(id, hashed);
    }
    report
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn empty_and_single_trees_follow_the_rfc() {
        let empty: Hash = Sha256::digest([]).into();
        assert_eq!(merkle_root(&[]), empty);
        let leaf = leaf_hash(b"a");
        assert_eq!(merkle_root(&[leaf]), leaf);
        assert_eq!(
            hex(&empty),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn three_leaves_split_at_two() {
        let l: Vec<Hash> = [b"a", b"b", b"c"].iter().map(|x| leaf_hash(*x)).collect();
        let expected = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(merkle_root(&l), expected);
        assert_eq!(inclusion_path(&l, 2), Some(vec![node_hash(&l[0], &l[1])]));
        assert_eq!(inclusion_path(&l, 0), Some(vec![l[1], l[2]]));
        assert_eq!(inclusion_path(&l, 3), None);
    }

    #[test]
    fn the_hash_binds_the_previous_hash_and_the_revision() {
        let record = AuditRecord {
            change_request_id: "x",
            kind: "CREATED",
            ..Default::default()
        }
        .encode();
        let h = event_hash(&GENESIS, 1, &record);
        assert_ne!(h, event_hash(&GENESIS, 2, &record));
        assert_ne!(h, event_hash(&h, 1, &record));
        assert_eq!(h, event_hash(&GENESIS, 1, &record));
    }

    #[test]
    fn record_encoding_is_protobuf() {
        let record = AuditRecord {
            change_request_id: "ab",
            event_time_micros: 300,
            comment_count: Some(0),
            ..Default::default()
        };
        // field 1 (len 2) "ab"; field 9 varint 300 = ac 02; field 12 varint 0.
        assert_eq!(
            record.encode(),
            vec![0x0a, 2, b'a', b'b', 0x48, 0xac, 0x02, 0x60, 0]
        );
        // An unrecorded auth_method is left out, so legacy records keep their bytes; a
        // recorded one is field 13 (len 3) "JWT", after comment_count.
        let with_method = AuditRecord {
            auth_method: "JWT",
            ..record.clone()
        };
        assert_eq!(
            with_method.encode(),
            vec![
                0x0a, 2, b'a', b'b', 0x48, 0xac, 0x02, 0x60, 0, 0x6a, 3, b'J', b'W', b'T'
            ]
        );
    }

    #[test]
    fn hex_round_trips() {
        let h = leaf_hash(b"x");
        assert_eq!(hash_from_hex(&hex(&h)), Some(h));
        assert_eq!(hash_from_hex("zz"), None);
    }

    /// The hashing cost per event (encode the record, SHA-256 it), for a typical event with a
    /// 2 KiB snapshot. Run in release: `cargo test --release -p approvals-domain --lib
    /// hashing_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn hashing_cost_per_event() {
        let snapshot = "x".repeat(2048);
        let record = AuditRecord {
            change_request_id: "01a24e23-a38e-7304-9c33-63b9ef999136",
            project: "web",
            environment: "prod",
            kind: "REVIEWED",
            actor: "user:bob",
            acting_principal: "",
            from_state: "IN_REVIEW",
            to_state: "APPROVED",
            event_time_micros: 1_796_605_813_000_000,
            detail: "approved: looks good",
            snapshot: &snapshot,
            comment_count: Some(2),
            auth_method: "API_KEY",
        };
        let n = 200_000;
        let started = std::time::Instant::now();
        let mut prev = GENESIS;
        for i in 0..n {
            prev = event_hash(&prev, i, &record.encode());
        }
        let per = started.elapsed() / n as u32;
        println!(
            "hashing: {per:?} per event (2 KiB snapshot), last {}",
            hex(&prev[..4])
        );
    }

    fn chain(id: &str, revisions: &[i64]) -> Vec<StoredEvent> {
        let mut prev = GENESIS;
        revisions
            .iter()
            .map(|&revision| {
                let fields = EventFields {
                    change_request_id: id.into(),
                    kind: "COMMENTED".into(),
                    detail: format!("event {revision}"),
                    ..Default::default()
                };
                let hash = event_hash(&prev, revision, &fields.record().encode());
                let event = StoredEvent {
                    revision,
                    fields,
                    prev_hash: Some(prev),
                    hash: Some(hash),
                };
                prev = hash;
                event
            })
            .collect()
    }

    #[test]
    fn legacy_events_before_the_first_hashed_one_are_counted_not_broken() {
        let mut events = chain("a", &[3, 5, 8]);
        // Two events from before hashing existed, then the chain starts from GENESIS.
        for revision in [1, 2] {
            events.push(StoredEvent {
                revision,
                fields: EventFields {
                    change_request_id: "a".into(),
                    ..Default::default()
                },
                prev_hash: None,
                hash: None,
            });
        }
        let report = check_chains(events.clone(), false);
        assert_eq!(report.legacy_events, 2);
        assert!(report.breaks.is_empty(), "{:?}", report.breaks);
        assert_eq!(report.heads_at(6)[0].revision, 5);

        // A hash removed after the chain started is a break.
        let mut removed = events;
        let last = removed
            .iter_mut()
            .find(|e| e.revision == 8)
            .expect("revision 8");
        last.prev_hash = None;
        last.hash = None;
        let report = check_chains(removed, false);
        assert_eq!(report.breaks.len(), 1);
        assert!(report.breaks[0].message.contains("hashes were removed"));
    }

    #[test]
    fn an_open_chain_may_start_after_its_first_event() {
        let events: Vec<_> = chain("a", &[1, 2, 3]).into_iter().skip(1).collect();
        assert!(check_chains(events.clone(), true).breaks.is_empty());
        let closed = check_chains(events, false);
        assert_eq!(closed.breaks.len(), 1);
        assert!(
            closed.breaks[0]
                .message
                .contains("earlier events were deleted")
        );
    }

    proptest! {
        #[test]
        fn every_inclusion_path_verifies(n in 1usize..70, seed in any::<u64>()) {
            let leaves: Vec<Hash> = (0..n)
                .map(|i| leaf_hash(&(seed ^ i as u64).to_be_bytes()))
                .collect();
            let root = merkle_root(&leaves);
            for index in 0..n {
                let path = inclusion_path(&leaves, index).expect("in range");
                prop_assert!(verify_inclusion(&leaves[index], index as u64, n as u64, &path, &root));
                // Another leaf, index or size does not verify.
                let other = leaf_hash(b"other");
                prop_assert!(!verify_inclusion(&other, index as u64, n as u64, &path, &root));
                if n > 1 {
                    let wrong = (index + 1) % n;
                    prop_assert!(!verify_inclusion(&leaves[index], wrong as u64, n as u64, &path, &root));
                }
            }
        }

        #[test]
        fn encoding_is_injective_on_detail_and_actor(
            a in ".{0,20}", b in ".{0,20}", c in ".{0,20}", d in ".{0,20}"
        ) {
            let one = AuditRecord { actor: &a, detail: &b, ..Default::default() }.encode();
            let two = AuditRecord { actor: &c, detail: &d, ..Default::default() }.encode();
            prop_assert_eq!(one == two, a == c && b == d);
        }
    }
}
