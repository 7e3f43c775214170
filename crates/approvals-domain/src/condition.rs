//! Conditions: CEL expressions (the `cel` crate) over a change request, on a policy, a level or
//! a group requirement.
//!
//! Variables: `project`, `environment`, `action_key`, `requester` (`user:alice`),
//! `requester_groups` (bare names), and `changes`, a list of maps with `action`,
//! `resource_type`, `resource_id` and `payload` (the change's JSON object). E.g.
//! `changes.exists(c, c.payload.rollout > 50)`.
//!
//! Compiled and checked when a policy is written: syntax (with the line and column), the
//! variables it reads (only the ones above, and those its macros bind) and the functions it
//! calls (CEL's standard ones). The crate has no cost limit, so an expression is bounded
//! instead: at most [`MAX_CONDITION_BYTES`] of source, syntax nested at most
//! [`MAX_CONDITION_DEPTH`] deep, at most [`MAX_COMPREHENSIONS`] macros (`exists`, `all`,
//! `exists_one`, `map`, `filter`), none inside another. Its work is then linear in the request's
//! size (at most 100 changes of 256 KiB) times the expression's. An evaluation that fails (a
//! missing payload key, a type mismatch) counts as a match: a condition adds requirements, so
//! failing closed asks for more approvals, never fewer.

use std::collections::HashMap;

use cel::{
    Context, Value,
    common::ast::{EntryExpr, Expr, IdedExpr},
    parser::PrattParser,
};
use serde_json::Value as Json;

use crate::Principal;

/// Longest condition, in bytes.
pub const MAX_CONDITION_BYTES: usize = 2048;
/// Deepest nesting of a condition's syntax tree.
pub const MAX_CONDITION_DEPTH: usize = 32;
/// Most comprehension macros in one condition.
pub const MAX_COMPREHENSIONS: usize = 4;

/// The variables a condition may read.
pub const VARIABLES: [&str; 6] = [
    "project",
    "environment",
    "action_key",
    "requester",
    "requester_groups",
    "changes",
];

/// The named functions a condition may call (operators are always allowed).
const FUNCTIONS: [&str; 18] = [
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "type",
    "dyn",
    "max",
    "min",
    "has",
    "duration",
    "timestamp",
];

/// What a condition is evaluated over.
#[derive(Debug, Clone)]
pub struct RequestFacts<'a> {
    pub project: &'a str,
    pub environment: &'a str,
    pub action_key: &'a str,
    pub requester: &'a Principal,
    pub requester_groups: &'a [String],
    pub changes: Vec<ChangeFacts<'a>>,
}

/// One change, as a condition sees it.
#[derive(Debug, Clone, Copy)]
pub struct ChangeFacts<'a> {
    pub action: &'a str,
    pub resource_type: &'a str,
    pub resource_id: &'a str,
    pub payload: &'a serde_json::Map<String, Json>,
}

/// Compiles and checks `source`; the error says what is wrong, and where (`line:column`).
pub fn check(source: &str) -> Result<(), String> {
    compile(source).map(|_| ())
}

/// Syntax nodes a condition may have.
const MAX_CONDITION_NODES: usize = 1000;

fn compile(source: &str) -> Result<IdedExpr, String> {
    if source.len() > MAX_CONDITION_BYTES {
        return Err(format!(
            "is {} bytes; a condition may have at most {MAX_CONDITION_BYTES}",
            source.len()
        ));
    }
    if source.contains('\0') {
        return Err("must not contain U+0000 (NUL)".into());
    }
    // The crate's Pratt parser: its recursion is bounded (the ANTLR one it also has overflows
    // a 2 MiB stack at a dozen nested parentheses in a debug build).
    let parser = PrattParser::new()
        .max_recursion_depth(u16::try_from(MAX_CONDITION_DEPTH).unwrap_or(u16::MAX))
        .max_expression_node_count(MAX_CONDITION_NODES);
    let expression = parser
        .parse(source)
        .map_err(|errors| match errors.errors.first() {
            Some(e) => format!("does not compile: at {}:{}: {}", e.pos.0, e.pos.1, e.msg),
            None => format!("does not compile: {errors}"),
        })?;
    let mut walk = Walk {
        bound: Vec::new(),
        comprehensions: 0,
    };
    walk.visit(&expression, 1, false)?;
    Ok(expression)
}

struct Walk {
    bound: Vec<String>,
    comprehensions: usize,
}

