//! The syntax of `[[policy.rules]]`: path patterns and method lists, checked when the
//! configuration is loaded and compiled into these forms for `gate::policy`.

use percent_encoding::percent_decode_str;

/// One segment of a compiled rule pattern.
#[derive(Debug)]
pub enum Segment {
    /// A literal segment, percent-decoded and lower-cased.
    Literal(String),
    /// `*`: exactly one non-empty segment.
    One,
    /// A final `**`: zero or more segments (so `/a/**` covers `/a` and everything below).
    Rest,
}

/// Compiles a rule path: `*` matches one segment, a final `**` any number of segments.
pub fn parse_pattern(p: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("{p:?} must start with /"));
    };
    // Paths are matched without a trailing `/`; so are patterns.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out = Vec::with_capacity(parts.len());
    for (i, s) in parts.iter().enumerate() {
        out.push(match *s {
            "*" => Segment::One,
            "**" if i + 1 == parts.len() => Segment::Rest,
            "**" => return Err(format!("{p:?}: ** is only allowed as the last segment")),
            lit if lit.contains('*') => {
                return Err(format!("{p:?}: * must be a whole segment"));
            }
            lit => Segment::Literal(
                percent_decode_str(lit)
                    .decode_utf8_lossy()
                    .to_ascii_lowercase(),
            ),
        });
    }
    Ok(out)
}

/// Upper-cases a rule's methods; `*` (or an empty list) means every method, returned as empty.
pub fn parse_methods(list: &[String]) -> Result<Vec<String>, String> {
    let mut methods = Vec::new();
    for m in list {
        if m == "*" {
            return Ok(Vec::new());
        }
        let upper = m.to_ascii_uppercase();
        if upper.is_empty() || http::Method::from_bytes(upper.as_bytes()).is_err() {
            return Err(format!("{m:?} is not an HTTP method"));
        }
        methods.push(upper);
    }
    Ok(methods)
}
