//! `cbgate health`: probe the admin listener, for container health checks without curl.

use std::collections::HashMap;

use cbgate::config::{Config, Sources};
use cbgate::ops::admin;

use super::{config_err, Failure, HealthArgs};

/// Probes `/readyz` (or `/livez`) and prints its body.
pub fn run(args: HealthArgs, env: HashMap<String, String>) -> Result<(), Failure> {
    // Only the configuration is needed: a probe must not depend on reading the key.
    let sources = Sources {
        file: args.config.config.clone(),
        env,
        listen: Vec::new(),
        admin_listen: args.admin_listen.clone(),
        key_file: None,
    };
    let cfg = Config::load(&sources).map_err(config_err)?;
    let path = if args.live { "/livez" } else { "/readyz" };
    match admin::probe(cfg.admin_listen, path, std::time::Duration::from_secs(3)) {
        Ok(body) => {
            println!("{body}");
            Ok(())
        }
        Err(e) => Err(Failure::Runtime(anyhow::anyhow!("{e}"))),
    }
}
