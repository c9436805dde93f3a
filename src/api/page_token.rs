//! Opaque page tokens. A token carries the position to continue after and the filter it was
//! issued for, so a token cannot silently be reused with another filter. They are not secret
//! (base64 of plain text): they only name rows the caller may already list.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::domain::ValidationError;

/// Default and largest page sizes, for every paged method.
pub const DEFAULT_PAGE_SIZE: i64 = 100;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Validates `page_size` (0 = default).
pub fn page_size(requested: i32) -> Result<i64, ValidationError> {
    match i64::from(requested) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(ValidationError::new("page_size", "must not be negative")),
        n => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// Encodes a position within the listing identified by `scope`.
pub fn encode(scope: &str, position: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{scope}\n{position}"))
}

/// Decodes a token issued by [`encode`] for the same `scope`; `None` for the empty token.
pub fn decode(scope: &str, token: &str) -> Result<Option<String>, ValidationError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ValidationError::new("page_token", "is not a token returned by this listing");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (token_scope, position) = text.split_once('\n').ok_or_else(invalid)?;
    // No position this service issues holds a NUL (PostgreSQL's text cannot): compared with
    // one, the listing's statement would fail as an internal error.
    if token_scope != scope || position.contains('\0') {
        return Err(invalid());
    }
    Ok(Some(position.to_owned()))
}

/// Cuts `rows` (fetched with a limit of `limit + 1`) to one page and makes the token of the next
/// page from the last row kept; the token is empty on the last page.
pub fn paginate<T>(
    mut rows: Vec<T>,
    limit: i64,
    scope: &str,
    position: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let token = match rows.last() {
        Some(last) if more => encode(scope, &position(last)),
        _ => String::new(),
    };
    (rows, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_its_scope_only() {
        let token = encode("setpoints:b1", "sensor/7");
        assert_eq!(
            decode("setpoints:b1", &token).unwrap().as_deref(),
            Some("sensor/7")
        );
        assert_eq!(
            decode("setpoints:b2", &token).unwrap_err().field,
            "page_token"
        );
        assert_eq!(decode("setpoints:b1", "").unwrap(), None);
        assert!(decode("setpoints:b1", "!!not base64").is_err());
        let forged = encode("setpoints:b1", "sensor\0");
        assert_eq!(
            decode("setpoints:b1", &forged).unwrap_err().field,
            "page_token"
        );
    }

    #[test]
    fn paginate_emits_a_token_only_when_more_rows_exist() {
        let (page, token) = paginate(vec![1, 2, 3], 2, "s", |n| n.to_string());
        assert_eq!(page, vec![1, 2]);
        assert_eq!(decode("s", &token).unwrap().as_deref(), Some("2"));
        let (page, token) = paginate(vec![1, 2], 2, "s", |n| n.to_string());
        assert_eq!(page, vec![1, 2]);
        assert!(token.is_empty());
    }

    #[test]
    fn page_size_defaults_caps_and_rejects_negative() {
        assert_eq!(page_size(0).unwrap(), 100);
        assert_eq!(page_size(5).unwrap(), 5);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert_eq!(page_size(-1).unwrap_err().field, "page_size");
    }
}