impl Walk {
    fn visit(&mut self, e: &IdedExpr, depth: usize, in_comprehension: bool) -> Result<(), String> {
        if depth > MAX_CONDITION_DEPTH {
            return Err(format!("is nested more than {MAX_CONDITION_DEPTH} deep"));
        }
        let next = depth + 1;
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) => Ok(()),
            Expr::Ident(name) => {
                if VARIABLES.contains(&name.as_str()) || self.bound.iter().any(|b| b == name) {
                    Ok(())
                } else {
                    Err(format!(
                        "unknown variable {name:?}; a condition reads {}",
                        VARIABLES.join(", ")
                    ))
                }
            }
            Expr::Call(call) => {
                let name = call.func_name.as_str();
                let operator = name.starts_with(['_', '!', '-', '@']);
                if !operator && !FUNCTIONS.contains(&name) {
                    return Err(format!(
                        "unknown function {name:?}; a condition may call {}",
                        FUNCTIONS.join(", ")
                    ));
                }
                if let Some(target) = &call.target {
                    self.visit(target, next, in_comprehension)?;
                }
                for arg in &call.args {
                    self.visit(arg, next, in_comprehension)?;
                }
                Ok(())
            }
            Expr::Comprehension(c) => {
                if in_comprehension {
                    return Err(
                        "a macro (exists, all, exists_one, map, filter) inside another is not allowed: its cost would multiply"
                            .to_owned(),
                    );
                }
                self.comprehensions += 1;
                if self.comprehensions > MAX_COMPREHENSIONS {
                    return Err(format!(
                        "at most {MAX_COMPREHENSIONS} macros (exists, all, exists_one, map, filter) per condition",
                    ));
                }
                self.visit(&c.iter_range, next, false)?;
                self.visit(&c.accu_init, next, false)?;
                let before = self.bound.len();
                self.bound.push(c.iter_var.clone());
                if let Some(second) = &c.iter_var2 {
                    self.bound.push(second.clone());
                }
                self.bound.push(c.accu_var.clone());
                for part in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.visit(part, next, true)?;
                }
                self.bound.truncate(before);
                Ok(())
            }
            Expr::List(list) => {
                for element in &list.elements {
                    self.visit(element, next, in_comprehension)?;
                }
                Ok(())
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        self.visit(&entry.key, next, in_comprehension)?;
                        self.visit(&entry.value, next, in_comprehension)?;
                    }
                }
                Ok(())
            }
            Expr::Select(select) => self.visit(&select.operand, next, in_comprehension),
            Expr::Struct(_) => Err("message literals are not supported".to_owned()),
        }
    }
}

/// How a condition came out on a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Matched,
    NotMatched,
    /// The evaluation failed (counted as a match, see the module documentation).
    Failed(String),
}

impl Outcome {
    /// Whether what the condition guards applies (fail closed).
    pub fn applies(&self) -> bool {
        !matches!(self, Self::NotMatched)
    }
}

/// Evaluates `source` over the request. Never panics: a condition that does not compile (only
/// a hand-edited database holds one), or a result that is not a bool, is [`Outcome::Failed`].
pub fn evaluate(source: &str, facts: &RequestFacts<'_>) -> Outcome {
    evaluate_prepared(source, &Prepared::new(facts))
}

/// The variables of a request, converted to CEL values once for several conditions.
pub struct Prepared(Vec<(&'static str, Value)>);

impl Prepared {
    pub fn new(facts: &RequestFacts<'_>) -> Self {
        let changes: Vec<Value> = facts.changes.iter().map(change_value).collect();
        Self(vec![
            ("project", facts.project.into()),
            ("environment", facts.environment.into()),
            ("action_key", facts.action_key.into()),
            ("requester", facts.requester.as_str().into()),
            (
                "requester_groups",
                Value::from(facts.requester_groups.to_vec()),
            ),
            ("changes", Value::from(changes)),
        ])
    }
}

/// Longest evaluation error kept (they are stored in the request's snapshot).
const MAX_ERROR_CHARS: usize = 200;

/// [`evaluate`] over variables converted already.
pub fn evaluate_prepared(source: &str, prepared: &Prepared) -> Outcome {
    let expression = match compile(source) {
        Ok(expression) => expression,
        Err(err) => return Outcome::Failed(err),
    };
    let mut context = Context::default();
    for (name, value) in &prepared.0 {
        // Lists and maps are reference-counted: no copy of the payloads.
        context.add_variable_from_value(*name, value.clone());
    }
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Value::resolve(&expression, &context)
    }));
    match run {
        Ok(Ok(Value::Bool(true))) => Outcome::Matched,
        Ok(Ok(Value::Bool(false))) => Outcome::NotMatched,
        Ok(Ok(_)) => Outcome::Failed("did not evaluate to a bool".into()),
        Ok(Err(err)) => Outcome::Failed(err.to_string().chars().take(MAX_ERROR_CHARS).collect()),
        Err(_) => Outcome::Failed("the evaluation failed".into()),
    }
}

