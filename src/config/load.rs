//! The layered loader: TOML file < `CBGATE_...` environment < flags, merged into one tree and
//! deserialized by our own serde `Deserializer`, so that every error is our sentence.
//!
//! Why not the `config` crate (used before): its errors quote the offending source line (a key
//! file passed as `--config` printed the private key), quote bad string values, report an
//! environment typo as a file key, and name Rust enum types. Here every node remembers where
//! it came from (file, variable or flag), errors name that origin and the key, suggest the
//! closest known key, and never show a string value that could be a secret.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, IntoDeserializer as _};

use super::shown;

/// Where a value came from.
#[derive(Clone, Debug)]
pub(crate) enum Origin {
    /// The configuration file.
    File(PathBuf),
    /// A TOML document given as text (`Config::from_toml_str`).
    Text,
    /// An environment variable, by name.
    Env(String),
    /// A command-line flag.
    Flag(&'static str),
}

#[derive(Clone, Debug)]
enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Node>),
    Table(BTreeMap<String, Node>),
}

/// One value of the merged tree and where it came from.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    val: Val,
    origin: Origin,
}

impl Node {
    pub(crate) fn table(origin: Origin) -> Node {
        Node {
            val: Val::Table(BTreeMap::new()),
            origin,
        }
    }

    /// Converts a parsed TOML document.
    pub(crate) fn from_toml(v: toml::Value, origin: &Origin) -> Node {
        let val = match v {
            toml::Value::String(s) => Val::Str(s),
            toml::Value::Integer(i) => Val::Int(i),
            toml::Value::Float(f) => Val::Float(f),
            toml::Value::Boolean(b) => Val::Bool(b),
            toml::Value::Datetime(d) => Val::Str(d.to_string()),
            toml::Value::Array(a) => {
                Val::Array(a.into_iter().map(|v| Node::from_toml(v, origin)).collect())
            }
            toml::Value::Table(t) => Val::Table(
                t.into_iter()
                    .map(|(k, v)| (k, Node::from_toml(v, origin)))
                    .collect(),
            ),
        };
        Node {
            val,
            origin: origin.clone(),
        }
    }

    /// Sets `path` (creating tables on the way, replacing what is there) to `value`.
    pub(crate) fn set(&mut self, path: &[String], value: Node) {
        let Some((first, rest)) = path.split_first() else {
            *self = value;
            return;
        };
        if !matches!(self.val, Val::Table(_)) {
            *self = Node::table(value.origin.clone());
        }
        if let Val::Table(t) = &mut self.val {
            let child = t
                .entry(first.clone())
                .or_insert_with(|| Node::table(value.origin.clone()));
            child.set(rest, value);
        }
    }

    /// A string leaf.
    pub(crate) fn text(s: String, origin: Origin) -> Node {
        Node {
            val: Val::Str(s),
            origin,
        }
    }

    /// A list of string leaves.
    pub(crate) fn list(items: &[String], origin: Origin) -> Node {
        Node {
            val: Val::Array(
                items
                    .iter()
                    .map(|s| Node::text(s.clone(), origin.clone()))
                    .collect(),
            ),
            origin,
        }
    }

    /// The first string value that looks like key material, with its key: no configuration
    /// value is ever a secret, so such a value is a paste mistake and is refused unseen.
    pub(crate) fn find_key_material(&self, path: &str) -> Option<(String, Origin)> {
        match &self.val {
            Val::Str(s) if super::looks_like_key_material(s) => {
                Some((path.to_owned(), self.origin.clone()))
            }
            Val::Array(a) => a
                .iter()
                .enumerate()
                .find_map(|(i, n)| n.find_key_material(&format!("{path}[{i}]"))),
            Val::Table(t) => t
                .iter()
                .find_map(|(k, n)| n.find_key_material(&join(path, k))),
            _ => None,
        }
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The environment variables that are configuration keys, as a tree: `CBGATE_A__B=v` sets
/// `a.b`; values stay text until a key asks for a number, a boolean or a list.
pub(crate) fn env_tree(
    env: &HashMap<String, String>,
    not_keys: &[&str],
    root: &mut Node,
) -> Result<(), String> {
    let mut names: Vec<&String> = env
        .keys()
        .filter(|k| k.starts_with("CBGATE_") && !not_keys.contains(&k.as_str()))
        .collect();
    names.sort();
    for name in names {
        let path: Vec<String> = name["CBGATE_".len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(format!(
                "environment variable {name} is not a cbgate setting: levels are separated by exactly two underscores, e.g. CBGATE_UPSTREAM__CA_FILE"
            ));
        }
        let value = env.get(name).cloned().unwrap_or_default();
        root.set(&path, Node::text(value, Origin::Env(name.clone())));
    }
    Ok(())
}

/// What was wrong with a value.
#[derive(Debug)]
enum Problem {
    UnknownKey {
        key: String,
        expected: &'static [&'static str],
    },
    BadChoice(&'static [&'static str]),
    Type {
        got: &'static str,
        want: String,
    },
    Value(String),
    Msg(String),
}

