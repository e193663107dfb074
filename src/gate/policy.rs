//! The policy phase: a permission ceiling of cbgate's own, whatever the key may do.
//!
//! `[[policy.rules]]` are tried first, in order; the first that matches decides. Otherwise the
//! ceiling decides: `view` lets GET and HEAD through; `trade` adds the Advanced Trade order and
//! convert endpoints; `transfer` allows everything. A denied request never reaches Coinbase.
//!
//! Paths reach this phase already canonical (see [`check_path`]): no dot segments, no `//`, no
//! percent-encoded `/`, `\`, `.` or NUL, and every segment made of `A-Z a-z 0-9 - . _ ~` only,
//! not ending in a dot. Matching folds what remains (percent-encoded letters, case, a trailing
//! `/`, a `.json`-style format suffix), so no spelling of a denied path can slip past.

use http::Method;
use percent_encoding::percent_decode_str;

use crate::config::pattern::{parse_methods, parse_pattern, segment_problem, Segment};
use crate::config::{KeyKind, Permission, PolicyConfig, RuleAction};

/// Why a request was denied: a sentence naming the rule or ceiling and how to allow it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

#[derive(Debug)]
struct Rule {
    action: RuleAction,
    /// Upper-case method names; empty means every method.
    methods: Vec<String>,
    pattern: Vec<Segment>,
    /// The rule as written, for messages.
    text: String,
}

/// A compiled policy.
#[derive(Debug)]
pub struct Policy {
    permission: Permission,
    rules: Vec<Rule>,
    /// `None`: the global `[policy]`; `Some(name)`: client identity `name`'s own.
    client: Option<String>,
    /// The CDP v2 writes the `trade` ceiling allows ([`CDP_V2_WRITES`]): method and pattern.
    cdp_trade: Vec<(&'static str, Vec<Segment>)>,
}

impl Policy {
    /// Compiles `[policy]`; errors name the configuration key at fault.
    pub fn new(cfg: &PolicyConfig) -> Result<Policy, (String, String)> {
        Policy::compile(cfg, None)
    }

    /// Compiles client identity `name`'s own ceiling and rules (`[clients.NAME]`), applied in
    /// addition to the global policy; its refusals name the identity.
    pub fn for_client(
        name: &str,
        permission: Permission,
        rules: &[crate::config::RuleConfig],
    ) -> Result<Policy, (String, String)> {
        let cfg = PolicyConfig {
            permission,
            rules: rules.to_vec(),
        };
        Policy::compile(&cfg, Some(name.to_owned()))
    }

    /// The ceiling.
    pub fn permission(&self) -> Permission {
        self.permission
    }