fn change_value(change: &ChangeFacts<'_>) -> Value {
    let mut map: HashMap<String, Value> = HashMap::new();
    map.insert("action".into(), change.action.into());
    map.insert("resource_type".into(), change.resource_type.into());
    map.insert("resource_id".into(), change.resource_id.into());
    let payload: HashMap<String, Value> = change
        .payload
        .iter()
        .map(|(k, v)| (k.clone(), json_value(v)))
        .collect();
    map.insert("payload".into(), Value::Map(payload.into()));
    Value::Map(map.into())
}

fn json_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => s.as_str().into(),
        Json::Array(list) => Value::from(list.iter().map(json_value).collect::<Vec<_>>()),
        Json::Object(object) => {
            let map: HashMap<String, Value> = object
                .iter()
                .map(|(k, v)| (k.clone(), json_value(v)))
                .collect();
            Value::Map(map.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(payload: serde_json::Value) -> serde_json::Map<String, Json> {
        payload.as_object().cloned().unwrap_or_default()
    }

    fn eval(source: &str, payloads: &[serde_json::Map<String, Json>]) -> Outcome {
        let changes = payloads
            .iter()
            .map(|payload| ChangeFacts {
                action: "update",
                resource_type: "feature_flag",
                resource_id: "checkout",
                payload,
            })
            .collect();
        let requester = Principal::parse("user:alice").expect("principal");
        let groups = vec!["dev".to_owned()];
        evaluate(
            source,
            &RequestFacts {
                project: "web",
                environment: "prod",
                action_key: "feature_flag.update",
                requester: &requester,
                requester_groups: &groups,
                changes,
            },
        )
    }

    #[test]
    fn conditions_see_the_request() {
        let big = [change(serde_json::json!({"rollout": 80}))];
        let small = [change(serde_json::json!({"rollout": 10}))];
        let rollout = "changes.exists(c, c.payload.rollout > 50)";
        assert_eq!(eval(rollout, &big), Outcome::Matched);
        assert_eq!(eval(rollout, &small), Outcome::NotMatched);
        assert_eq!(
            eval(
                "environment == 'prod' && 'dev' in requester_groups && requester.startsWith('user:')",
                &small
            ),
            Outcome::Matched
        );
        // A missing key fails, which counts as a match.
        let none = [change(serde_json::json!({}))];
        assert!(matches!(eval(rollout, &none), Outcome::Failed(_)));
        assert!(eval(rollout, &none).applies());
        assert!(matches!(eval("1 + 1", &none), Outcome::Failed(_)));
    }

    #[test]
    fn checks_name_what_is_wrong_and_where() {
        let err = check("changes.exists(c, c.payload.rollout >)").expect_err("syntax");
        assert!(err.contains("at 1:"), "{err}");
        let err = check("project == 'web' && nope").expect_err("variable");
        assert!(err.contains("unknown variable \"nope\""), "{err}");
        let err = check("launch(project)").expect_err("function");
        assert!(err.contains("unknown function \"launch\""), "{err}");
        let err = check("changes.exists(c, changes.exists(d, c == d))").expect_err("nested");
        assert!(err.contains("inside another"), "{err}");
        let err = check(&"x".repeat(MAX_CONDITION_BYTES + 1)).expect_err("long");
        assert!(err.contains("at most"), "{err}");
        // Deep syntax is refused, never a stack overflow (on the 2 MiB of a test thread).
        for n in [40, 400] {
            assert!(check(&format!("{}1{}", "[".repeat(n), "]".repeat(n))).is_err());
            assert!(check(&format!("1{}", " + 1".repeat(n))).is_err());
        }
        check("changes.all(c, c.resource_type == 'feature_flag') && size(changes) < 3")
            .expect("valid");
    }
}
