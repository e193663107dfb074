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

/// Whether `b` is an RFC 3986 unreserved character (`A-Z a-z 0-9 - . _ ~`), the only
/// characters a path segment of the Coinbase APIs uses (UUIDs, `BTC-USD`, `batch_cancel`,
/// `0x…` addresses, base58, `base-mainnet`).
pub fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Why one percent-decoded path segment is not plainly Coinbase-shaped, or `None` when it is.
///
/// Everything else is a character some server along the way interprets before routing: `;`
/// starts a path parameter that Tomcat and Spring strip (`/orders/..;/x`), `+` is a space to
/// form decoders, `:` a custom verb or an NTFS stream, a trailing dot is dropped by Windows
/// servers, and non-ASCII bytes (overlong UTF-8 `%c0%ae`, full-width `%ef%bc%8e`) are folded
/// into ASCII by Unicode-normalising ones. Request paths (`gate::policy::check_path`) and rule
/// literals are held to this same alphabet, so a rule can name every path cbgate forwards.
pub fn segment_problem(decoded: &[u8]) -> Option<&'static str> {
    if decoded.iter().any(|&b| b >= 0x80) {
        return Some(
            "a segment has a non-ASCII character, raw or percent-encoded (such as overlong \
             UTF-8 %c0%ae or a full-width dot %ef%bc%8e)",
        );
    }
    if decoded.contains(&b';') {
        return Some(
            "a segment has a ; (a path parameter, which servers such as Tomcat strip before routing)",
        );
    }
    if !decoded.iter().all(|&b| is_unreserved(b)) {
        return Some(
            "a segment has a character other than A-Z a-z 0-9 - . _ ~, raw or percent-encoded \
             (such as : @ + = , or a space)",
        );
    }
    if decoded.ends_with(b".") {
        return Some(
            "a segment ends in a dot (such as transactions.), which some servers drop before routing",
        );
    }
    None
}

/// Compiles a rule path: `*` matches one segment, a final `**` any number of segments.
///
/// A literal segment must be one a request path can have (see [`segment_problem`]): a rule
/// such as `/v2/accounts/{id}/transactions` would otherwise be accepted and never match.
pub fn parse_pattern(p: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("{} must start with /", super::shown(p)));
    };
    // Paths are matched without a trailing `/`; so are patterns.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    // `/` alone is the root; anywhere else an empty segment is a `//` no request path has.
    if rest.is_empty() {
        return Ok(vec![Segment::Literal(String::new())]);
    }
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
            "" => {
                return Err(format!(
                    "{p:?} has an empty segment (//), which no request path cbgate forwards has"
                ))
            }
            lit => {
                let decoded: Vec<u8> = percent_decode_str(lit).collect();
                if let Some(why) = segment_problem(&decoded) {
                    return Err(format!(
                        "{p:?}: {why}, so the rule could never match a request cbgate forwards \
                         (use * for a variable segment such as an id)"
                    ));
                }
                Segment::Literal(String::from_utf8_lossy(&decoded).to_ascii_lowercase())
            }
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
