//! The webhook signature (SPEC §6): a lowercase hex HMAC-SHA256 of the raw body bytes,
//! checked before a byte of the body is trusted. It never sees a re-serialised body, and
//! compares in constant time (`verify_slice`).

use anyhow::Result;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;
use crate::error::{config_err, no_perm};

/// Checks `X-Plane-Signature` against the raw body when a secret is configured: lowercase
/// hex HMAC-SHA256, compared in constant time. Missing or wrong is exit 77.
pub fn verify_signature(
    secret: Option<&Secret>,
    body: &[u8],
    signature: Option<&str>,
) -> Result<()> {
    let Some(secret) = secret else {
        return Ok(());
    };
    let Some(sig) = signature.map(str::trim).filter(|s| !s.is_empty()) else {
        return Err(no_perm(
            "the delivery has no X-Plane-Signature but ORCH_PLANE_WEBHOOK_SECRET is set",
        ));
    };
    let wrong = || no_perm("the X-Plane-Signature does not match the delivery body");
    let sig = hex::decode(sig).map_err(|_| wrong())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .map_err(|_| config_err("ORCH_PLANE_WEBHOOK_SECRET cannot key an HMAC"))?;
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| wrong())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_the_raw_bytes() {
        let secret = Secret::new("plane_wh_0123456789abcdef0123456789abcdef");
        let body = include_bytes!("../../tests/fixtures/plane/issue_update_state_change.wire.json");
        let good = "61e869bb881b348dc10dde5e489278b55d220cd41269e4045c63e746b70ad066";
        assert!(verify_signature(Some(&secret), body, Some(good)).is_ok());
        for bad in [None, Some(""), Some("zz"), Some(&good[..62])] {
            let e = verify_signature(Some(&secret), body, bad).unwrap_err();
            assert_eq!(crate::error::exit_kind(&e), crate::error::ExitKind::NoPerm);
        }
        assert!(verify_signature(None, body, None).is_ok());
    }
}
