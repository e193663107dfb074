//! `cbgate check --online`: one signed call through the same signing path and upstream client
//! as the proxy, `GET /api/v3/brokerage/key_permissions`, with the exact reason when it fails.

use crate::forward::upstream::OwnCall;
use crate::ops::clock;
use crate::proxy::Proxy;
use crate::sign::jwt::Binding;

/// The endpoint that tells what a key may do.
pub const PERMISSIONS_PATH: &str = "/api/v3/brokerage/key_permissions";

/// What the online check learned.
#[derive(Debug)]
pub struct Online {
    /// Coinbase's clock minus ours, when it could be measured.
    pub clock_offset: Result<f64, String>,
    /// The key's permissions (`can_view`, `can_trade`, `can_transfer`, `portfolio_uuid`, ...).
    pub permissions: Result<serde_json::Value, String>,
}

/// Measures the clock, then asks Coinbase for the key's permissions.
pub async fn online(proxy: &Proxy) -> Online {
    let Some(route) = proxy.router().find(PERMISSIONS_PATH) else {
        let none = format!("no route for {PERMISSIONS_PATH}");
        return Online {
            clock_offset: Err(none.clone()),
            permissions: Err(none),
        };
    };
    let upstream = &route.upstream;
    let clock_offset = clock::measure(proxy, upstream).await;
    if let Ok(offset) = clock_offset {
        clock::apply(proxy, offset);
    }
    let permissions = permissions(proxy, route, &clock_offset).await;
    Online {
        clock_offset,
        permissions,
    }
}

async fn permissions(
    proxy: &Proxy,
    route: &crate::gate::route::Route,
    clock_offset: &Result<f64, String>,
) -> Result<serde_json::Value, String> {
    let upstream = &route.upstream;
    let binding = Binding {
        method: "GET",
        host: &upstream.authority,
        path: PERMISSIONS_PATH,
    };
    let token = proxy
        .signer()
        .mint(upstream.claims, &binding)
        .map_err(|e| e.to_string())?
        .ok_or("no API key configured")?;
    let (status, _, body) = proxy
        .upstream()
        .call(
            OwnCall {
                method: http::Method::GET,
                host: &upstream.host,
                authority: &upstream.authority,
                path: PERMISSIONS_PATH,
                token: Some(&token),
                body: None,
            },
            64 * 1024,
        )
        .await?;
    if status.as_u16() == 401 {
        let skew = match clock_offset {
            Ok(o) => format!("measured clock offset {o:+.1} s (cbgate corrects offsets over 1 s)"),
            Err(_) => "the clock offset could not be measured".into(),
        };
        return Err(format!(
            "401 from Coinbase: the token was refused. Usual causes: the key was deleted or \
             lacks permissions (compare the name and fingerprint with the portal), an Ed25519 key \
             used on the /v2 App API, a clock off by more than a few seconds ({skew}), or an \
             Exchange/Prime key instead of a CDP key"
        ));
    }
    if !status.is_success() {
        return Err(format!(
            "{status} from Coinbase: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
}
