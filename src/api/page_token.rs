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

/// Bytes of a response kept for everything but its page of items: the next page token (a
/// position of at most 128 characters, base64) and the other fields.
pub const RESPONSE_RESERVE: usize = 1024;

/// Cuts `rows` (fetched with a limit of `limit + 1`) to one page: at most `limit` items, as
/// `message` makes them, whose encoding as a repeated field stays within `budget` bytes (AIP-158
/// lets a page hold fewer than asked). Makes the token of the next page from the last row kept;
/// the token is empty on the last page.
pub fn paginate<T, M: prost::Message>(
    rows: Vec<T>,
    limit: i64,
    budget: usize,
    scope: &str,
    position: impl Fn(&T) -> String,
    message: impl Fn(&T) -> M,
) -> (Vec<M>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut page = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    for row in rows.iter().take(limit) {
        let item = message(row);
        let len = item.encoded_len();
        // One byte of tag (field numbers below 16) and the length's varint.
        let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !page.is_empty() && bytes + size > budget {
            break;
        }
        bytes += size;
        page.push(item);
        last = Some(row);
    }
    let token = match last {
        Some(last) if rows.len() > page.len() => encode(scope, &position(last)),
        _ => String::new(),
    };
    (page, token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1 as pb;

    #[test]
    fn a_page_stops_short_of_its_byte_budget_and_continues_after_its_last_item() {
        let rows: Vec<String> = (0..10).map(|n| format!("{n}{}", "x".repeat(99))).collect();
        // Each item: 1 byte of tag, 1 of length, 2 + 100 of a string field.
        let message = |row: &String| pb::GetSetpointRequest {
            sensor_id: row.clone(),
        };
        let (page, token) = paginate(rows.clone(), 10, 350, "s", |r| r[..1].to_owned(), message);
        assert_eq!(page.len(), 3, "3 × 104 bytes fit in 350, 4 do not");
        assert_eq!(decode("s", &token).unwrap().as_deref(), Some("2"));
        let (page, token) = paginate(
            rows.clone(),
            10,
            10_000,
            "s",
            |r| r[..1].to_owned(),
            message,
        );
        assert_eq!(
            (page.len(), token.as_str()),
            (10, ""),
            "all fit: the last page"
        );
        let (page, token) = paginate(rows.clone(), 4, 10_000, "s", |r| r[..1].to_owned(), message);
        assert_eq!(page.len(), 4);
        assert_eq!(decode("s", &token).unwrap().as_deref(), Some("3"));
        // One item larger than the budget is still sent alone, rather than no page at all.
        let (page, _) = paginate(rows, 10, 10, "s", |r| r[..1].to_owned(), message);
        assert_eq!(page.len(), 1);
    }

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
        let message = |n: &i32| pb::GetSetpointRequest {
            sensor_id: n.to_string(),
        };
        let ids = |page: Vec<pb::GetSetpointRequest>| -> Vec<String> {
            page.into_iter().map(|m| m.sensor_id).collect()
        };
        let (page, token) = paginate(vec![1, 2, 3], 2, 1000, "s", |n| n.to_string(), message);
        assert_eq!(ids(page), ["1", "2"]);
        assert_eq!(decode("s", &token).unwrap().as_deref(), Some("2"));
        let (page, token) = paginate(vec![1, 2], 2, 1000, "s", |n| n.to_string(), message);
        assert_eq!(ids(page), ["1", "2"]);
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
