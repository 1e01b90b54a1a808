//! `POST /v1/companies`: create a company (scope `companies:create`).

use std::{
    future::{Ready, ready},
    time::Duration,
};

use actix_web::{
    FromRequest, HttpRequest, HttpResponse, ResponseError, dev::Payload, http::StatusCode, web,
};
use serde::{Deserialize, Serialize};
use tenantry_core::{ApiError, auth::Caller, http};
use tenantry_shardmap::tenants::{self, CreateError, Created};
use uuid::Uuid;

use crate::Gateway;

/// The scope that allows creating companies.
pub const CREATE_SCOPE: &str = "companies:create";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCompany {
    /// Client-chosen id, so a retried request cannot create a second company.
    id: Option<Uuid>,
    name: String,
}

#[derive(Serialize)]
struct CompanyView {
    id: Uuid,
    name: String,
    shard: String,
}

fn validate_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad_request(
            "invalid_name",
            "name must be 1 to 200 characters",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_name",
            "name must not contain control characters",
        ));
    }
    Ok(name.to_owned())
}

fn invisible_name() -> ApiError {
    ApiError::bad_request(
        "invalid_name",
        "name must not contain invisible formatting characters (zero-width, bidirectional \
         marks and overrides)",
    )
}

fn blank_name() -> ApiError {
    ApiError::bad_request(
        "invalid_name",
        "name must contain at least one visible character",
    )
}

/// Whether `c` shows as something of its own: not a space, not an [`invisible`] character,
/// not a mark (combining accents, vowel signs, variation selectors: they change the character
/// before them), not a format character (the zero-width (non-)joiners and tags, allowed in a
/// name to join its other characters) and not the braille blank. A name needs one: made only
/// of the others, it would show as nothing.
fn shows(c: char) -> bool {
    use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};
    !c.is_whitespace()
        && !invisible(c)
        && c != '\u{2800}'
        && c.general_category_group() != GeneralCategoryGroup::Mark
        && c.general_category() != GeneralCategory::Format
}

/// Whether company `id` already has exactly `name`: a company created before names with
/// invisible characters were refused may still be created again under it (which finishes a
/// creation left half-way), and only that one.
async fn named_so_already(
    catalog: &impl tokio_postgres::GenericClient,
    id: Uuid,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(catalog
        .query_opt(
            "SELECT 1 FROM tenants WHERE id = $1 AND name = $2",
            &[&id, &name],
        )
        .await?
        .is_some())
}

/// Characters that show nothing themselves but change what a name looks like: the zero-width
/// space and word joiners, bidirectional marks, embeddings, overrides and isolates (a
/// right-to-left override makes "Acme\u{202e}gpj.exe" read "Acmeexe.jpg"), the byte-order mark
/// and the soft hyphen. A name made of them, or hiding one, would look like another company's
/// in any list. The zero-width (non-)joiners stay allowed: Persian and Indic names and emoji
/// sequences need them.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00ad}'
        | '\u{200b}'
        | '\u{200e}'..='\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{feff}'
        // The Arabic letter mark, a combining grapheme joiner and a Mongolian vowel separator,
        // and the Hangul fillers, which render as blanks.
        | '\u{061c}'
        | '\u{034f}'
        | '\u{180e}'
        | '\u{115f}'
        | '\u{1160}'
        | '\u{3164}'
        | '\u{ffa0}')
}

/// How long a creation waits for its turn (see `Gateway::creations`) before 503.
const CREATION_WAIT: Duration = Duration::from_secs(5);

/// A caller with the `companies:create` scope. Extracted before the body, so a caller without
/// it gets 403 whatever it sent, not a 400, 413 or 415 about a body it may not send at all.
pub struct Creator;

impl FromRequest for Creator {
    type Error = ApiError;
    type Future = Ready<Result<Creator, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        ready(
            Caller::from_request(req, payload)
                .into_inner()
                .and_then(|caller| match caller.0.has_scope(CREATE_SCOPE) {
                    true => Ok(Creator),
                    false => Err(ApiError::forbidden(format!(
                        "creating companies needs the {CREATE_SCOPE} scope"
                    ))),
                }),
        )
    }
}

