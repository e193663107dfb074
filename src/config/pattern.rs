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
        return Err(format!("{} must start with /", super::shown(p)));
    };
    // Paths are matched without a trailing `/`; so are patterns.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out = Vec::with_capacity(parts.len());
    for (i, s) in parts.iter().enumerate() {
        out.push(match *s {
            "*" => Segment::One,
            "**" if i + 1 == parts.len() => Segment::Rest,
            "**" => {
                return Err(format!(
                    "{}: ** is only allowed as the last segment",
                    super::shown(p)
                ))
            }
            lit if lit.contains('*') => {
                return Err(format!("{}: * must be a whole segment", super::shown(p)));
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
            return Err(format!("{} is not an HTTP method", super::shown(m)));
        }
        methods.push(upper);
    }
    Ok(methods)
}