    fn compile(cfg: &PolicyConfig, client: Option<String>) -> Result<Policy, (String, String)> {
        let table = match &client {
            None => "policy".to_owned(),
            Some(name) => format!("clients.{name}"),
        };
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.iter().enumerate() {
            let key = format!("{table}.rules[{i}]");
            let pattern = parse_pattern(&r.path).map_err(|m| (format!("{key}.path"), m))?;
            let methods = parse_methods(&r.methods).map_err(|m| (format!("{key}.methods"), m))?;
            let verb = match r.action {
                RuleAction::Allow => "allow",
                RuleAction::Deny => "deny",
            };
            let shown = if methods.is_empty() {
                "*".to_owned()
            } else {
                methods.join(",")
            };
            rules.push(Rule {
                action: r.action,
                text: format!("#{} ({verb} {shown} {})", i + 1, r.path),
                methods,
                pattern,
            });
        }
        let cdp_trade = CDP_V2_WRITES
            .iter()
            .filter(|w| w.2 == CdpCeiling::Trade)
            .map(|&(m, p, _, _)| {
                parse_pattern(p)
                    .map(|pat| (m, pat))
                    .map_err(|e| ("CDP_V2_WRITES".to_owned(), format!("{p}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            permission: cfg.permission,
            rules,
            client,
            cdp_trade,
        })
    }

    /// Decides one request. `path` is the request path without the query, already accepted
    /// by [`check_path`]. Matching is on the path as a lenient server would route it: percent-
    /// decoded (`/orders/%65dit` is `/orders/edit`), ASCII case folded, without a trailing
    /// `/`, and with a rule's literal segment also matching that segment plus a format suffix
    /// (`transactions` matches `transactions.json`). A deny rule then covers every spelling some server might treat as the same path; an
    /// allow rule's extra spellings at worst reach a path Coinbase does not know.
    pub fn check(&self, method: &Method, path: &str) -> Result<(), Denied> {
        self.check_on(method, path, KeyKind::Cdp, path, false)
    }

    /// Decides one request to an API of `family`: rules match the path the client sent
    /// (`path`), the ceiling judges `upstream_path`, the path the family's host sees (the
    /// route's prefix stripped), by that family's trade endpoints (see [`trade_endpoint`]).
    pub fn check_on(
        &self,
        method: &Method,
        path: &str,
        family: KeyKind,
        upstream_path: &str,
        gateway: bool,
    ) -> Result<(), Denied> {
        let decoded = match_form(path);
        let decoded = decoded.as_str();
        for rule in &self.rules {
            // Servers answer HEAD with their GET handler: a rule about GET covers HEAD too.
            let method_matches = rule.methods.is_empty()
                || rule
                    .methods
                    .iter()
                    .any(|m| m == method.as_str() || (method == Method::HEAD && m == "GET"));
            if method_matches && matches(&rule.pattern, decoded) {
                return match (rule.action, &self.client) {
                    (RuleAction::Allow, _) => Ok(()),
                    (RuleAction::Deny, None) => Err(Denied(format!(
                        "{method} {path} is denied by policy rule {}; change [[policy.rules]] to allow it",
                        rule.text
                    ))),
                    (RuleAction::Deny, Some(name)) => Err(Denied(format!(
                        "{method} {path} is denied by client identity \"{name}\"'s rule {}; change clients.{name}.rules to allow it",
                        rule.text
                    ))),
                };
            }
        }
        let upstream = match_form(upstream_path);
        let allowed = if gateway {
            gateway_allows(self.permission, &upstream)
        } else {
            ceiling_allows(self.permission, method, family, &upstream)
                || (self.permission == Permission::Trade
                    && family == KeyKind::Cdp
                    && self.cdp_trade_allows(method, &upstream))
        };
        if allowed {
            return Ok(());
        }
        let (name, scope) = ceiling_scope(self.permission, family);
        if let Some(client) = &self.client {
            return Err(Denied(format!(
                "{method} {path} is above client identity \"{client}\"'s permission ceiling \"{name}\" ({scope}); \
                 to allow it raise clients.{client}.permission (never above policy.permission), or add an allow \
                 rule for this path to clients.{client}.rules"
            )));
        }
        let next = match self.permission {
            Permission::View => {
                "policy.permission = \"trade\" (orders and convert) or \"transfer\""
            }
            Permission::Trade => "policy.permission = \"transfer\"",
            // Transfer allows everything; this arm is never reached.
            Permission::Transfer => "nothing",
        };
        Err(Denied(format!(
            "{method} {path} is above cbgate's permission ceiling \"{name}\" ({scope}); \
             to allow it set {next}, or add a [[policy.rules]] allow rule for this path"
        )))
    }
}

/// A ceiling's name and what it lets through on an API of `family`, for refusal messages.
fn ceiling_scope(permission: Permission, family: KeyKind) -> (&'static str, &'static str) {
    match permission {
        Permission::View => ("view", "GET and HEAD only"),
        Permission::Trade => (
            "trade",
            match family {
                KeyKind::Cdp => {
                    "reads plus Advanced Trade orders, convert and the CDP v2 writes that move no funds; nothing that moves funds"
                }
                _ => "reads plus placing and cancelling orders; withdrawals, transfers, address books and conversions are transfer class",
            },
        ),
        Permission::Transfer => ("transfer", "everything"),
    }
}

/// The ceiling one CDP v2 write needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdpCeiling {
    /// Moves no funds (creates or names accounts, quotes, reads sent as POST): `trade`.
    Trade,
    /// Can move funds, or lifts what guards them (signatures, sends, key export, policies):
    /// `transfer`.
    Transfer,
}

/// Every write of the CDP v2 API (`openapi.yaml` of coinbase/cdp-sdk), under cbgate's
/// `/platform` route: method, path pattern (`*` one segment, final `**` any), the ceiling it
/// needs, and why. A CDP write not listed here needs `transfer`. The README's table is this one.
pub const CDP_V2_WRITES: &[(&str, &str, CdpCeiling, &str)] = {
    use CdpCeiling::{Trade as T, Transfer as X};
    &[
        (
            "POST",
            "/platform/v2/evm/accounts",
            T,
            "creates an empty EVM account; moves nothing",
        ),
        (
            "PUT",
            "/platform/v2/evm/accounts/*",
            X,
            "can replace or remove the account's policy, which limits what it may sign",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/import",
            T,
            "registers a key the caller already holds; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/*/export",
            X,
            "returns the private key: whoever holds it can move everything",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/export/by-name/*",
            X,
            "returns the private key: whoever holds it can move everything",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/*/send/transaction",
            X,
            "signs and broadcasts a transaction: sends funds",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/*/sign/transaction",
            X,
            "a signed transaction sends funds wherever it is broadcast",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/*/sign",
            X,
            "signs an arbitrary hash, which can be a transaction's",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/*/sign/message",
            X,
            "EIP-191 signatures authorise logins and off-chain orders",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/*/sign/typed-data",
            X,
            "EIP-712 signatures authorise permits and orders that spend tokens",
        ),
        (
            "POST",
            "/platform/v2/evm/accounts/*/eip7702/delegation",
            X,
            "delegates the account to contract code, which can then move its funds",
        ),
        (
            "POST",
            "/platform/v2/evm/smart-accounts",
            T,
            "creates an empty smart account; moves nothing",
        ),
        (
            "PUT",
            "/platform/v2/evm/smart-accounts/*",
            T,
            "renames the smart account; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/evm/smart-accounts/*/user-operations",
            T,
            "prepares an unsigned user operation; nothing is sent",
        ),
        (
            "POST",
            "/platform/v2/evm/smart-accounts/*/user-operations/prepare-and-send",
            X,
            "signs and sends a user operation: sends funds",
        ),
        (
            "POST",
            "/platform/v2/evm/smart-accounts/*/user-operations/*/send",
            X,
            "sends a user operation: sends funds",
        ),
        (
            "POST",
            "/platform/v2/evm/smart-accounts/*/spend-permissions",
            X,
            "lets another address spend from the smart account",
        ),
        (
            "POST",
            "/platform/v2/evm/smart-accounts/*/spend-permissions/revoke",
            T,
            "withdraws a spend permission; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/evm/smart-accounts/*/lend/**",
            X,
            "moves funds into or out of a lending market",
        ),
        (
            "POST",
            "/platform/v2/evm/swaps",
            T,
            "returns a quote and a transaction to sign; moves nothing by itself",
        ),
        (
            "POST",
            "/platform/v2/evm/faucet",
            T,
            "asks for test-network funds into the account; moves nothing out",
        ),
        (
            "POST",
            "/platform/v2/solana/accounts",
            T,
            "creates an empty Solana account; moves nothing",
        ),
        (
            "PUT",
            "/platform/v2/solana/accounts/*",
            X,
            "can replace or remove the account's policy, which limits what it may sign",
        ),
        (
            "POST",
            "/platform/v2/solana/accounts/import",
            T,
            "registers a key the caller already holds; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/solana/accounts/*/export",
            X,
            "returns the private key: whoever holds it can move everything",
        ),
        (
            "POST",
            "/platform/v2/solana/accounts/export/by-name/*",
            X,
            "returns the private key: whoever holds it can move everything",
        ),
        (
            "POST",
            "/platform/v2/solana/accounts/*/sign/transaction",
            X,
            "a signed transaction sends funds wherever it is broadcast",
        ),
        (
            "POST",
            "/platform/v2/solana/accounts/*/sign/message",
            X,
            "signatures authorise logins and off-chain orders",
        ),
        (
            "POST",
            "/platform/v2/solana/accounts/send/transaction",
            X,
            "signs and broadcasts a transaction: sends funds",
        ),
        (
            "POST",
            "/platform/v2/solana/faucet",
            T,
            "asks for devnet funds into the account; moves nothing out",
        ),
        (
            "POST",
            "/platform/v2/policy-engine/policies",
            X,
            "policies limit what accounts may sign; a new project policy can allow more",
        ),
        (
            "PUT",
            "/platform/v2/policy-engine/policies/*",
            X,
            "changing a policy can lift the limit it sets on signing",
        ),
        (
            "DELETE",
            "/platform/v2/policy-engine/policies/*",
            X,
            "deleting a policy lifts the limit it sets on signing",
        ),
        (
            "POST",
            "/platform/v2/end-users",
            T,
            "creates an end user and its empty accounts; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/end-users/auth/validate-token",
            T,
            "checks an end user's access token; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/end-users/import",
            T,
            "registers a key the end user already holds; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/end-users/*/evm",
            T,
            "adds an empty EVM account to an end user; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/end-users/*/evm-smart-account",
            T,
            "adds an empty smart account to an end user; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/end-users/*/solana",
            T,
            "adds an empty Solana account to an end user; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/evm/sign/transaction",
            X,
            "a signed transaction sends funds wherever it is broadcast",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/evm/send/transaction",
            X,
            "signs and broadcasts a transaction: sends funds",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/evm/*/send/*",
            X,
            "sends an asset: moves funds",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/evm/sign/message",
            X,
            "EIP-191 signatures authorise logins and off-chain orders",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/evm/sign/typed-data",
            X,
            "EIP-712 signatures authorise permits and orders that spend tokens",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/evm/eip7702/delegation",
            X,
            "delegates the account to contract code, which can then move its funds",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/evm/smart-accounts/*/send",
            X,
            "sends a user operation: sends funds",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/address/*/delegation",
            X,
            "lets the developer sign for the end user's account",
        ),
        (
            "DELETE",
            "/platform/v2/embedded-wallet-api/end-users/*/address/*/delegation",
            T,
            "withdraws a delegation; moves nothing",
        ),
        (
            "DELETE",
            "/platform/v2/embedded-wallet-api/end-users/*/delegation",
            T,
            "withdraws a delegation; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/solana/sign/message",
            X,
            "signatures authorise logins and off-chain orders",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/solana/sign/transaction",
            X,
            "a signed transaction sends funds wherever it is broadcast",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/solana/sign/x402-payment",
            X,
            "a signed x402 payment pays whoever presents it",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/solana/send/transaction",
            X,
            "signs and broadcasts a transaction: sends funds",
        ),
        (
            "POST",
            "/platform/v2/embedded-wallet-api/end-users/*/solana/*/send/*",
            X,
            "sends an asset: moves funds",
        ),
        (
            "POST",
            "/platform/v2/accounts",
            T,
            "creates an account; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/customers",
            T,
            "creates a customer record; moves nothing",
        ),
        (
            "PUT",
            "/platform/v2/customers/*",
            T,
            "updates a customer record; moves nothing",
        ),
        (
            "DELETE",
            "/platform/v2/customers/*",
            T,
            "deletes a customer record; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/deposit-destinations",
            T,
            "creates an address to receive deposits; moves nothing out",
        ),
        (
            "POST",
            "/platform/v2/transfers",
            X,
            "creates a transfer of funds",
        ),
        (
            "POST",
            "/platform/v2/transfers/*/execute",
            X,
            "executes a transfer: moves funds",
        ),
        (
            "POST",
            "/platform/v2/transfers/*/travel-rule",
            T,
            "submits travel-rule information; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/payment-sessions",
            T,
            "creates a request to be paid; moves nothing out",
        ),
        (
            "POST",
            "/platform/v2/payment-sessions/*/cancel",
            T,
            "cancels a payment request; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/payment-sessions/*/authorizations/**",
            X,
            "authorises a payment from a wallet or account",
        ),
        (
            "POST",
            "/platform/v2/payment-sessions/*/captures",
            X,
            "captures an authorised payment: moves funds",
        ),
        (
            "POST",
            "/platform/v2/payment-sessions/*/voids",
            T,
            "releases an authorisation; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/payment-sessions/*/refunds",
            X,
            "refunds a payment: sends funds",
        ),
        ("POST", "/platform/v2/disbursements", X, "pays out funds"),
        (
            "POST",
            "/platform/v2/data/query/run",
            T,
            "runs a read-only SQL query; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/data/webhooks/subscriptions",
            T,
            "creates a notification subscription; moves nothing",
        ),
        (
            "PUT",
            "/platform/v2/data/webhooks/subscriptions/*",
            T,
            "changes a notification subscription; moves nothing",
        ),
        (
            "DELETE",
            "/platform/v2/data/webhooks/subscriptions/*",
            T,
            "deletes a notification subscription; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/x402/verify",
            T,
            "checks a payment payload; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/x402/settle",
            X,
            "settles (broadcasts) a payment: moves funds",
        ),
        (
            "POST",
            "/platform/v2/x402/discovery/mcp",
            T,
            "a discovery query; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/x402/validate",
            T,
            "checks an x402 endpoint; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/onramp/verifications",
            T,
            "starts an identity verification; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/onramp/verifications/*/submit",
            T,
            "submits a verification code; moves nothing",
        ),
        (
            "POST",
            "/platform/v2/onramp/orders",
            X,
            "buys crypto with the user's payment method: spends money",
        ),
        (
            "POST",
            "/platform/v2/onramp/sessions",
            T,
            "creates an onramp session link; the user pays in their own browser",
        ),
        (
            "POST",
            "/platform/v2/onramp/limits",
            T,
            "reads the user's limits (sent as POST); moves nothing",
        ),
        (
            "POST",
            "/platform/v2/onramp/limits/upgrade",
            T,
            "asks for higher limits; moves nothing",
        ),
    ]
};

impl Policy {
    /// Whether `path` (match form) is a CDP v2 write the `trade` ceiling allows.
    fn cdp_trade_allows(&self, method: &Method, path: &str) -> bool {
        self.cdp_trade
            .iter()
            .any(|(m, pat)| *m == method.as_str() && matches(pat, path))
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

fn ceiling_allows(permission: Permission, method: &Method, family: KeyKind, path: &str) -> bool {
    match permission {
        Permission::Transfer => true,
        Permission::View => is_read(method),
        Permission::Trade => is_read(method) || trade_endpoint(family, path),
    }
}

/// The derivatives gateway is JSON-RPC: every call may be a POST, so the method name in the
/// path decides. `public/*` and `private/get*` read; orders (buy, sell, edit, cancel, close
/// a position, block trades and RFQs) trade; everything else (withdraw, transfers, address book, subaccounts,
/// API keys) is transfer class.
fn gateway_allows(permission: Permission, path: &str) -> bool {
    let Some(call) = path.strip_prefix("/api/v2/") else {
        return permission == Permission::Transfer;
    };
    let read = call.starts_with("public/")
        || call
            .strip_prefix("private/")
            .is_some_and(|m| m.starts_with("get") && !m.contains('/'));
    let trade = call.strip_prefix("private/").is_some_and(|m| {
        matches!(
            m,
            "buy" | "sell" | "edit" | "edit_by_label" | "close_position" | "cancel"
        ) || (m.starts_with("cancel_") && !m.contains("transfer") && !m.contains("withdrawal"))
            // Block trades and RFQs: trades between two parties, no funds leave.
            || matches!(
                m,
                "create_block_rfq"
                    | "accept_block_rfq"
                    | "add_block_rfq_quote"
                    | "edit_block_rfq_quote"
                    | "execute_block_trade"
                    | "approve_block_trade"
                    | "verify_block_trade"
                    | "simulate_block_trade"
            )
    });
    match permission {
        Permission::Transfer => true,
        Permission::View => read,
        Permission::Trade => read || trade,
    }
}

/// Whether `path` (match form, as the family's host sees it) is a trade-class endpoint: one
/// that places, edits or cancels orders. Everything else that is not a read is transfer class
/// (withdrawals, transfers between profiles or portfolios, address books, conversions, wallet
/// and profile creation, loans): those move funds or decide where funds may go.
pub fn trade_endpoint(family: KeyKind, path: &str) -> bool {
    let under = |p: &str, prefix: &str| {
        p == prefix
            || p.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    match family {
        // Advanced Trade: orders (create, edit, cancel, preview) and convert (a trade between
        // two of the user's own currencies, which Coinbase counts as trading).
        KeyKind::Cdp => {
            under(path, "/api/v3/brokerage/orders")
                || path.starts_with("/api/v3/brokerage/convert/")
        }
        // Exchange: POST /orders, DELETE /orders, DELETE /orders/{id}. Not /conversions
        // (USD/USDC conversion moves funds between currencies' accounts: transfer).
        KeyKind::Exchange => under(path, "/orders"),
        // Prime: /v1/portfolios/{id}/order (create), /order_preview, and
        // /v1/portfolios/{id}/orders/{order_id}/cancel. Not allocations, conversions,
        // transfers, withdrawals, wallets or address books.
        KeyKind::Prime => {
            let segs: Vec<&str> = path.split('/').collect();
            matches!(
                segs.as_slice(),
                ["", "v1", "portfolios", id, "order" | "order_preview"] if !id.is_empty()
            ) || matches!(
                segs.as_slice(),
                ["", "v1", "portfolios", id, "orders", oid, "cancel"] if !id.is_empty() && !oid.is_empty()
            )
        }
        // INTX: POST/DELETE /api/v1/orders, PUT/DELETE /api/v1/orders/{id}. Not
        // /api/v1/transfers/** (withdrawals, addresses), /portfolios/transfer, loans.
        KeyKind::Intx => under(path, "/api/v1/orders"),
    }
}

/// The form paths are matched in: percent-decoded, ASCII-lowercased, no trailing `/` (except
/// for the root itself).
pub fn match_form(path: &str) -> String {
    let mut p = percent_decode_str(path)
        .decode_utf8_lossy()
        .to_ascii_lowercase();
    if p.len() > 1 && p.ends_with('/') {
        p.pop();
    }
    p
}

fn matches(pattern: &[Segment], path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut segs = rest.split('/');
    for p in pattern {
        match p {
            Segment::Rest => return true,
            Segment::One => match segs.next() {
                Some(s) if !s.is_empty() => {}
                _ => return false,
            },
            Segment::Literal(l) => match segs.next() {
                Some(s) if literal_matches(l, s) => {}
                _ => return false,
            },
        }
    }
    segs.next().is_none()
}

/// A literal covers its format-suffixed spellings too: servers that honour format suffixes
/// (Rails routes `transactions.json` to `transactions`) would otherwise let `.json` walk past a
/// deny rule. `l` and `s` are both in match form.
fn literal_matches(l: &str, s: &str) -> bool {
    // The root pattern `/` is the one empty literal: it is the root and nothing else.
    if l.is_empty() {
        return s.is_empty();
    }
    s.strip_prefix(l)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Refuses request paths that are not plainly Coinbase-shaped, before routing and policy.
///
/// Dot segments, `//`, backslashes, percent-encoded `/`, `\`, `.` or NUL, malformed percent
/// escapes, and control or non-ASCII bytes are all normalised differently by different servers;
/// a policy that matched one spelling could be bypassed by another. Beyond those, every segment,
/// percent-decoded, must keep to the RFC 3986 unreserved characters and must not end in a dot
/// ([`segment_problem`]): `;` path parameters, `%c0%ae`, full-width dots or a trailing `.` are
/// each some server's alias for another path. A query string is not part of `path`.
/// Returns the reason.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err("the path must start with /");
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err("the path contains a backslash"),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err("the path has a malformed percent escape");
                };
                match h * 16 + l {
                    0x2f => return Err("the path contains an encoded / (%2F)"),
                    0x5c => return Err("the path contains an encoded backslash (%5C)"),
                    0x2e => return Err("the path contains an encoded dot (%2E)"),
                    0x00 => return Err("the path contains an encoded NUL (%00)"),
                    c if c < 0x20 || c == 0x7f => {
                        return Err("the path contains an encoded control character")
                    }
                    _ => {}
                }
                i += 3;
                continue;
            }
            0x00..=0x20 | 0x7f..=0xff => {
                return Err("the path contains a control, space or non-ASCII byte")
            }
            _ => {}
        }
        i += 1;
    }
    if path.contains("//") {
        return Err("the path contains an empty segment (//)");
    }
    let mut decoded = Vec::new();
    for seg in path[1..].split('/') {
        if seg == "." || seg == ".." {
            return Err("the path contains a dot segment (. or ..)");
        }
        decoded.clear();
        decoded.extend(percent_decode_str(seg));
        if let Some(why) = segment_problem(&decoded) {
            return Err(why);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleConfig;

    #[test]
    fn hmac_families_have_their_own_trade_class() {
        let trade = Policy::new(&PolicyConfig {
            permission: Permission::Trade,
            rules: vec![],
        })
        .expect("policy");
        let ok = |m: Method, f: KeyKind, up: &str| {
            trade.check_on(&m, &format!("/x{up}"), f, up, false).is_ok()
        };
        for (m, f, up) in [
            (Method::POST, KeyKind::Exchange, "/orders"),
            (Method::DELETE, KeyKind::Exchange, "/orders/abc"),
            (Method::DELETE, KeyKind::Exchange, "/Orders/"),
            (Method::POST, KeyKind::Prime, "/v1/portfolios/p1/order"),
            (
                Method::POST,
                KeyKind::Prime,
                "/v1/portfolios/p1/order_preview",
            ),
            (
                Method::POST,
                KeyKind::Prime,
                "/v1/portfolios/p1/orders/o1/cancel",
            ),
            (Method::POST, KeyKind::Intx, "/api/v1/orders"),
            (Method::PUT, KeyKind::Intx, "/api/v1/orders/o1"),
            (
                Method::GET,
                KeyKind::Prime,
                "/v1/portfolios/p1/wallets/w/withdrawals",
            ),
        ] {
            assert!(ok(m.clone(), f, up), "{m} {f:?} {up} should pass");
        }
        for (m, f, up) in [
            (Method::POST, KeyKind::Exchange, "/withdrawals/crypto"),
            (
                Method::POST,
                KeyKind::Exchange,
                "/withdrawals/payment-method",
            ),
            (Method::POST, KeyKind::Exchange, "/profiles/transfer"),
            (Method::POST, KeyKind::Exchange, "/conversions"),
            (Method::POST, KeyKind::Exchange, "/address-book"),
            (Method::POST, KeyKind::Exchange, "/ordersx"),
            (
                Method::POST,
                KeyKind::Exchange,
                "/orders.json/../withdrawals",
            ),
            (
                Method::POST,
                KeyKind::Prime,
                "/v1/portfolios/p1/wallets/w/withdrawals",
            ),
            (
                Method::POST,
                KeyKind::Prime,
                "/v1/portfolios/p1/wallets/w/transfers",
            ),
            (
                Method::POST,
                KeyKind::Prime,
                "/v1/portfolios/p1/address_book",
            ),
            (
                Method::POST,
                KeyKind::Prime,
                "/v1/portfolios/p1/wallets/w/conversion",
            ),
            (
                Method::POST,
                KeyKind::Prime,
                "/v1/portfolios/p1/allocations",
            ),
            (Method::POST, KeyKind::Prime, "/v1/portfolios/p1/order/x"),
            (Method::POST, KeyKind::Intx, "/api/v1/transfers/withdraw"),
            (Method::POST, KeyKind::Intx, "/api/v1/transfers/address"),
            (Method::POST, KeyKind::Intx, "/api/v1/portfolios/transfer"),
            // A family's trade path is not trade on another family's host.
            (Method::POST, KeyKind::Exchange, "/api/v3/brokerage/orders"),
            (Method::POST, KeyKind::Cdp, "/orders"),
        ] {
            assert!(!ok(m.clone(), f, up), "{m} {f:?} {up} should be denied");
        }
        let e = trade
            .check_on(
                &Method::POST,
                "/exchange/withdrawals/crypto",
                KeyKind::Exchange,
                "/withdrawals/crypto",
                false,
            )
            .expect_err("denied");
        assert!(e.to_string().contains("transfer"), "{e}");
        let gw = |p: Permission, path: &str| gateway_allows(p, path);
        assert!(gw(Permission::View, "/api/v2/public/get_instruments"));
        assert!(gw(Permission::View, "/api/v2/private/get_account_summary"));
        assert!(!gw(Permission::View, "/api/v2/private/buy"));
        assert!(gw(Permission::Trade, "/api/v2/private/buy"));
        assert!(gw(Permission::Trade, "/api/v2/private/cancel_all"));
        assert!(gw(Permission::Trade, "/api/v2/private/execute_block_trade"));
        assert!(!gw(Permission::View, "/api/v2/private/accept_block_rfq"));
        assert!(!gw(Permission::Trade, "/api/v2/private/withdraw"));
        assert!(!gw(Permission::Trade, "/api/v2/private/cancel_withdrawal"));
        assert!(!gw(
            Permission::Trade,
            "/api/v2/private/submit_transfer_to_user"
        ));
        assert!(!gw(
            Permission::Trade,
            "/api/v2/private/add_to_address_book"
        ));
        assert!(gw(Permission::Transfer, "/api/v2/private/withdraw"));
    }

    fn policy(permission: Permission, rules: &[(RuleAction, &[&str], &str)]) -> Policy {
        Policy::new(&PolicyConfig {
            permission,
            rules: rules
                .iter()
                .map(|(a, m, p)| RuleConfig {
                    action: *a,
                    methods: m.iter().map(|s| s.to_string()).collect(),
                    path: p.to_string(),
                })
                .collect(),
        })
        .expect("valid policy")
    }

    #[test]
    fn trade_ceiling_allows_orders_and_convert_only() {
        let p = policy(Permission::Trade, &[]);
        let ok = |m: Method, path: &str| p.check(&m, path).is_ok();
        assert!(ok(Method::GET, "/v2/accounts/a/transactions"));
        assert!(ok(Method::HEAD, "/api/v3/brokerage/accounts"));
        assert!(ok(Method::POST, "/api/v3/brokerage/orders"));
        assert!(ok(Method::POST, "/api/v3/brokerage/orders/batch_cancel"));
        assert!(ok(Method::POST, "/api/v3/brokerage/orders/edit"));
        assert!(ok(Method::POST, "/api/v3/brokerage/orders/close_position"));
        assert!(ok(Method::POST, "/api/v3/brokerage/convert/quote"));
        assert!(ok(Method::POST, "/api/v3/brokerage/convert/trade/t1"));
        assert!(!ok(Method::POST, "/v2/accounts/a/transactions"));
        assert!(!ok(Method::POST, "/v2/accounts/a/withdrawals"));
        assert!(!ok(Method::POST, "/api/v3/brokerage/portfolios/move_funds"));
        assert!(!ok(Method::POST, "/platform/v1/accounts"));
        assert!(!ok(Method::POST, "/api/v3/brokerage/ordersx"));
        assert!(!ok(Method::DELETE, "/api/v3/brokerage/portfolios/p1"));
        let e = p
            .check(&Method::POST, "/v2/accounts/a/transactions")
            .expect_err("denied");
        assert!(e.0.contains("\"trade\"") && e.0.contains("policy.permission = \"transfer\""));
    }

    #[test]
    fn cdp_v2_writes_account_creation_at_trade_signing_and_sending_at_transfer() {
        let p = policy(Permission::Trade, &[]);
        let ok = |m: Method, path: &str| p.check(&m, path).is_ok();
        assert!(ok(Method::POST, "/platform/v2/evm/accounts"));
        assert!(ok(Method::POST, "/platform/v2/evm/accounts/"));
        assert!(ok(Method::POST, "/platform/v2/solana/accounts"));
        assert!(ok(Method::POST, "/platform/v2/evm/smart-accounts"));
        assert!(ok(Method::POST, "/platform/v2/end-users/u1/evm"));
        assert!(ok(Method::POST, "/platform/v2/evm/faucet"));
        for denied in [
            "/platform/v2/evm/accounts/0xabc/send/transaction",
            "/platform/v2/evm/accounts/0xabc/sign/transaction",
            "/platform/v2/evm/accounts/0xabc/sign",
            "/platform/v2/evm/accounts/0xabc/export",
            "/platform/v2/evm/accounts/export/by-name/n1",
            "/platform/v2/solana/accounts/send/transaction",
            "/platform/v2/evm/smart-accounts/0x1/user-operations/prepare-and-send",
            "/platform/v2/evm/smart-accounts/0x1/lend/deposit",
            "/platform/v2/policy-engine/policies",
            "/platform/v2/transfers",
            "/platform/v2/not-in-the-table",
            "/platform/v1/wallets",
        ] {
            assert!(!ok(Method::POST, denied), "{denied}");
        }
        assert!(!ok(Method::PUT, "/platform/v2/evm/accounts/0xabc"));
        assert!(!ok(Method::DELETE, "/platform/v2/evm/accounts"));
        let t = policy(Permission::Transfer, &[]);
        assert!(t
            .check(
                &Method::POST,
                "/platform/v2/evm/accounts/0xabc/send/transaction"
            )
            .is_ok());
        let v = policy(Permission::View, &[]);
        assert!(v.check(&Method::POST, "/platform/v2/evm/accounts").is_err());
    }

    #[test]
    fn every_cdp_write_has_one_entry_and_a_reason() {
        let mut seen = std::collections::HashSet::new();
        for (m, p, _, why) in CDP_V2_WRITES {
            assert!(seen.insert((m, p)), "{m} {p} twice");
            assert!(matches!(*m, "POST" | "PUT" | "DELETE"), "{m} {p}");
            assert!(why.len() > 10, "{m} {p}: reason");
            parse_pattern(p).expect("pattern");
        }
    }

    #[test]
    fn view_and_transfer_ceilings() {
        let v = policy(Permission::View, &[]);
        assert!(v.check(&Method::GET, "/api/v3/brokerage/orders").is_ok());
        assert!(v.check(&Method::POST, "/api/v3/brokerage/orders").is_err());
        assert!(v
            .check(&Method::OPTIONS, "/api/v3/brokerage/orders")
            .is_err());
        let deny_get = policy(
            Permission::View,
            &[(RuleAction::Deny, &["GET"], "/v2/accounts/*/transactions")],
        );
        assert!(deny_get
            .check(&Method::HEAD, "/v2/accounts/a/transactions")
            .is_err());
        let t = policy(Permission::Transfer, &[]);
        assert!(t.check(&Method::POST, "/v2/accounts/a/withdrawals").is_ok());
    }

    #[test]
    fn rules_match_first_and_before_the_ceiling() {
        let p = policy(
            Permission::Trade,
            &[
                (RuleAction::Deny, &["POST"], "/api/v3/brokerage/orders/edit"),
                (RuleAction::Allow, &["post"], "/v2/accounts/*/transactions"),
                (RuleAction::Deny, &["*"], "/api/v3/brokerage/orders/**"),
            ],
        );
        let e = p
            .check(&Method::POST, "/api/v3/brokerage/orders/edit")
            .expect_err("rule 1");
        assert!(e.0.contains("rule #1"), "{e}");
        assert!(p
            .check(&Method::POST, "/v2/accounts/abc/transactions")
            .is_ok());
        // `*` is exactly one segment.
        assert!(p
            .check(&Method::POST, "/v2/accounts/a/b/transactions")
            .is_err());
        assert!(p
            .check(&Method::POST, "/v2/accounts//transactions")
            .is_err());
        // A final `**` covers the prefix itself and any depth below it, for every method.
        assert!(p
            .check(&Method::GET, "/api/v3/brokerage/orders/historical/x")
            .is_err());
        let e = p
            .check(&Method::POST, "/api/v3/brokerage/orders")
            .expect_err("rule 3");
        assert!(e.0.contains("rule #3"), "{e}");
        assert!(p.check(&Method::POST, "/api/v3/brokerage/ordersx").is_err());
        assert!(p.check(&Method::GET, "/api/v3/brokerage/ordersx").is_ok());
        // A suffix is `.` and more: `editx` and `edi` are other paths.
        assert!(p
            .check(&Method::GET, "/api/v3/brokerage/orders.json")
            .is_err());
        let e = p
            .check(&Method::POST, "/api/v3/brokerage/orders/editx")
            .expect_err("rule 3");
        assert!(e.0.contains("rule #3"), "{e}");
        let root = policy(Permission::View, &[(RuleAction::Allow, &["POST"], "/")]);
        assert!(root.check(&Method::POST, "/").is_ok());
        assert!(root.check(&Method::POST, "/.json").is_err());
        // Percent-encoded spellings of a denied path are the same path.
        let e = p
            .check(&Method::POST, "/api/v3/brokerage/orders/%65dit")
            .expect_err("encoded e");
        assert!(e.0.contains("rule #1"), "{e}");
        assert!(p
            .check(&Method::POST, "/v2/accounts/abc/tr%61nsactions")
            .is_ok());
        // So are other cases and a trailing slash.
        for spelling in [
            "/api/v3/brokerage/orders/edit/",
            "/API/v3/Brokerage/ORDERS/Edit",
            "/api/v3/brokerage/orders/%45DIT",
            // A format suffix, as Rails routes it.
            "/api/v3/brokerage/orders/edit.json",
            "/api/v3/brokerage/orders/edit.x.y",
            "/api/v3/brokerage/orders/Edit.JSON/",
        ] {
            let e = p.check(&Method::POST, spelling).expect_err(spelling);
            assert!(e.0.contains("rule #1"), "{spelling}: {e}");
        }
    }

    #[test]
    fn bad_rules_name_the_key() {
        let bad = |path: &str, methods: &[&str]| {
            Policy::new(&PolicyConfig {
                permission: Permission::Trade,
                rules: vec![RuleConfig {
                    action: RuleAction::Allow,
                    methods: methods.iter().map(|s| s.to_string()).collect(),
                    path: path.into(),
                }],
            })
            .expect_err("invalid")
            .0
        };
        assert_eq!(bad("v2/x", &[]), "policy.rules[0].path");
        assert_eq!(bad("/v2/x*", &[]), "policy.rules[0].path");
        assert_eq!(bad("/**/x", &[]), "policy.rules[0].path");
        assert_eq!(bad("/v2", &["GE T"]), "policy.rules[0].methods");
        // Literals no forwarded path can have would make rules that never match.
        for dead in [
            "/platform/v2/evm/accounts/{address}/sign",
            "/v2/accounts/*/transactions;x",
            "/v2/accounts/*/transactions.",
            "/v2/%C3%A9",
            "/v2//x",
            "/v2/a%",
        ] {
            assert_eq!(bad(dead, &[]), "policy.rules[0].path", "{dead}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "/api/v3/brokerage/../../v2/accounts/a/withdrawals",
            "/api/v3/./brokerage/orders",
            "/api/v3/brokerage/orders/..",
            "/v2/accounts/a/.",
            "/v2//accounts",
            "/v2/accounts%2Fa",
            "/v2/accounts%2fa",
            "/v2/%2e%2e/x",
            "/v2/%2E/x",
            "/v2/a%5cb",
            "/v2/a\\b",
            "/v2/a%00b",
            "/v2/a%0ab",
            "/v2/a%",
            "/v2/a%zz",
            "/v2/a\u{e9}",
            "/v2/a\tb",
            "v2/a",
            // Spellings that servers route as another path, or that a review got past a rule.
            "/v2/accounts/a/transactions.",
            "/v2/accounts/a/transactions;x",
            "/v2/accounts/a/transactions%20",
            "/v2/accounts/a/transactions%3b",
            "/v2/accounts/a/transactions%3B",
            "/api/v3/brokerage/orders/..;/..;/v2/accounts/a/withdrawals",
            "/api/v3/brokerage/orders/%c0%ae%c0%ae/x",
            "/api/v3/brokerage/orders/%ef%bc%8e%ef%bc%8e/x",
            "/api/v3/brokerage/orders/historical/batch%3Aa%20b",
            "/v2/a:b",
            "/v2/a@b",
            "/v2/a+b",
            "/v2/a=b",
            "/v2/a,b",
            "/v2/%7b",
            "/v2/a/...",
            "/v2/a/x.",
        ] {
            assert!(check_path(p).is_err(), "{p:?} must be refused");
        }
        let why = check_path("/v2/accounts/a/transactions;x").expect_err("refused");
        assert!(why.contains(';'), "{why}");
        let why = check_path("/v2/accounts/a/transactions.").expect_err("refused");
        assert!(why.contains("ends in a dot"), "{why}");
        let why = check_path("/api/v3/x/%ef%bc%8e").expect_err("refused");
        assert!(why.contains("non-ASCII"), "{why}");
        for p in [
            "/",
            "/api/v3/brokerage/orders",
            "/api/v3/brokerage/orders/",
            "/api/v3/brokerage/orders/historical/batch",
            "/api/v3/brokerage/orders/%65dit",
            "/api/v3/brokerage/products/BTC-PERP-INTX",
            "/api/v3/brokerage/products/BIT-28JUL23-CDE/candles",
            "/v2/accounts/BTC-USD/transactions",
            "/v2/accounts/2bbf394c-193b-5b2a-9155-3b4732659ede/transactions",
            "/v2/accounts/a/transactions.json",
            "/platform/v2/evm/accounts/0x742d35Cc6634C0532925a3b844Bc454e4438f44e/sign",
            "/platform/v2/solana/accounts/9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM",
            "/a.b/c..d/.e/f~g_h",
        ] {
            assert_eq!(check_path(p), Ok(()), "{p:?}");
        }
    }
}
