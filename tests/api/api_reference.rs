//! `docs/api.md`, the API reference, is rendered from the comments of `proto/approvals/v1` (the
//! descriptor set the server serves by reflection, so it says what `grpcurl describe` says).
//! The test fails when the checked-in file is stale; regenerate it with
//! `APPROVALS_UPDATE_API_REFERENCE=1 cargo test --test api api_reference`.
//!
//! What the protos' comments follow for it: they are Markdown; an RPC's line `Scope: ...` names
//! the scope it needs; a service lists its error reasons as items
//! ``- `REASON` (CODE; metadata): meaning``, gathered here into one table.

use std::{collections::HashMap, path::Path};

use approvals::pb::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    ServiceDescriptorProto,
    field_descriptor_proto::{Label, Type},
};

const PACKAGE: &str = "approvals.v1";
/// The package's files in the order the reference presents them: the resource and its service
/// first.
const FILES: &[&str] = &[
    "approvals/v1/resources.proto",
    "approvals/v1/change_requests.proto",
    "approvals/v1/policies.proto",
    "approvals/v1/calendars.proto",
    "approvals/v1/audit.proto",
    "approvals/v1/attestation.proto",
    "approvals/v1/applier.proto",
    "approvals/v1/relay.proto",
];
const OUTPUT: &str = "docs/api.md";
const UPDATE_ENV: &str = "APPROVALS_UPDATE_API_REFERENCE";
const REGENERATE: &str = "APPROVALS_UPDATE_API_REFERENCE=1 cargo test --test api api_reference";

// Field numbers in descriptor.proto, which SourceCodeInfo paths are made of.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

#[test]
fn api_reference_is_current() {
    let rendered = render();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(OUTPUT);
    if std::env::var_os(UPDATE_ENV).is_some() {
        std::fs::create_dir_all(path.parent().expect("docs/")).expect("create docs/");
        std::fs::write(&path, &rendered).expect("write docs/api.md");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != rendered {
        let line = current
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(current.lines().count().min(rendered.lines().count()));
        panic!(
            "{OUTPUT} is stale (first difference at line {}): regenerate it with `{REGENERATE}` \
             and commit it",
            line + 1
        );
    }
}

/// The comments of one file, by SourceCodeInfo path.
struct Comments(HashMap<Vec<i32>, (Vec<String>, String)>);

impl Comments {
    fn of_file(file: &FileDescriptorProto) -> Self {
        let locations = file.source_code_info.iter().flat_map(|info| &info.location);
        Self(
            locations
                .map(|l| {
                    let detached = l.leading_detached_comments.iter().map(|c| clean(c));
                    let text = [l.leading_comments(), l.trailing_comments()]
                        .map(clean)
                        .join("\n\n");
                    (l.path.clone(), (detached.collect(), text.trim().to_owned()))
                })
                .collect(),
        )
    }

    fn text(&self, path: &[i32]) -> &str {
        self.0.get(path).map_or("", |(_, text)| text)
    }

    fn detached(&self, path: &[i32]) -> &[String] {
        self.0.get(path).map_or(&[], |(detached, _)| detached)
    }
}

/// A comment without the space after each `//`.
fn clean(comment: &str) -> String {
    let lines: Vec<&str> = comment
        .lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
        .collect();
    lines.join("\n").trim_matches('\n').to_owned()
}

/// A comment as one Markdown table cell.
fn cell(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| paragraph.replace('\n', " "))
        .collect::<Vec<_>>()
        .join("<br><br>")
        .replace('|', "\\|")
}

/// A type's name as written in this reference: a link for the package's own types.
fn type_link(type_name: &str) -> String {
    let name = type_name.trim_start_matches('.');
    match name.strip_prefix(&format!("{PACKAGE}.")) {
        Some(own) => format!("[{own}](#{})", own.to_lowercase()),
        None => format!("`{name}`"),
    }
}

/// An error reason item of a service comment: (reason, code, metadata, meaning).
struct Reason {
    reason: String,
    code: String,
    metadata: String,
    meaning: String,
}