/// A deserialization error: the problem, and (once known) the key and where its value came from.
#[derive(Debug)]
pub(crate) struct DeError {
    path: Option<String>,
    origin: Option<Origin>,
    problem: Problem,
}

impl DeError {
    fn new(problem: Problem) -> DeError {
        DeError {
            path: None,
            origin: None,
            problem,
        }
    }

    fn at(mut self, path: &str, origin: &Origin) -> DeError {
        if self.path.is_none() {
            self.path = Some(path.to_owned());
            self.origin = Some(origin.clone());
        }
        self
    }
}

impl std::error::Error for DeError {}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.as_deref().unwrap_or("");
        let origin = self.origin.as_ref().unwrap_or(&Origin::Text);
        f.write_str(&describe(origin, path, &self.problem))
    }
}

/// `where the value came from` + `what is wrong`, as one sentence.
pub(crate) fn at_origin(origin: &Origin, path: &str, problem: &str) -> String {
    match origin {
        Origin::Env(var) => format!("environment variable {var}: {problem}"),
        Origin::Flag(flag) => format!("{flag}: {problem}"),
        Origin::File(file) if path.is_empty() => {
            format!("configuration file {}: {problem}", shown_path(file))
        }
        Origin::File(file) => {
            format!(
                "configuration file {}, key {path}: {problem}",
                shown_path(file)
            )
        }
        Origin::Text if path.is_empty() => format!("configuration: {problem}"),
        Origin::Text => format!("configuration key {path}: {problem}"),
    }
}

pub(crate) fn shown_path(p: &Path) -> String {
    shown(&p.to_string_lossy())
}

fn describe(origin: &Origin, path: &str, problem: &Problem) -> String {
    match problem {
        Problem::UnknownKey { key, expected } => unknown_key(origin, path, key, expected),
        Problem::BadChoice(expected) => at_origin(
            origin,
            path,
            &format!("expected one of {}", expected.join(", ")),
        ),
        Problem::Type { got, want } => {
            at_origin(origin, path, &format!("expected {want}, found {got}"))
        }
        Problem::Value(want) => at_origin(origin, path, &format!("the value is not {want}")),
        Problem::Msg(m) => at_origin(origin, path, m),
    }
}

/// "unknown key", with the closest known key at that level (or the `_` that should be `__`).
fn unknown_key(
    origin: &Origin,
    parent: &str,
    key: &str,
    expected: &'static [&'static str],
) -> String {
    // A known key followed by `_rest`: one underscore where a level separator belongs.
    let split = key
        .match_indices('_')
        .map(|(i, _)| (&key[..i], &key[i + 1..]))
        .find(|(head, tail)| !tail.is_empty() && expected.contains(head));
    let close = closest(key, expected);
    if let Origin::Env(var) = origin {
        let depth = if parent.is_empty() {
            0
        } else {
            parent.split('.').count()
        };
        let segments: Vec<&str> = var["CBGATE_".len()..].split("__").collect();
        let fixed = |replacement: String| {
            let mut s: Vec<String> = segments.iter().map(|s| (*s).to_owned()).collect();
            if depth < s.len() {
                s[depth] = replacement;
            }
            format!("CBGATE_{}", s.join("__"))
        };
        let hint = match (split, close) {
            (Some((head, tail)), _) => format!(
                "; did you mean {}? (levels are separated by two underscores)",
                fixed(format!("{}__{}", head, tail).to_ascii_uppercase())
            ),
            (None, Some(c)) => format!("; did you mean {}?", fixed(c.to_ascii_uppercase())),
            (None, None) => String::new(),
        };
        return format!("environment variable {var} is not a cbgate setting{hint}");
    }
    let full = join(parent, &shown_key(key));
    let hint = match (split, close) {
        (_, Some(c)) => format!("; did you mean {}?", join(parent, c)),
        (Some((head, tail)), None) => format!(
            "; did you mean {tail} in the [{}] table?",
            join(parent, head)
        ),
        (None, None) => format!("; known keys here: {}", expected.join(", ")),
    };
    let problem = format!("unknown key {full}{hint}");
    at_origin(origin, "", &problem)
}

