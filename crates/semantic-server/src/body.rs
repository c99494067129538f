//! Request bodies: bytes (bounded) -> typed request, with errors that name the
//! field. Handlers take `Result<Bytes, BytesRejection>` so that a body over
//! the limit or a broken connection is rendered in the handler's dialect.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Parses a JSON body into `T`. Errors name the JSON path of the bad field
/// (`messages[1].role`), or the missing field.
pub fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body is larger than {limit} bytes"))
        } else {
            ApiError::InvalidRequest { param: None, message: format!("could not read the request body: {r}") }
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidRequest {
            param: None,
            message: "the request body is empty; expected a JSON object".into(),
        });
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') && is_json(&bytes) {
        return Err(ApiError::InvalidRequest { param: None, message: "the request body must be a JSON object".into() });
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json reports a non-string where an enum (`role`) is
        // expected as a syntax error; in valid JSON it is the field's type.
        if inner.is_syntax() && !matches!(path.as_str(), "." | "") && is_json(&bytes) {
            let detail = strip_position(&inner.to_string()).to_string();
            return ApiError::invalid(path.clone(), format!("invalid `{path}`: wrong type ({detail})"));
        }
        json_error(&path, &inner)
    })?;
    de.end().map_err(|e| ApiError::InvalidRequest { param: None, message: format!("malformed JSON: {e}") })?;
    Ok(value)
}

/// Whether `bytes` is one valid JSON value (of any shape).
fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fn json_error(path: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::InvalidRequest { param: None, message: format!("malformed JSON: {e}") }
        }
        Category::Data => {
            // A missing field is reported at its parent's path.
            let msg = e.to_string();
            let missing = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next());
            let param = match (missing, path) {
                (Some(f), "." | "") => f.to_string(),
                (Some(f), p) => format!("{p}.{f}"),
                (None, p) => p.to_string(),
            };
            let detail = strip_position(&msg);
            ApiError::invalid(param.clone(), format!("invalid `{param}`: {detail}"))
        }
    }
}

/// serde_json appends " at line L column C"; the field path is more useful.
fn strip_position(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        items: Vec<Item>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        n: u32,
    }

    fn parse(s: &str) -> Result<Req, ApiError> {
        parse_json(Ok(Bytes::from(s.to_owned())), 100)
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"model": "m", "items": [{"n": 1}, {"n": "x"}]}"#).unwrap_err();
        assert_eq!(e.param(), Some("items[1].n"));
        assert!(e.to_string().contains("invalid type: string"), "{e}");
        let e = parse(r#"{"items": []}"#).unwrap_err();
        assert_eq!(e.param(), Some("model"));
        let e = parse(r#"{"model": "m", "items": [{}]}"#).unwrap_err();
        assert_eq!(e.param(), Some("items[0].n"));
        let e = parse(r#"{"model": "m", "#).unwrap_err();
        assert!(e.to_string().starts_with("malformed JSON"), "{e}");
        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = parse(r#"{"model": "m", "items": []} x"#).unwrap_err();
        assert!(e.to_string().starts_with("malformed JSON"), "{e}");
    }
}