/// Splits a service comment into its text and its error reason items (each item with its
/// continuation lines); the items' place is taken by a line naming them.
fn split_reasons(comment: &str) -> (String, Vec<Reason>) {
    let mut text = Vec::new();
    let mut items: Vec<String> = Vec::new();
    let mut list_at = None;
    let mut in_item = false;
    for line in comment.lines() {
        let is_item = line
            .strip_prefix("- `")
            .and_then(|rest| rest.split_once('`'))
            .is_some_and(|(name, _)| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        if is_item {
            list_at.get_or_insert(text.len());
            items.push(line["- ".len()..].to_owned());
            in_item = true;
        } else if in_item && line.starts_with("  ") {
            let item = items.last_mut().expect("an item");
            item.push(' ');
            item.push_str(line.trim());
        } else {
            in_item = false;
            text.push(line.to_owned());
        }
    }
    let reasons: Vec<Reason> = items.iter().map(|item| parse_reason(item)).collect();
    if let Some(at) = list_at {
        let names: Vec<String> = reasons.iter().map(|r| format!("`{}`", r.reason)).collect();
        let line = format!(
            "{} (see [Error reasons](#error-reasons)).",
            names.join(", ")
        );
        text.insert(at, line);
    }
    (text.join("\n"), reasons)
}

fn parse_reason(item: &str) -> Reason {
    let parsed = (|| {
        let (reason, rest) = item.strip_prefix('`')?.split_once("` (")?;
        let (status, meaning) = rest.split_once("): ")?;
        let (code, metadata) = status.split_once("; ").unwrap_or((status, ""));
        Some(Reason {
            reason: reason.to_owned(),
            code: code.to_owned(),
            metadata: metadata.to_owned(),
            meaning: meaning.to_owned(),
        })
    })();
    parsed.unwrap_or_else(|| {
        panic!("an error reason item is \"`REASON` (CODE; metadata): meaning\", not {item:?}")
    })
}

/// The `Scope: ...` line of an RPC comment.
fn scope(comment: &str) -> String {
    comment
        .lines()
        .find_map(|l| l.strip_prefix("Scope: "))
        .map_or_else(|| "-".to_owned(), |s| s.trim_end_matches('.').to_owned())
}

fn render() -> String {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("the descriptor set");
    let mut files: Vec<&FileDescriptorProto> =
        set.file.iter().filter(|f| f.package() == PACKAGE).collect();
    for file in &files {
        assert!(
            FILES.contains(&file.name()),
            "{}: add it to FILES in tests/api/api_reference.rs",
            file.name()
        );
    }
    files.sort_by_key(|f| FILES.iter().position(|name| *name == f.name()));
    let services: Vec<String> = files
        .iter()
        .flat_map(|f| &f.service)
        .map(|s| format!("[{0}](#{1})", s.name(), s.name().to_lowercase()))
        .collect();

    let mut doc = Reference::default();
    doc.out.push_str(&format!(
        "# API reference: `{PACKAGE}`\n\n\
         <!-- Generated from the comments in proto/approvals/v1 by tests/api/api_reference.rs; \
         do not edit. Regenerate: {REGENERATE} -->\n\n\
         Every service, method, message, field, enum value and error reason of the API, from the \
         comments in [proto/approvals/v1](../proto/approvals/v1). Regenerate it after a proto \
         change with `{REGENERATE}`.\n\n\
         - Services: {}\n- [Messages](#messages)\n- [Enums](#enums)\n- [Error reasons](#error-reasons)\n\n",
        services.join(", ")
    ));
    doc.out.push_str("## Services\n\n");
    for file in &files {
        let comments = Comments::of_file(file);
        for (i, service) in file.service.iter().enumerate() {
            doc.service(file, service, &comments, &[FILE_SERVICE, i as i32]);
        }
    }
    doc.out.push_str("## Messages\n\n");
    for file in &files {
        let comments = Comments::of_file(file);
        for (i, message) in file.message_type.iter().enumerate() {
            doc.message(message, &comments, &[FILE_MESSAGE, i as i32]);
        }
    }
    doc.out.push_str("## Enums\n\n");
    for file in &files {
        let comments = Comments::of_file(file);
        for (i, enumeration) in file.enum_type.iter().enumerate() {
            doc.enumeration(enumeration, &comments, &[FILE_ENUM, i as i32]);
        }
    }
    doc.reasons();
    doc.out
}

/// The reference being written, the anchors its headings made, and the error reasons its
/// services listed.
#[derive(Default)]
struct Reference {
    out: String,
    anchors: Vec<String>,
    reasons: Vec<Reason>,
}

impl Reference {
    fn heading(&mut self, level: &str, name: &str) {
        let anchor = name.to_lowercase();
        assert!(
            !self.anchors.contains(&anchor),
            "{name}: two headings of one name would share an anchor"
        );
        self.anchors.push(anchor);
        self.out.push_str(&format!("{level} {name}\n\n"));
    }

    /// The service's text, a table of its methods, then a section per method.
    fn service(
        &mut self,
        file: &FileDescriptorProto,
        service: &ServiceDescriptorProto,
        comments: &Comments,
        path: &[i32],
    ) {
        self.heading("###", service.name());
        let (text, reasons) = split_reasons(comments.text(path));
        self.reasons.extend(reasons);
        self.out.push_str(&format!(
            "`{PACKAGE}.{}` ({})\n\n{text}\n\n\
             | method | request | response | scope |\n| --- | --- | --- | --- |\n",
            service.name(),
            file.name()
        ));
        let mut sections = Vec::new();
        for (i, method) in service.method.iter().enumerate() {
            let comment = comments.text(&child(path, SERVICE_METHOD, i));
            let (request, response) = (
                type_link(method.input_type()),
                type_link(method.output_type()),
            );
            let stream = if method.server_streaming() {
                "a stream of "
            } else {
                ""
            };
            self.out.push_str(&format!(
                "| [{0}](#{1}) | {request} | {stream}{response} | {2} |\n",
                method.name(),
                method.name().to_lowercase(),
                scope(comment),
            ));
            sections.push((
                method.name(),
                format!("Request {request}, response {stream}{response}.\n\n{comment}\n\n"),
            ));
        }
        self.out.push('\n');
        for (name, section) in sections {
            self.heading("####", name);
            self.out.push_str(&section);
        }
    }

    fn message(&mut self, message: &DescriptorProto, comments: &Comments, path: &[i32]) {
        assert!(
            message.nested_type.is_empty() && message.enum_type.is_empty(),
            "{}: nested types are not rendered yet; teach tests/api/api_reference.rs",
            message.name()
        );
        self.heading("###", message.name());
        self.text(comments.text(path));
        const HEADER: &str = "| field | number | type | description |\n| --- | --- | --- | --- |\n";
        self.out.push_str(HEADER);
        for (i, field) in message.field.iter().enumerate() {
            assert!(
                field.oneof_index.is_none() || field.proto3_optional(),
                "{}.{}: oneofs are not rendered yet; teach tests/api/api_reference.rs",
                message.name(),
                field.name()
            );
            let field_path = child(path, MESSAGE_FIELD, i);
            // A comment standing alone before a field introduces the fields after it.
            for detached in comments.detached(&field_path) {
                self.out.push_str(&format!("\n{detached}\n\n{HEADER}"));
            }
            let base = match field.r#type() {
                Type::Message | Type::Enum => type_link(field.type_name()),
                scalar => {
                    let name = scalar.as_str_name().trim_start_matches("TYPE_");
                    format!("`{}`", name.to_lowercase())
                }
            };
            let label = if field.label() == Label::Repeated {
                "repeated "
            } else if field.proto3_optional() {
                "optional "
            } else {
                ""
            };
            self.out.push_str(&format!(
                "| `{}` | {} | {label}{base} | {} |\n",
                field.name(),
                field.number(),
                cell(comments.text(&field_path))
            ));
        }
        self.out.push('\n');
    }

    fn enumeration(
        &mut self,
        enumeration: &EnumDescriptorProto,
        comments: &Comments,
        path: &[i32],
    ) {
        self.heading("###", enumeration.name());
        self.text(comments.text(path));
        self.out
            .push_str("| value | number | description |\n| --- | --- | --- |\n");
        for (i, value) in enumeration.value.iter().enumerate() {
            self.out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                value.name(),
                value.number(),
                cell(comments.text(&child(path, ENUM_VALUE, i)))
            ));
        }
        self.out.push('\n');
    }

    /// Every reason the services list, once, in alphabetical order.
    fn reasons(&mut self) {
        self.out.push_str(
            "## Error reasons\n\n\
             Every error carries `google.rpc.ErrorInfo` with domain `approvals`, one of these \
             reasons and the metadata keys listed (AIP-193); bad input also carries \
             `google.rpc.BadRequest`.\n\n\
             | reason | code | metadata | meaning |\n| --- | --- | --- | --- |\n",
        );
        self.reasons.sort_by(|a, b| a.reason.cmp(&b.reason));
        self.reasons
            .dedup_by(|later, first| later.reason == first.reason);
        for r in &self.reasons {
            self.out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                r.reason,
                r.code,
                cell(&r.metadata),
                cell(&r.meaning)
            ));
        }
    }

    fn text(&mut self, text: &str) {
        if !text.is_empty() {
            self.out.push_str(&format!("{text}\n\n"));
        }
    }
}

/// The SourceCodeInfo path of the `index`th element of `parent`'s list `field`.
fn child(parent: &[i32], field: i32, index: usize) -> Vec<i32> {
    let index = i32::try_from(index).expect("fewer than 2^31 elements");
    parent.iter().copied().chain([field, index]).collect()
}