fn shown_key(key: &str) -> String {
    if super::looks_like_key_material(key) || key.chars().count() > 64 {
        "(a name that looks like key material, not shown)".to_owned()
    } else {
        key.to_owned()
    }
}

/// The known key nearest to `key` by edit distance, when near enough to be a typo.
fn closest(key: &str, expected: &[&'static str]) -> Option<&'static str> {
    let limit = (key.chars().count() / 3).max(2);
    expected
        .iter()
        .map(|e| (edit_distance(key, e), *e))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Words serde's description of a type for a person (no Rust type names).
fn want(exp: &dyn de::Expected) -> String {
    let s = exp.to_string();
    match s.as_str() {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => {
            "a whole number".into()
        }
        "a sequence" => "a list".into(),
        "a map" => "a table".into(),
        "a duration" => "a duration such as 5s or 250ms".into(),
        "socket address" => "an IP:PORT address".into(),
        "a boolean" => "true or false".into(),
        _ if s.starts_with("struct ") => "a table".into(),
        _ => s,
    }
}

fn got(u: &de::Unexpected<'_>) -> &'static str {
    match u {
        de::Unexpected::Str(_) => "text",
        de::Unexpected::Bool(_) => "true or false",
        de::Unexpected::Signed(_) | de::Unexpected::Unsigned(_) => "a whole number",
        de::Unexpected::Float(_) => "a number with a fraction",
        de::Unexpected::Seq => "a list",
        de::Unexpected::Map => "a table",
        _ => "another kind of value",
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::new(Problem::Msg(msg.to_string()))
    }
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(Problem::Type {
            got: got(&unexp),
            want: want(exp),
        })
    }
    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        match unexp {
            // Numbers are never secret and help; text is not shown.
            de::Unexpected::Signed(n) if n < 0 => DeError::new(Problem::Msg(format!(
                "{n} is negative; expected {}, 0 or more",
                want(exp)
            ))),
            de::Unexpected::Signed(n) => DeError::new(Problem::Msg(format!(
                "{n} is out of range for {}",
                want(exp)
            ))),
            de::Unexpected::Unsigned(n) => DeError::new(Problem::Msg(format!(
                "{n} is out of range for {}",
                want(exp)
            ))),
            _ => DeError::new(Problem::Value(want(exp))),
        }
    }
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        DeError::new(Problem::Msg(format!(
            "{len} entries, expected {}",
            want(exp)
        )))
    }
    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(Problem::BadChoice(expected))
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(Problem::UnknownKey {
            key: field.to_owned(),
            expected,
        })
    }
    fn missing_field(field: &'static str) -> Self {
        DeError::new(Problem::Msg(format!("missing key {field}")))
    }
    fn duplicate_field(field: &'static str) -> Self {
        DeError::new(Problem::Msg(format!("key {field} is given twice")))
    }
}

/// Deserializes one node; `path` is its key (`a.b`, `a[0]`), for errors.
pub(crate) struct De {
    pub(crate) node: Node,
    pub(crate) path: String,
}

impl De {
    fn is_text(&self) -> bool {
        matches!(self.node.origin, Origin::Env(_) | Origin::Flag(_))
    }

    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, DeError> {
        match &self.node.val {
            Val::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| DeError::new(Problem::Value(what.to_owned()))),
            _ => Err(DeError::new(Problem::Value(what.to_owned()))),
        }
    }
}

struct Map {
    iter: std::collections::btree_map::IntoIter<String, Node>,
    parent: String,
    pending: Option<(String, Node)>,
}