/// 201 when this call created the company, 200 when it already existed with this name (or
/// this call finished a creation that an earlier one left half-done), 409 when the id is
/// taken by another name.
pub async fn create(
    _creator: Creator,
    req: HttpRequest,
    http::Body(body): http::Body,
    gw: web::Data<Gateway>,
) -> Result<HttpResponse, ApiError> {
    let NewCompany { id, name } = http::json_body(&req, &body, "company")?;
    let name = validate_name(&name)?;
    let id = id.unwrap_or_else(Uuid::now_v7);
    tracing::Span::current().record("company.id", tracing::field::display(id));
    // A 5xx names the id: a client that sent none learns the one to repeat the request with.
    // Repeated without it, a creation that stopped half way would make a second company and
    // leave the first `provisioning` for good.
    create_as(id, name, &gw).await.map_err(|e| {
        if e.status_code().is_server_error() {
            e.with_company(id)
        } else {
            e
        }
    })
}

async fn create_as(id: Uuid, name: String, gw: &Gateway) -> Result<HttpResponse, ApiError> {
    let busy = || {
        ApiError::unavailable(
            "creations_busy",
            "too many companies are being created at once; repeat the request with the same id",
            Duration::from_secs(1),
        )
    };
    let _creating = tokio::time::timeout(CREATION_WAIT, gw.creations.clone().acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let mut client = gw.router.catalog().get().await?;
    let (hidden, blank) = (name.chars().any(invisible), !name.chars().any(shows));
    if (hidden || blank) && !named_so_already(&**client, id, &name).await? {
        return Err(if blank {
            blank_name()
        } else {
            invisible_name()
        });
    }
    let created = tenants::create(&mut client, &gw.database, id, &name)
        .await
        .map_err(|e| match e {
            CreateError::NameConflict(_) | CreateError::Deleted(_) => {
                ApiError::new(StatusCode::CONFLICT, "company_exists", e.to_string())
            }
            CreateError::NoShard => ApiError::unavailable(
                "no_shard_available",
                "no shard accepts new companies; ask an operator",
                Duration::from_secs(30),
            ),
            CreateError::Shard { .. } => ApiError::unavailable(
                "shard_unavailable",
                "the chosen shard is not reachable; repeat the request with the same id",
                Duration::from_secs(1),
            )
            .with_source(anyhow::anyhow!("{e}")),
            CreateError::Catalog(e) => ApiError::from(e),
        })?;
    gw.router.forget_unknown(id).await;
    let (status, shard) = match created {
        Created::New { shard_id } => (StatusCode::CREATED, shard_id),
        Created::Existing { shard_id, .. } => (StatusCode::OK, shard_id),
    };
    Ok(HttpResponse::build(status).json(CompanyView { id, name, shard }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(validate_name("  Acme  ").unwrap(), "Acme");
        assert!(validate_name("   ").is_err());
        assert!(validate_name(&"x".repeat(201)).is_err());
        assert!(validate_name(&"é".repeat(200)).is_ok());
        assert!(validate_name("a\u{0}b").is_err());
        for hidden in [
            "\u{200b}",
            "Acme\u{202e}gpj.exe",
            "\u{feff}Acme",
            "Ac\u{2066}me",
            "\u{3164}",
            "A\u{061c}cme",
        ] {
            assert!(hidden.chars().any(invisible), "{hidden:?}");
        }
        assert!(validate_name("Zoë & Søn ГмбХ 株式会社").is_ok());
        assert!(!"Zoë & Søn ГмбХ 株式会社".chars().any(invisible));
        assert!(
            !"می\u{200c}خواهم".chars().any(invisible),
            "Persian needs ZWNJ"
        );
        for blank in [
            "\u{200d}\u{200c}",
            "\u{2800}\u{2800}",
            "\u{fe0f}",
            "\u{0301}\u{0308}",
            "\u{3000}\u{200d}\u{e0067}",
            "\u{064b}\u{064c}",
            "\u{05b7}\u{05bc}",
            "\u{094d}",
            "\u{e0100}",
        ] {
            assert!(!blank.chars().any(shows), "{blank:?}");
        }
        for seen in [
            "A",
            "é",
            "株",
            "👩\u{200d}💻",
            "e\u{0301}",
            "\u{2801}",
            "क्ष",
            "שָׁלוֹם",
        ] {
            assert!(seen.chars().any(shows), "{seen:?}");
        }
    }
}