impl<'de> de::MapAccess<'de> for Map {
    type Error = DeError;
    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((k, node)) = self.iter.next() else {
            return Ok(None);
        };
        let key = seed
            .deserialize(k.clone().into_deserializer())
            .map_err(|e: DeError| e.at(&self.parent, &node.origin))?;
        self.pending = Some((k, node));
        Ok(Some(key))
    }
    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DeError> {
        let (k, node) = self
            .pending
            .take()
            .ok_or_else(|| DeError::new(Problem::Msg("internal: value before key".into())))?;
        let path = join(&self.parent, &k);
        let origin = node.origin.clone();
        seed.deserialize(De {
            node,
            path: path.clone(),
        })
        .map_err(|e| e.at(&path, &origin))
    }
}

struct Seq {
    iter: std::iter::Enumerate<std::vec::IntoIter<Node>>,
    parent: String,
}

impl<'de> de::SeqAccess<'de> for Seq {
    type Error = DeError;
    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some((i, node)) = self.iter.next() else {
            return Ok(None);
        };
        let path = format!("{}[{i}]", self.parent);
        let origin = node.origin.clone();
        seed.deserialize(De {
            node,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| e.at(&path, &origin))
    }
}

macro_rules! parse_from_text {
    ($($method:ident => $visit:ident, $ty:ty, $what:expr;)*) => {
        $(
            fn $method<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
                if self.is_text() {
                    let v: $ty = self.parse($what)?;
                    visitor.$visit(v)
                } else {
                    de::Deserializer::deserialize_any(self, visitor)
                }
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for De {
    type Error = DeError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.val {
            Val::Str(s) => visitor.visit_string(s),
            Val::Int(i) => visitor.visit_i64(i),
            Val::Float(f) => visitor.visit_f64(f),
            Val::Bool(b) => visitor.visit_bool(b),
            Val::Array(a) => visitor.visit_seq(Seq {
                iter: a.into_iter().enumerate(),
                parent: self.path,
            }),
            Val::Table(t) => visitor.visit_map(Map {
                iter: t.into_iter(),
                parent: self.path,
                pending: None,
            }),
        }
    }

    parse_from_text! {
        deserialize_bool => visit_bool, bool, "true or false";
        deserialize_u8 => visit_u8, u8, "a whole number";
        deserialize_u16 => visit_u16, u16, "a whole number";
        deserialize_u32 => visit_u32, u32, "a whole number";
        deserialize_u64 => visit_u64, u64, "a whole number";
        deserialize_i8 => visit_i8, i8, "a whole number";
        deserialize_i16 => visit_i16, i16, "a whole number";
        deserialize_i32 => visit_i32, i32, "a whole number";
        deserialize_i64 => visit_i64, i64, "a whole number";
        deserialize_f32 => visit_f32, f32, "a number";
        deserialize_f64 => visit_f64, f64, "a number";
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // A list from a variable or flag is comma-separated: CBGATE_LISTEN=a,b.
        if let (true, Val::Str(s)) = (self.is_text(), &self.node.val) {
            let origin = self.node.origin.clone();
            let items: Vec<Node> = s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| Node::text(p.to_owned(), origin.clone()))
                .collect();
            return visitor.visit_seq(Seq {
                iter: items.into_iter().enumerate(),
                parent: self.path,
            });
        }
        de::Deserializer::deserialize_any(self, visitor)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.node.val {
            Val::Str(s) => visitor.visit_enum(s.trim().to_owned().into_deserializer()),
            _ => Err(DeError::new(Problem::BadChoice(variants))),
        }
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        char str string bytes byte_buf unit unit_struct tuple tuple_struct map struct identifier
        i128 u128
    }
}

/// A TOML syntax error as "line L, column C: what", without the source line the `toml` crate
/// quotes (it may be a private key). The description is dropped too if it quotes the source.
pub(crate) fn toml_syntax(text: &str, e: &toml::de::Error) -> String {
    let (line, column) = match e.span() {
        Some(span) => {
            // A span that is not on a character boundary (never seen) must not panic.
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (line, column)
        }
        None => (1, 1),
    };
    let message = e.message().trim().replace('\n', "; ");
    // Any 12 characters of the message found in the text: the message quotes the source.
    let chars: Vec<char> = message.chars().collect();
    let quotes_source = chars
        .windows(12)
        .any(|w| text.contains(&w.iter().collect::<String>()));
    let what = if quotes_source || super::looks_like_key_material(&message) {
        "syntax error".to_owned()
    } else {
        message
    };
    format!("line {line}, column {column}: {what}")
}
